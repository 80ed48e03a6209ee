#!/usr/bin/python3
"""A narrated demo of vmnet's host-routed mode, for a newcomer. Run as root:

    sudo /usr/bin/python3 scripts/demo.py

It builds a small lab out of network namespaces (nothing outside them changes):

    Computer X ── LAN ── eth0 (uplink) [ HOST ] vme1a ══ eth0 [ VM 1 ]  198.51.100.201/32
    198.51.100.10        198.51.100.1                               2001:db8:1::201/128
    2001:db8:1::10       2001:db8:1::1             vme2a ══ eth0 [ VM 2 ]  198.51.100.202/32
                                                                    2001:db8:1::202/128

starts vmnetd on the host, attaches both VMs (dual stack) with vmnetctl, shows what the host
now holds, that X learned of the VMs from the agent's announcements, and that X and the VMs
reach each other over IPv4 and IPv6, shows a spoofed ping from VM 1 that X never receives,
detaches VM 1 and shows that X no longer reaches it, and
tears everything down. The binaries are <repo>/build/server/vmnetd and
<repo>/build/client/vmnetctl (override with VMNETD and VMNETCTL).

Exit status: 0 when every step did what it should, 1 when one did not, 2 when the demo cannot
run here (not root, binaries not built).
"""

import os
import re
import shlex
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests", "e2e"))
import lab  # noqa: E402

VMNETCTL = os.environ.get("VMNETCTL") or os.path.join(REPO, "build", "client", "vmnetctl")


class Demo:
    """Prints each step as a newcomer would type it, and remembers the steps that went wrong."""

    def __init__(self, the_lab):
        self.lab = the_lab
        self.failures = []
        self.roles = {the_lab.x: "X", the_lab.host: "host"}
        self.roles.update({vm.ns: f"vm{vm.index}" for vm in the_lab.vms.values()})

    def step(self, title, explanation=""):
        print(f"\n=== {title}")
        if explanation:
            print(textwrap.fill(explanation, width=96))

    def _print_result(self, result):
        output = (result.stdout + result.stderr).rstrip()
        if output:
            print(textwrap.indent(output, "    "))

    def sh(self, ns, *cmd):
        """Runs `cmd` in namespace `ns`, printed as `role# cmd` with its output."""
        print(f"{self.roles[ns]}# {shlex.join(cmd)}")
        result = self.lab.run(ns, *cmd, check=False)
        self._print_result(result)
        return result

    def vmnetctl(self, *args):
        """Runs vmnetctl against the lab's daemon; a failure counts as a failed step."""
        cmd = [VMNETCTL, f"--server={self.lab.daemon.target}", *args]
        print(f"$ {shlex.join(['vmnetctl', *cmd[1:]])}")
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        self._print_result(result)
        self.expect(result.returncode == 0, f"vmnetctl {args[0]} succeeds")
        return result

    def ping(self, ns, address, expect_reply=True):
        """Pings from `ns` and checks the outcome against `expect_reply`."""
        who = self.roles[ns]
        print(f"{who}# ping {address}")
        if expect_reply:
            ok = self.lab.ping(ns, address, deadline=5)
        else:
            ok = self.lab.ping(ns, address, count=2, timeout=1)
        print(f"    {'reply' if ok else 'no reply'}")
        verb = "reaches" if expect_reply else "does not reach"
        self.expect(ok == expect_reply, f"{who} {verb} {address}")

    def expect(self, ok, what):
        print(f"    -> {'as expected' if ok else 'UNEXPECTED'}: {what}")
        if not ok:
            self.failures.append(what)


