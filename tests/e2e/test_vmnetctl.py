#!/usr/bin/python3
"""vmnetctl, the real binary, against a real vmnetd in the namespace lab: what an operator
types and reads. Its `arp` is compared with the host's own `arp -n`, its `routes` with
`ip route`, and its exit codes with what scripts rely on.

Run as root: /usr/bin/python3 tests/e2e/test_vmnetctl.py -v
"""

import json
import os
import queue
import subprocess
import sys
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import skips  # noqa: E402  (tests/skips.py: no skips as root)
import lab  # noqa: E402
from test_host_routed import LabTestCase  # noqa: E402

VMNETCTL = os.environ.get("VMNETCTL") or os.path.join(lab.REPO, "build", "client", "vmnetctl")

EXIT_OK, EXIT_USAGE, EXIT_SERVER_ERROR, EXIT_UNREACHABLE = 0, 2, 3, 4


class VmnetctlTest(LabTestCase):
    vm_count = 2

    @classmethod
    def setUpClass(cls):
        if not os.access(VMNETCTL, os.X_OK):
            skips.skip(f"vmnetctl not built at {VMNETCTL}")
        super().setUpClass()

    def ctl(self, *args, server=None):
        """Runs vmnetctl; returns (exit code, stdout, stderr)."""
        out = subprocess.run([VMNETCTL, f"--server={server or self.lab.daemon.target}", *args],
                             capture_output=True, text=True, timeout=30)
        return out.returncode, out.stdout, out.stderr

    def attach_both(self):
        for index, vm in self.lab.vms.items():
            args = ["attach", f"vm-{index}", "--interface", vm.interface, "--ip", vm.address]
            if index == 1:
                args += ["--mac", lab.vm_mac(1)]
            code, out, err = self.ctl(*args)
            self.assertEqual(code, EXIT_OK, err)
            self.assertIn("programmed", out)

    def test_attach_then_arp_matches_the_hosts_arp_n(self):
        self.attach_both()
        code, out, err = self.ctl("arp")
        self.assertEqual(code, EXIT_OK, err)
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["Address", "HWtype", "HWaddress", "Flags", "Mask",
                                            "Iface"], "the header of arp -n")
        ours = {tuple(line.split()) for line in lines[1:]}
        for index, vm in self.lab.vms.items():
            self.assertIn((vm.address, "*", "*", "MP", lab.UPLINK), ours,
                          f"vmnetctl arp has no proxy line for VM {index}:\n{out}")
        self.assertIn((self.lab.vms[1].address, "ether", lab.vm_mac(1), "CM",
                       self.lab.vms[1].interface), ours)
        # Every entry of the host's own arp -n is there, with the same flags and interface.
        for entry in lab.parse_arp(self.lab.arp_text()):
            matching = [o for o in ours if o[0] == entry.address and o[-1] == entry.iface]
            self.assertTrue(matching, f"arp -n shows {entry} but vmnetctl arp does not:\n{out}")
            flags = {o[3] for o in matching if len(o) == 5}  # Address HWtype HWaddress Flags Iface
            if entry.flags:
                self.assertIn(entry.flags, flags, f"arp -n: {entry}; vmnetctl arp:\n{out}")

    def test_routes_match_ip_route(self):
        self.attach_both()
        code, out, err = self.ctl("routes")
        self.assertEqual(code, EXIT_OK, err)
        for index, vm in self.lab.vms.items():
            self.assertIn(f"{vm.address} dev {vm.interface} proto vmnet scope link  # vm vm-{index}",
                          out)
        kernel = self.lab.routes()
        self.assertEqual(len(out.splitlines()), len(kernel), f"ip route has {kernel}:\n{out}")

    def test_list_get_and_json(self):
        self.attach_both()
        code, out, err = self.ctl("list")
        self.assertEqual(code, EXIT_OK, err)
        rows = [line.split() for line in out.splitlines()]
        self.assertEqual(rows[0][:4], ["VM", "STATE", "INTERFACE", "ADDRESSES"])
        self.assertEqual([r[:2] for r in rows[1:]], [["vm-1", "programmed"], ["vm-2", "programmed"]])
        code, out, err = self.ctl("get", "vm-1")
        self.assertEqual(code, EXIT_OK, err)
        self.assertIn("mac_address: " + lab.vm_mac(1), out)
        code, out, err = self.ctl("--output=json", "get", "vm-2")
        self.assertEqual(code, EXIT_OK, err)
        vm = json.loads(out)
        self.assertEqual(vm["vm_id"], "vm-2")
        self.assertEqual(vm["state"], "VM_STATE_PROGRAMMED")
        code, out, err = self.ctl("--output=json", "routes")
        self.assertEqual(code, EXIT_OK, err)
        # One JSON object per line, one line per route of `ip route`, each VM's among them.
        routes = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(len(routes), len(self.lab.routes()), out)
        for index, vm in self.lab.vms.items():
            mine = [r for r in routes if r.get("destination") == f"{vm.address}/32"]
            self.assertEqual([(r.get("interface"), r.get("vm_id")) for r in mine],
                             [(vm.interface, f"vm-{index}")], out)
        code, _, err = self.ctl("get", "vm-unknown")
        self.assertEqual(code, EXIT_SERVER_ERROR, f"get of an unknown VM: {err}")
        self.assertIn("NOT_FOUND", err)

    def test_routes_and_arp_longer_than_a_page(self):
        """1,100 IPv6 routes and proxy entries: more than a page (1,000) of each, and every one
        is printed exactly once."""
        addresses = [f"2001:db8:ffff::{i:x}" for i in range(1, 1101)]
        self.lab.ip_batch(self.lab.host, [f"route add blackhole {a}/128" for a in addresses]
                          + [f"neigh add proxy {a} dev {lab.UPLINK}" for a in addresses])
        self.addCleanup(self.lab.ip_batch, self.lab.host,
                        [f"route del blackhole {a}/128" for a in addresses]
                        + [f"neigh del proxy {a} dev {lab.UPLINK}" for a in addresses])
        code, out, err = self.ctl("routes", "--family", "ipv6")
        self.assertEqual(code, EXIT_OK, err)
        routes = [line.split()[1] for line in out.splitlines()
                  if line.startswith("blackhole 2001:db8:ffff::")]
        self.assertEqual(sorted(routes), sorted(addresses))
        code, out, err = self.ctl("--output=json", "arp", "--family", "ipv6")
        self.assertEqual(code, EXIT_OK, err)
        proxies = [e["ip_address"] for e in map(json.loads, out.splitlines())
                   if e.get("proxy") and e["ip_address"].startswith("2001:db8:ffff::")]
        self.assertEqual(sorted(proxies), sorted(addresses))

    def test_watch_prints_one_line_per_event(self):
        proc = subprocess.Popen([VMNETCTL, f"--server={self.lab.daemon.target}", "watch",
                                 "--snapshot"], stdout=subprocess.PIPE, text=True)
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout], daemon=True).start()

        def next_line():
            try:
                return lines.get(timeout=20)
            except queue.Empty:
                self.fail("vmnetctl watch printed nothing for 20 s")

        try:
            while "SNAPSHOT_END" not in next_line():  # the snapshot ends with its marker
                pass
            # An interface that does not exist: the VM is pending.
            code, _, err = self.ctl("attach", "vm-watch", "--interface", "vme99",
                                    "--ip", "198.51.100.250")
            self.assertEqual(code, EXIT_OK, err)
            self.assertRegex(next_line(), r"^\d+ VM_ADDED vm-watch pending")
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            proc.stdout.close()
            self.ctl("detach", "vm-watch", "--allow-missing")

    def test_watch_progress_lines_when_idle(self):
        proc = subprocess.Popen([VMNETCTL, f"--server={self.lab.daemon.target}", "watch",
                                 "--progress-interval", "0.2"], stdout=subprocess.PIPE,
                                text=True)
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout], daemon=True).start()
        try:
            # Nothing happens: within 20 s a line "REVISION PROGRESS", twice (every 0.2 s).
            for _ in range(2):
                try:
                    line = lines.get(timeout=20)
                except queue.Empty:
                    self.fail("vmnetctl watch --progress-interval 0.2 printed nothing for 20 s")
                self.assertRegex(line, r"^\d+ PROGRESS$")
        finally:
            proc.terminate()
            proc.wait(timeout=10)
            proc.stdout.close()
        for bad in ("0.05", "-1", "x", "7200"):
            code, _, err = self.ctl("watch", "--progress-interval", bad)
            self.assertEqual(code, EXIT_USAGE, f"--progress-interval {bad}: {err}")

    def test_exit_codes(self):
        self.assertEqual(self.ctl("detach", "no-such-vm")[0], EXIT_SERVER_ERROR)
        code, _, err = self.ctl("attach", "vm-x", "--interface", "eth0", "--ip", "198.51.100.9")
        self.assertEqual(code, EXIT_SERVER_ERROR)
        self.assertIn("INVALID_ARGUMENT", err, "the gRPC code is printed")
        self.assertEqual(self.ctl("frobnicate")[0], EXIT_USAGE)
        self.assertEqual(self.ctl("arp", "--bogus", "1")[0], EXIT_USAGE)
        self.assertEqual(self.ctl("health", server="unix:///nonexistent/vmnetd.sock")[0],
                         EXIT_UNREACHABLE)
        self.assertEqual(self.ctl("health")[0], EXIT_OK)

    def test_help(self):
        out = subprocess.run([VMNETCTL, "--help"], capture_output=True, text=True, timeout=10)
        self.assertEqual(out.returncode, 0)
        for command in ("attach", "detach", "get", "list", "arp", "routes", "watch", "health"):
            self.assertIn(f"  {command}", out.stdout)
        for flag in ("--ca=PEM", "--cert=PEM", "--key=PEM", "--plaintext"):
            self.assertIn(f"  {flag}", out.stdout)


if __name__ == "__main__":
    skips.main()