def run_demo(the_lab):
    """The demo proper; returns the list of steps that did not do what they should."""
    vm1, vm2 = the_lab.vms[1], the_lab.vms[2]
    demo = Demo(the_lab)

    demo.step("The lab", f"Computer X ({lab.X_ADDRESS}, {lab.X_ADDRESS6}) and the host "
              f"({lab.HOST_ADDRESS}, {lab.HOST_ADDRESS6}, uplink {lab.UPLINK}) share a LAN. "
              f"VM 1 ({vm1.address}, {vm1.address6}) and VM 2 ({vm2.address}, {vm2.address6}) "
              f"hang off the host on links {vm1.interface} and {vm2.interface}, which the "
              f"hypervisor created and left down. Each VM holds a /32 and a /128 and sends "
              f"everything to the gateways {lab.GATEWAY} and {lab.GATEWAY6}. The host has no "
              f"route to the VMs yet:")
    demo.sh(the_lab.host, "ip", "route")
    demo.sh(vm1.ns, "ip", "route")
    demo.ping(the_lab.x, vm1.address, expect_reply=False)

    demo.step("Start vmnetd on the host", "It listens on a unix socket and manages only what it "
              "installs itself (routes and proxy entries marked with its protocol number).")
    the_lab.start_daemon()
    print(f"host# {shlex.join(['vmnetd', *the_lab.daemon.command[5:]])}")
    print("    (serving)")

    demo.step("Attach both VMs", "One request per VM: its id, its host-side link and its "
              "addresses; the MAC is optional (VM 1 gives it, so the host needs no ARP for it).")
    for vm, extra in ((vm1, ["--mac", vm1.mac]), (vm2, [])):
        result = demo.vmnetctl("attach", vm.vm_id, "--interface", vm.interface,
                               "--ip", vm.address, "--ip", vm.address6, *extra)
        if result.returncode != 0:
            return demo.failures

    demo.step("What the host holds now", f"A /32 route per VM address to its link, a published "
              f"(proxy) ARP entry per address on {lab.UPLINK} so that X's ARP for the VM is "
              f"answered by the host, and the gateway {lab.GATEWAY} on each VM link. `ip route` "
              f"prints the agent's protocol number (237) unless the name from "
              f"deploy/iproute2/rt_protos.d is installed; vmnetctl prints the name.")
    demo.sh(the_lab.host, "ip", "route")
    demo.sh(the_lab.host, "arp", "-n")
    demo.sh(the_lab.host, "ip", "-brief", "addr", "show", "dev", vm1.interface)
    demo.vmnetctl("routes")
    demo.vmnetctl("arp")

    demo.step("IPv6 the same way", f"A /128 route per address, a proxy NDP entry on "
              f"{lab.UPLINK}, and the link-local gateway {lab.GATEWAY6} on each VM link.")
    demo.sh(the_lab.host, "ip", "-6", "route", "show", "proto", lab.AGENT_PROTOCOL)
    demo.sh(the_lab.host, "ip", "-6", "neigh", "show", "proxy")
    demo.sh(the_lab.host, "ip", "-brief", "-6", "addr", "show", "dev", vm1.interface)

    demo.step("Announced", f"On attach vmnetd sent gratuitous ARP and unsolicited neighbour "
              f"advertisements on {lab.UPLINK}: X, which had failed to reach VM 1 before, "
              f"already holds the host's MAC for it without asking again.")
    demo.sh(the_lab.host, "ip", "-brief", "link", "show", lab.UPLINK)
    demo.sh(the_lab.x, "ip", "neigh", "show", vm1.address)

    demo.step("Traffic", "X reaches the VMs through the host, the VMs reach X and each other.")
    demo.ping(the_lab.x, vm1.address)
    demo.ping(the_lab.x, vm2.address)
    demo.ping(vm1.ns, lab.X_ADDRESS)
    demo.ping(vm2.ns, lab.X_ADDRESS)
    demo.ping(vm1.ns, vm2.address)
    demo.ping(the_lab.x, vm1.address6)
    demo.ping(vm2.ns, lab.X_ADDRESS6)

    demo.step("Port security", f"VM 1 takes VM 2's address {vm2.address} as well and pings X "
              f"from it. The host drops every such packet before routing it (vmnetd's own "
              f"nftables tables; per-VM data in set elements), so X never receives one, and "
              f"VM 1's spoofed_source counter counts them.")
    demo.sh(vm1.ns, "ip", "addr", "add", f"{vm2.address}/32", "dev", "eth0")
    spoofed = demo.sh(vm1.ns, "ping", "-c", "3", "-W", "1", "-I", vm2.address, lab.X_ADDRESS)
    demo.expect(spoofed.returncode != 0, f"X does not answer a ping spoofed as {vm2.address}")
    demo.sh(vm1.ns, "ip", "addr", "del", f"{vm2.address}/32", "dev", "eth0")
    counter = demo.sh(the_lab.host, "nft", "list", "counter", "inet", "vmnet",
                      f"spoofed_source.{vm1.interface}")
    dropped = re.search(r"packets (\d+)", counter.stdout)
    demo.expect(dropped is not None and int(dropped.group(1)) >= 3,
                "the host counted the 3 spoofed packets")
    demo.ping(vm1.ns, lab.X_ADDRESS)

    demo.step("Detach VM 1", f"vmnetd removes exactly what it installed for VM 1; the link "
              f"{vm1.interface} stays (the hypervisor owns it). VM 2 is not disturbed.")
    demo.vmnetctl("detach", vm1.vm_id)
    demo.sh(the_lab.host, "arp", "-n")
    demo.sh(the_lab.host, "ip", "route")
    demo.ping(the_lab.x, vm1.address, expect_reply=False)
    demo.ping(the_lab.x, vm2.address)
    return demo.failures


def main():
    if not os.access(VMNETCTL, os.X_OK):
        print(f"demo: vmnetctl not found at {VMNETCTL}: build it or set VMNETCTL", file=sys.stderr)
        return 2
    try:
        with lab.Lab(vm_count=2, ipv6=True) as the_lab:
            try:
                failures = run_demo(the_lab)
            except lab.DaemonError as e:
                print(f"\ndemo: {e}", file=sys.stderr)
                return 1
            print("\n=== Tear down: stopping vmnetd and removing the lab's namespaces")
    except lab.LabUnavailable as e:
        print(f"demo: cannot run here: {e}", file=sys.stderr)
        return 2
    if failures:
        print("\nThese steps did not do what they should:\n  " + "\n  ".join(failures))
        return 1
    print("\nEvery step did what it should.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
