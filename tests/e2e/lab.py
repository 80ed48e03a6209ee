#!/usr/bin/python3
"""A network-namespace lab of the host-routed picture, and a runner for vmnetd inside it.

    Computer X ── LAN ── eth0 (uplink) [ HOST ] vme1a ══ eth0 [ VM 1 ]
    198.51.100.10        198.51.100.1              198.51.100.201/32
                                          vme2a ══ eth0 [ VM 2 ]
                                                   198.51.100.202/32

With ``Lab(ipv6=True)`` the LAN is dual-stack: X also has 2001:db8:1::10/64, the uplink
2001:db8:1::1/64, VM n 2001:db8:1::2NN/128 with ``default via fe80::ffff:1:1 dev eth0`` (every
address without duplicate address detection, and the host without an IPv6 default route).
MigrationLab is two such hosts, A and B, on one LAN bridge, for moving a VM between them.

Every piece lives in network namespaces named ``vmnt-<pid>-<n>-<role>`` that the lab creates and
removes again on every exit path (close(), the `with` block, atexit, SIGTERM). The machine's own
(root) namespace is never changed: veth pairs are created directly inside the lab namespaces.
Only 198.51.100.0/24, 203.0.113.0/24, 2001:db8:1::/64 and the gateways 169.255.30.1 and
fe80::ffff:1:1 are used.

The host starts as the agent finds a real host: uplink configured, no default route, VM links
present but DOWN, forwarding off. vmnetd is expected to do the rest.

Run as root with /usr/bin/python3 (it has python3-grpcio). Commands:

    lab.py selftest   program the host by hand, as vmnetd would, and check the pings
    lab.py selftest6  the same, dual-stack: IPv4 and IPv6 objects by hand, pings of both
    lab.py selftest-migration  MigrationLab: the VM behind A, then moved to B, by hand
    lab.py cleanup    remove namespaces left by lab processes that no longer run
"""

import atexit
import contextlib
import ctypes
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

try:
    import grpc
except ImportError as e:  # e.g. a pyenv python3 first on PATH
    raise ImportError(f"{e}: the e2e lab needs python3-grpcio and python3-protobuf; run it with "
                      f"/usr/bin/python3 (this is {sys.executable})") from e

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import grpcurl  # noqa: E402  (sibling module)
import skips  # noqa: E402  (tests/skips.py: no skips as root)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VMNETD = os.environ.get("VMNETD") or os.path.join(REPO, "build", "server", "vmnetd")

NAMESPACE_PREFIX = "vmnt-"
UPLINK = "eth0"
VM_LINK = "eth0"  # the VM's adapter, inside its namespace
HOST_ADDRESS = "198.51.100.1"
X_ADDRESS = "198.51.100.10"
LAN_PREFIX_LEN = 24
GATEWAY = "169.255.30.1"
# The dual-stack lab (Lab(ipv6=True), MigrationLab).
HOST_ADDRESS6 = "2001:db8:1::1"
X_ADDRESS6 = "2001:db8:1::10"
LAN_PREFIX_LEN6 = 64
GATEWAY6 = "fe80::ffff:1:1"
AGENT_PROTOCOL = "237"  # the route and proxy entry protocol vmnetd marks its objects with

# The build under test: "address" or "thread" for a sanitizer build (tests/CMakeLists.txt sets
# it), which runs vmnetd several times slower.
SANITIZED = bool(os.environ.get("VMNET_SANITIZE"))


def time_bound(seconds):
    """An upper bound on how long vmnetd takes for something, in seconds: as given for a normal
    build, ten times that under a sanitizer. Such bounds tell a repair that waits for a timer
    it should not need (the next proxy check, the full resync) from a prompt one; they are no
    measure of speed (bench/ measures that)."""
    return seconds * (10 if SANITIZED else 1)


COMMAND_TIMEOUT = 10.0
DAEMON_START_TIMEOUT = 20.0
DAEMON_STOP_TIMEOUT = 30.0  # sanitizer builds check for leaks at exit, which takes time


class LabError(Exception):
    """A lab command failed; the message holds the command and its output."""


class LabUnavailable(unittest.SkipTest):
    """The lab cannot be built here (not root, no namespaces, no vmnetd binary); tests skip."""


class DaemonError(Exception):
    """vmnetd did not start or stop as expected; the message holds its log."""


def vm_address(index):
    """The address of VM `index` (1-based): 198.51.100.201 for VM 1."""
    return f"198.51.100.{200 + index}"


def vm_address6(index):
    """The IPv6 address of VM `index` (1-based) in a dual-stack lab: 2001:db8:1::201 for VM 1."""
    return f"2001:db8:1::{200 + index}"


def vm_interface(index):
    """The host-side link name of VM `index`: vme1a, vme2a, ... (matches vme[0-9a-f]{1,12})."""
    return f"vme{index:x}a"


def vm_mac(index):
    """The MAC of VM `index`'s adapter: a fixed unicast address, easy to recognise."""
    return f"52:54:00:00:00:{index:02x}"


def wait_until(predicate, timeout, interval=0.1):
    """Polls `predicate` until it returns a truthy value (returned) or `timeout` passes (None)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def run_command(*cmd, check=True, timeout=COMMAND_TIMEOUT):
    """Runs a command, returning the CompletedProcess; raises LabError when it fails and `check`."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise LabError(f"`{' '.join(cmd)}` failed ({result.returncode}): "
                       f"{(result.stderr or result.stdout).strip()}")
    return result


@dataclasses.dataclass
class VmSpec:
    """One VM of the lab: its namespace, host-side link, address and MAC."""

    index: int
    ns: str
    interface: str
    address: str
    mac: str
    vm_id: str
    address6: str = None  # in a dual-stack lab only

    @property
    def addresses(self):
        """The VM's addresses: IPv4, then IPv6 in a dual-stack lab."""
        return [self.address] + ([self.address6] if self.address6 else [])


@dataclasses.dataclass
class ArpLine:
    """One line of `arp -n`."""

    address: str
    hw_type: str
    hw_address: str
    flags: str
    mask: str
    iface: str


def parse_arp(text):
    """Parses `arp -n` output into ArpLines, slicing columns at the header's positions."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("Address"):
        return []  # "arp: in 0 entries no match found."
    header = lines[0]
    names = ["Address", "HWtype", "HWaddress", "Flags", "Mask", "Iface"]
    starts = [header.index(name) for name in names] + [None]
    entries = []
    for line in lines[1:]:
        columns = [line[starts[i]:starts[i + 1]].strip() for i in range(len(names))]
        entries.append(ArpLine(*columns))
    return entries


def configure_guest(lab, vm, ns=None):
    """Configures VM `vm`'s adapter eth0 (already in namespace `ns`, vm.ns by default) as the
    guest would: its MAC, its /32 (and /128, no DAD) and default routes via the gateways."""
    ns = ns or vm.ns
    lab._ip(ns, "link", "set", VM_LINK, "address", vm.mac)
    lab._ip(ns, "addr", "add", f"{vm.address}/32", "dev", VM_LINK)
    if vm.address6:
        lab._ip(ns, "addr", "add", f"{vm.address6}/128", "dev", VM_LINK, "nodad")
    lab._ip(ns, "link", "set", VM_LINK, "up")
    lab._ip(ns, "route", "add", GATEWAY, "dev", VM_LINK, "scope", "link")
    lab._ip(ns, "route", "add", "default", "via", GATEWAY, "dev", VM_LINK)
    if vm.address6:
        lab._ip(ns, "-6", "route", "add", "default", "via", GATEWAY6, "dev", VM_LINK)


# -- cleanup on every exit path ---------------------------------------------------------------

_live_labs = []
_exit_hooks_installed = False


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM so that `finally` blocks and atexit run.

    A KeyboardInterrupt rather than SystemExit, because unittest records SystemExit as a test
    error and carries on, while it lets KeyboardInterrupt through."""


def _on_sigterm(signum, frame):
    raise Terminated(f"signal {signum}")


def _close_live_labs():
    for lab in list(_live_labs):
        lab.close()


def _install_exit_hooks():
    global _exit_hooks_installed
    if _exit_hooks_installed:
        return
    _exit_hooks_installed = True
    atexit.register(_close_live_labs)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def _die_with_parent():
    """In a child before exec: get SIGTERM when the lab process dies, even by SIGKILL."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


# -- the lab ----------------------------------------------------------------------------------

class Lab:
    """The host-routed picture in namespaces; use as a context manager.

    Attributes: x, host (namespace names), vms (index -> VmSpec), daemon (after start_daemon).
    """

    _sequence = 0

    def __init__(self, vm_count=2, vms_without_link=(), ipv6=False):
        """`vm_count` VMs numbered from 1; those in `vms_without_link` get a namespace only
        (call add_vm_link later, as when the hypervisor creates the adapter after attach).
        With `ipv6`, the LAN and the VMs are dual-stack (see the module docstring)."""
        Lab._sequence += 1
        self.prefix = f"{NAMESPACE_PREFIX}{os.getpid()}-{Lab._sequence}-"
        self.x = self.prefix + "x"
        self.host = self.prefix + "host"
        self.vms = {}
        self.daemon = None
        self._vm_count = vm_count
        self._vms_without_link = set(vms_without_link)
        self.ipv6 = ipv6
        self._namespaces = []

    def __enter__(self):
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def build(self):
        """Creates X, the host and the VMs."""
        _install_exit_hooks()
        _live_labs.append(self)
        self._add_namespace(self.x)
        self._add_namespace(self.host)
        self._ip(self.host, "link", "add", UPLINK, "type", "veth", "peer", "name", "eth0",
                 "netns", self.x)
        self._configure_lan_end(self.x, X_ADDRESS, X_ADDRESS6)
        self._configure_lan_end(self.host, HOST_ADDRESS, HOST_ADDRESS6)
        for index in range(1, self._vm_count + 1):
            self.add_vm(index, with_link=index not in self._vms_without_link)

    def close(self):
        """Stops the daemon and removes every namespace of the lab; safe to call twice."""
        if self.daemon is not None:
            self.daemon.close()
            self.daemon = None
        if self.host in self._namespaces:
            self._delete_links(self.host)
        for ns in reversed(self._namespaces):
            result = run_command("ip", "netns", "delete", ns, check=False)
            if result.returncode != 0:
                print(f"lab: could not delete namespace {ns}: {result.stderr.strip()}",
                      file=sys.stderr)
        self._namespaces.clear()
        if self in _live_labs:
            _live_labs.remove(self)

    def _delete_links(self, ns):
        """Deletes every link of namespace `ns` but lo (veth peers elsewhere go with them).

        Done before the namespace is deleted: the kernel tears down the links of a deleted
        namespace in the background, and many of them hold up link handling on the whole
        machine (measured: a namespace deleted with 60 veth pairs up delayed the carrier, and
        so the IPv6 autoconfiguration, of the next lab's links by 48 s; deleted first, by 0)."""
        try:
            names, going = [], {"lo"}
            for link in self.ip_json(ns, "link", "show"):
                if link["ifname"] in going:
                    continue
                names.append(link["ifname"])
                going.add(link["ifname"])
                if "link_netnsid" not in link:  # a veth peer in the same namespace goes too
                    going.add(link.get("link"))
            if names:
                result = subprocess.run(["ip", "-force", "-n", ns, "-batch", "-"],
                                        input="".join(f"link del {name}\n" for name in names),
                                        capture_output=True, text=True, timeout=60)
                if result.returncode != 0:
                    print(f"lab: deleting the links of {ns}: {result.stderr.strip()}",
                          file=sys.stderr)
        except (LabError, subprocess.TimeoutExpired, ValueError) as e:
            print(f"lab: could not delete the links of {ns}: {e}", file=sys.stderr)

    def _add_namespace(self, ns):
        if os.geteuid() != 0:
            raise LabUnavailable("the e2e lab needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) to "
                                 "create network namespaces; run it as root")
        result = run_command("ip", "netns", "add", ns, check=False)
        if result.returncode != 0:
            # As root this is no reason to skip (a container without CAP_SYS_ADMIN, a
            # broken /run/netns): it fails, saying why.
            raise LabError(f"`ip netns add {ns}` failed: {result.stderr.strip()}")
        self._namespaces.append(ns)
        self._ip(ns, "link", "set", "lo", "up")

    def _ip(self, ns, *args):
        return run_command("ip", "-n", ns, *args)

    def _configure_lan_end(self, ns, address, address6=None):
        self._ip(ns, "addr", "add", f"{address}/{LAN_PREFIX_LEN}", "dev", "eth0")
        if self.ipv6 and address6:
            self._ip(ns, "addr", "add", f"{address6}/{LAN_PREFIX_LEN6}", "dev", "eth0", "nodad")
        self._ip(ns, "link", "set", "eth0", "up")

    def add_vm(self, index, with_link=True):
        """Creates VM `index`'s namespace and, when `with_link`, its adapter; returns its VmSpec."""
        vm = VmSpec(index=index, ns=f"{self.prefix}vm{index}", interface=vm_interface(index),
                    address=vm_address(index), mac=vm_mac(index), vm_id=f"vm-{index}",
                    address6=vm_address6(index) if self.ipv6 else None)
        self._add_namespace(vm.ns)
        self.vms[index] = vm
        if with_link:
            self.add_vm_link(index)
        return vm

    def add_vm_link(self, index):
        """Creates VM `index`'s veth pair: host side left DOWN, VM side configured as a guest."""
        vm = self.vms[index]
        self._ip(self.host, "link", "add", vm.interface, "type", "veth", "peer", "name", VM_LINK,
                 "netns", vm.ns)
        configure_guest(self, vm)


    # -- commands and kernel queries ----------------------------------------------------------

    def run(self, ns, *cmd, check=True, timeout=COMMAND_TIMEOUT):
        """Runs `cmd` inside namespace `ns` (ip netns exec); returns the CompletedProcess."""
        return run_command("ip", "netns", "exec", ns, *cmd, check=check, timeout=timeout)

    def ping(self, ns, address, count=1, timeout=1, deadline=None):
        """True when `address` answers a ping sent from namespace `ns`.

        Sends `count` echo requests 0.2 s apart and waits `timeout` seconds for each reply; with
        `deadline`, keeps sending until the first reply or until `deadline` seconds passed."""
        args = ["-n", "-q", "-i", "0.2", "-W", str(timeout)]
        args += ["-c", "1", "-w", str(deadline)] if deadline else ["-c", str(count)]
        limit = (deadline or count * 0.2 + timeout) + 5
        result = self.run(ns, "ping", *args, address, check=False, timeout=limit)
        return result.returncode == 0

    def ip_batch(self, ns, lines, timeout=COMMAND_TIMEOUT):
        """Runs iproute2 commands (lines without the leading "ip") with `ip -n ns -batch -`,
        one process for all of them; raises LabError naming the failing line."""
        result = subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n",
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise LabError(f"`ip -n {ns} -batch` failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()}")

    def ipv6_settled(self, ns=None):
        """True when IPv6 autoconfiguration is over on every link of namespace `ns` (the host by
        default) that has a carrier, so that the kernel announces nothing more on its own.

        A link that gets a carrier is handled by the kernel's linkwatch, which is shared by the
        whole machine and rate limited, so it can come seconds later on a busy machine: only
        then the operstate becomes UP and the link gets its IPv6 link-local address, tentative
        until duplicate address detection ends a second or two later, when the kernel announces
        the address and its route again."""
        return not self.ipv6_unsettled(ns)

    def ipv6_unsettled(self, ns=None):
        """The links that keep ipv6_settled() false, each with why."""
        unsettled = []
        for link in self.ip_json(ns or self.host, "addr", "show"):
            if link["ifname"] == "lo" or "LOWER_UP" not in link["flags"]:
                continue  # no carrier: nothing configured, nothing to wait for
            if link.get("operstate") != "UP":
                unsettled.append(f"{link['ifname']}: carrier not processed yet (operstate "
                                 f"{link.get('operstate')})")
            tentative = [a["local"] for a in link.get("addr_info", []) if a.get("tentative")]
            if tentative:
                unsettled.append(f"{link['ifname']}: {', '.join(tentative)} tentative")
        return unsettled

    def start_ping(self, ns, address, count, interval=0.2, extra_args=()):
        """A ping from namespace `ns` running in the background; see Pinger."""
        return Pinger(ns, address, count, interval, extra_args)

    def monitor(self, ns=None, objects=("route", "neigh", "address", "link")):
        """`ip monitor OBJECTS` running in namespace `ns` (the host by default); see IpMonitor."""
        return IpMonitor(self, ns or self.host, objects)

    def ip_json(self, ns, *args):
        """`ip -j -n ns ARGS...`, parsed."""
        out = run_command("ip", "-j", "-n", ns, *args).stdout.strip()
        return json.loads(out) if out else []

    def routes(self):
        """The host's main routing table (ip -j -d route show table main)."""
        return self.ip_json(self.host, "-d", "route", "show", "table", "main")

    def proxy_entries(self):
        """The host's proxy ARP entries, with their protocol (ip -j -d neigh show proxy)."""
        return self.ip_json(self.host, "-d", "neigh", "show", "proxy")

    def addresses(self, dev):
        """The addr_info list of host link `dev` (ip -j addr show dev DEV)."""
        links = self.ip_json(self.host, "addr", "show", "dev", dev)
        return links[0]["addr_info"] if links else []

    def link(self, dev):
        """Host link `dev` as `ip -j link` shows it, or None when it does not exist."""
        result = run_command("ip", "-j", "-n", self.host, "link", "show", "dev", dev, check=False)
        return json.loads(result.stdout)[0] if result.returncode == 0 else None

    def arp(self):
        """The host's `arp -n` (net-tools), parsed into ArpLines."""
        return parse_arp(self.run(self.host, "arp", "-n").stdout)

    def arp_text(self):
        """The host's `arp -n` as printed."""
        return self.run(self.host, "arp", "-n").stdout

    def neighbours(self, dev):
        """The ordinary (non-proxy) IPv4 neighbours on host link `dev`."""
        return self.ip_json(self.host, "-4", "neigh", "show", "dev", dev)

    def snapshot(self):
        """What an agent could change on the host, for before/after comparisons: the main
        routing table, the proxy entries, and the IPv4 addresses of every link (IPv6
        link-local addresses and link flags are left out: they change when a link comes up)."""
        addresses = {
            link["ifname"]: sorted((a["local"], a["prefixlen"], a.get("scope"))
                                   for a in link.get("addr_info", []) if a["family"] == "inet")
            for link in self.ip_json(self.host, "-4", "addr", "show")
        }
        return {"routes": self.routes(), "proxy_entries": self.proxy_entries(),
                "addresses": addresses}

    # -- IPv6 queries (dual-stack lab) -----------------------------------------------------------

    def routes6(self, ns=None):
        """The IPv6 main routing table of namespace `ns` (the host by default)."""
        return self.ip_json(ns or self.host, "-6", "-d", "route", "show", "table", "main")

    def proxy_entries6(self, ns=None):
        """The IPv6 proxy (NDP) entries, with their protocol (ip -j -6 -d neigh show proxy)."""
        return self.ip_json(ns or self.host, "-6", "-d", "neigh", "show", "proxy")

    def addresses6(self, dev, ns=None):
        """The IPv6 addr_info list of link `dev` (ip -j -6 addr show dev DEV)."""
        links = self.ip_json(ns or self.host, "-6", "addr", "show", "dev", dev)
        return links[0]["addr_info"] if links else []

    def neighbours6(self, dev, ns=None):
        """The ordinary (non-proxy) IPv6 neighbours on link `dev`."""
        return self.ip_json(ns or self.host, "-6", "neigh", "show", "dev", dev)

    def sysctl(self, name, ns=None):
        """A /proc/sys value (e.g. "net/ipv6/conf/eth0/proxy_ndp") read inside namespace `ns`
        (the host by default): /proc/sys/net is per network namespace."""
        return self.run(ns or self.host, "cat", f"/proc/sys/{name}").stdout.strip()

    def set_sysctl(self, name, value, ns=None):
        """Writes a /proc/sys value inside namespace `ns` (the host by default)."""
        self.run(ns or self.host, "sysctl", "-q", "-w", f"{name.replace('/', '.')}={value}")

    def mac(self, dev, ns=None):
        """The MAC of link `dev` in namespace `ns` (the host by default)."""
        return self.ip_json(ns or self.host, "link", "show", "dev", dev)[0]["address"]

    def snapshot6(self):
        """snapshot()'s IPv6 counterpart: the host's IPv6 routes not made by the kernel itself,
        its IPv6 proxy entries, and the IPv6 addresses of every link but the link-local
        addresses the kernel makes (the gateway fe80::ffff:1:1 is kept)."""
        routes = [r for r in self.routes6() if r.get("protocol") != "kernel"]
        addresses = {
            link["ifname"]: sorted((a["local"], a["prefixlen"]) for a in link.get("addr_info", [])
                                   if a.get("scope") != "link" or a["local"] == GATEWAY6)
            for link in self.ip_json(self.host, "-6", "addr", "show")
        }
        return {"routes6": routes, "proxy_entries6": self.proxy_entries6(),
                "addresses6": {name: a for name, a in addresses.items() if a}}

    # -- the daemon ---------------------------------------------------------------------------

    def start_daemon(self, *extra_flags, binary=None):
        """Starts vmnetd in the host namespace and waits until it reports SERVING."""
        if self.daemon is not None:
            raise DaemonError("vmnetd is already running in this lab")
        self.daemon = Daemon(self.host, binary or VMNETD, extra_flags)
        self.daemon.start()
        return self.daemon


class MigrationLab(Lab):
    """Two hosts, A and B, on one LAN bridge, and a VM that moves from A to B; dual-stack.

        Computer X eth0 ─┐              ┌─ eth0 [ HOST A ] vme1a ══ eth0 [ VM, adapter on A ]
        198.51.100.10    ├─ br0 (lan) ──┤   198.51.100.1, 2001:db8:1::1
        2001:db8:1::10   │              └─ eth0 [ HOST B ] vme1b ══ eth0 [ VM, adapter on B ]
                                            198.51.100.2, 2001:db8:1::2

    The bridge lives in a namespace of its own (multicast snooping off, so that neighbour
    solicitations reach every port whatever MLD said). The VM is one spec (`vm_on_a`:
    vm-1, 198.51.100.201/32, 2001:db8:1::201/128, MAC 52:54:00:00:00:01) with two adapters, as
    in a live migration, where the destination's adapter is prepared before the switch-over:
    `vm_on_a` in namespace ...-vma linked to A's vme1a, and `vm_on_b` (the same addresses and
    MAC) in ...-vmb linked to B's vme1b. switch_over() moves the running VM: it takes the guest's
    neighbour entries for its gateways from the adapter on A (they are guest memory, which a
    migration carries along), sets that adapter down (the source stops) and installs the entries
    in the adapter on B, where the guest now runs, as REACHABLE (a guest whose traffic keeps
    them confirmed; measured: an entry carried in state DELAY heals by itself in 3 s, through
    three failed unicast probes and a broadcast, a REACHABLE one only after its reachable time,
    15 to 45 s). Until B announces the gateways on vme1b the guest therefore still sends to A's
    gateway MAC, as a migrated guest would.

    Attributes: x, lan, hosts {"a": ns, "b": ns}, vm_on_a, vm_on_b (VmSpecs), daemons
    {"a": Daemon, "b": Daemon} after start_daemon("a") and start_daemon("b")."""

    HOST_ADDRESSES = {"a": (HOST_ADDRESS, HOST_ADDRESS6), "b": ("198.51.100.2", "2001:db8:1::2")}

    def __init__(self):
        super().__init__(vm_count=0, ipv6=True)
        self.lan = self.prefix + "lan"
        self.hosts = {"a": self.prefix + "hosta", "b": self.prefix + "hostb"}
        self.host = self.hosts["a"]  # Lab.close() deletes its links
        self.daemons = {}
        spec = dict(index=1, address=vm_address(1), address6=vm_address6(1), mac=vm_mac(1),
                    vm_id="vm-1")
        self.vm_on_a = VmSpec(ns=self.prefix + "vma", interface="vme1a", **spec)
        self.vm_on_b = VmSpec(ns=self.prefix + "vmb", interface="vme1b", **spec)

    def build(self):
        _install_exit_hooks()
        _live_labs.append(self)
        self._add_namespace(self.lan)
        self._ip(self.lan, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        self._ip(self.lan, "link", "set", "br0", "up")
        self._add_namespace(self.x)
        self._plug_into_lan(self.x, "px")
        self._configure_lan_end(self.x, X_ADDRESS, X_ADDRESS6)
        for name, ns in self.hosts.items():
            self._add_namespace(ns)
            self._plug_into_lan(ns, f"p{name}")
            self._configure_lan_end(ns, *self.HOST_ADDRESSES[name])
        for host, vm in ((self.hosts["a"], self.vm_on_a), (self.hosts["b"], self.vm_on_b)):
            self._add_namespace(vm.ns)
            self._ip(host, "link", "add", vm.interface, "type", "veth", "peer", "name", VM_LINK,
                     "netns", vm.ns)
            configure_guest(self, vm)

    def _plug_into_lan(self, ns, port):
        self._ip(ns, "link", "add", "eth0", "type", "veth", "peer", "name", port,
                 "netns", self.lan)
        self._ip(self.lan, "link", "set", port, "master", "br0")
        self._ip(self.lan, "link", "set", port, "up")

    def close(self):
        for daemon in self.daemons.values():
            daemon.close()
        self.daemons.clear()
        for ns in (self.lan, self.hosts["b"]):
            if ns in self._namespaces:
                self._delete_links(ns)
        super().close()

    def start_daemon(self, which, *extra_flags, binary=None):
        """Starts vmnetd on host `which` ("a" or "b"), each with its own state directory."""
        if which in self.daemons:
            raise DaemonError(f"vmnetd is already running on host {which}")
        self.daemons[which] = Daemon(self.hosts[which], binary or VMNETD, extra_flags)
        self.daemons[which].start()
        return self.daemons[which]

    def gateway_neighbours(self, vm):
        """The guest's neighbour entries for its two gateways on its adapter `vm`."""
        return [n for n in self.ip_json(vm.ns, "neigh", "show", "dev", VM_LINK)
                if n["dst"] in (GATEWAY, GATEWAY6)]

    def switch_over(self):
        """The VM stops on A and runs on from B, its neighbour entries for the gateways kept
        (see the class docstring); returns the entries carried over."""
        carried = [n for n in self.gateway_neighbours(self.vm_on_a) if n.get("lladdr")]
        self._ip(self.vm_on_a.ns, "link", "set", VM_LINK, "down")
        for n in carried:
            self._ip(self.vm_on_b.ns, "neigh", "replace", n["dst"], "lladdr", n["lladdr"],
                     "dev", VM_LINK, "nud", "reachable",
                     *(["router"] if ":" in n["dst"] else []))
        return carried


def send_announcements(interface, address, mac=None, router=False):
    """Sends one gratuitous ARP (IPv4 `address`) or one unsolicited neighbour advertisement
    with the override flag (IPv6; `router` sets the router flag) for `address` from
    `interface` of the current namespace, with `mac` (the link's own by default), through a
    raw socket: a hand-made stand-in for the agent's announcements, used by the selftests."""
    import ipaddress
    import socket
    import struct
    if mac is None:
        with open(f"/sys/class/net/{interface}/address") as f:
            mac = f.read().strip()
    hw = bytes.fromhex(mac.replace(":", ""))
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        frame = (b"\xff" * 6 + hw + struct.pack("!H", 0x0806)
                 + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + hw + ip.packed + b"\0" * 6
                 + ip.packed)
    else:
        source = ipaddress.ip_address("fe80::1")  # any link-local address will do for Linux
        all_nodes = ipaddress.ip_address("ff02::1")
        flags = (0x80 if router else 0) | 0x20  # R, O
        icmp = struct.pack("!BBHB3x", 136, 0, 0, flags) + ip.packed + bytes([2, 1]) + hw
        pseudo = source.packed + all_nodes.packed + struct.pack("!I3xB", len(icmp), 58)
        total = sum(struct.unpack(f"!{len(pseudo + icmp) // 2}H", pseudo + icmp))
        while total >> 16:
            total = (total & 0xffff) + (total >> 16)
        icmp = icmp[:2] + struct.pack("!H", ~total & 0xffff) + icmp[4:]
        frame = (bytes.fromhex("333300000001") + hw + struct.pack("!H", 0x86dd)
                 + struct.pack("!IHBB", 6 << 28, len(icmp), 58, 255) + source.packed
                 + all_nodes.packed + icmp)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((interface, 0))
        sock.send(frame)


class _BackgroundCommand:
    """A command whose output a thread collects (self.process, self._thread); stopped by
    close() and by leaving its `with` block."""

    def close(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(DAEMON_STOP_TIMEOUT)
        self._thread.join(timeout=5)
        self.process.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Pinger(_BackgroundCommand):
    """`ping -n -i INTERVAL -c COUNT ADDRESS` running in a namespace in the background.

    replies counts the echo replies so far (ping prints one line each); wait() returns ping's
    summary as (transmitted, received)."""

    def __init__(self, ns, address, count, interval, extra_args=()):
        self.command = ["ip", "netns", "exec", ns, "ping", "-n", "-i", str(interval),
                        "-c", str(count), *extra_args, address]
        self.timeout = count * interval + 10
        self.output = []
        self.replies = 0
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, preexec_fn=_die_with_parent)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in self.process.stdout:
            self.output.append(line.rstrip("\n"))
            if re.match(r"(\[\d+\.\d+\] )?\d+ bytes from ", line):  # -D: "[1700.1] 64 bytes"
                self.replies += 1

    def running(self):
        return self.process.poll() is None

    def wait(self):
        """Waits for ping to finish; returns (transmitted, received) from its summary line."""
        try:
            self.process.wait(self.timeout)
        finally:
            self.close()
        text = "\n".join(self.output)
        match = re.search(r"(\d+) packets transmitted, (\d+) received", text)
        if not match:
            raise LabError(f"`{' '.join(self.command)}` printed no summary:\n{text}")
        return int(match.group(1)), int(match.group(2))

    def summary(self):
        """ping's statistics line, e.g. "40 packets transmitted, 40 received, 0% packet loss"."""
        return next((line for line in self.output if "packets transmitted" in line), "")



class IpMonitor(_BackgroundCommand):
    """`ip -ts monitor OBJECTS` in a namespace, its lines collected by a thread; a context manager.

    mark() puts a marker in the stream (a blackhole route to 203.0.113.25x added and deleted
    again, which nothing else in the lab makes) and waits until the monitor printed it, so a test
    can delimit a window of lines without sleeping: mark(), act, mark(), lines_between()."""

    MARKER_PREFIX = "203.0.113.25"

    def __init__(self, lab, ns, objects):
        if "route" not in objects:
            raise ValueError("IpMonitor needs `route` among its objects: its markers are routes")
        self.lab = lab
        self.ns = ns
        self.lines = []  # as printed, without ip's timestamp
        self.times = []  # ip's timestamp of each line (when it read the notification), seconds
        self._markers = 0
        self._cond = threading.Condition()
        self.process = subprocess.Popen(["ip", "-n", ns, "-ts", "monitor", *objects],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True,
                                        preexec_fn=_die_with_parent)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        try:
            self.mark()  # also proves the monitor is subscribed
        except BaseException:
            self.close()
            raise

    def _read(self):
        for raw in self.process.stdout:
            # "[2026-11-24T10:25:52.773816] 198.51.100.10 dev eth0 lladdr ... STALE"
            match = re.match(r"^\[([^]]*)\]\s*(.*)$", raw.rstrip("\n"))
            stamp, line = match.groups() if match else (None, raw.rstrip("\n"))
            seconds = datetime.datetime.fromisoformat(stamp).timestamp() if stamp else None
            with self._cond:
                self.lines.append(line)
                self.times.append(seconds)
                self._cond.notify_all()

    def wait_for_line(self, pattern, start=0, timeout=COMMAND_TIMEOUT):
        """The index of the first line from index `start` on that matches regular expression
        `pattern`, waiting up to `timeout` seconds for it; None if none came."""
        regex = re.compile(pattern)

        def find():
            return next((i for i in range(start, len(self.lines)) if regex.search(self.lines[i])),
                        None)

        with self._cond:
            return self._cond.wait_for(find, timeout)

    def mark(self, timeout=COMMAND_TIMEOUT):
        """Adds and deletes a marker route; returns the index in `lines` just after the line of
        its deletion. Raises LabError when the monitor does not print it within `timeout`."""
        if self._markers >= 5:
            raise LabError("IpMonitor.mark(): at most 5 markers per monitor")
        self._markers += 1
        route = f"{self.MARKER_PREFIX}{self._markers}/32"
        self.lab.run(self.ns, "ip", "route", "add", "blackhole", route)
        self.lab.run(self.ns, "ip", "route", "del", "blackhole", route)
        deleted = re.compile(rf"^Deleted blackhole {re.escape(route[:-3])}\b")

        def index_after_marker():
            return next((i + 1 for i, line in enumerate(self.lines) if deleted.match(line)), None)

        with self._cond:
            index = self._cond.wait_for(index_after_marker, timeout)
        if index is None:
            raise LabError(f"`ip monitor` in {self.ns} did not show marker {route} within "
                           f"{timeout} s; it printed: {self.lines}")
        return index

    def lines_between(self, start, end, since=None):
        """The lines printed between two mark() calls that returned `start` and `end`, without
        the markers' own lines. With `since` (a time.time() value), each line is prefixed with
        the seconds from then to ip's timestamp of it, e.g. "+0.412s 198.51.100.10 dev ..."."""
        with self._cond:
            window = [(stamp, line) for stamp, line in zip(self.times[start:end],
                                                           self.lines[start:end])
                      if self.MARKER_PREFIX not in line]
        if since is None:
            return [line for _, line in window]
        return [(f"{stamp - since:+.3f}s " if stamp is not None else "        ") + line
                for stamp, line in window]



class Daemon:
    """vmnetd running in a namespace, listening on a unix socket in a fresh temp directory."""

    def __init__(self, ns, binary, extra_flags=()):
        self.ns = ns
        self.binary = binary
        self.extra_flags = list(extra_flags)
        self.workdir = None
        self.process = None
        self._log_file = None
        self._log_start = 0  # offset in the log where the current (or last) start began

    @property
    def socket_path(self):
        return os.path.join(self.workdir, "vmnetd.sock")

    @property
    def target(self):
        """The gRPC target, usable from any namespace: unix:///abs/path."""
        return f"unix://{self.socket_path}"

    @property
    def log_path(self):
        return os.path.join(self.workdir, "vmnetd.log")

    @property
    def command(self):
        return ["ip", "netns", "exec", self.ns, self.binary,
                f"--listen={self.target}", f"--state_dir={os.path.join(self.workdir, 'state')}",
                f"--uplinks={UPLINK}", *self.extra_flags]

    def start(self, timeout=DAEMON_START_TIMEOUT):
        """Starts the process and waits for health SERVING; raises DaemonError with the log.
        After stop(), starts it again with the same socket, state directory and log."""
        if not os.access(self.binary, os.X_OK):
            skips.skip(f"vmnetd binary not found at {self.binary}: build it "
                       f"(cmake --build build) or set VMNETD=/path/to/vmnetd")
        if self.workdir is None:
            self.workdir = tempfile.mkdtemp(prefix=f"{NAMESPACE_PREFIX}{os.getpid()}-")
        self._log_file = open(self.log_path, "ab")
        self._log_start = self._log_file.tell()
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                        stdout=self._log_file, stderr=subprocess.STDOUT,
                                        preexec_fn=_die_with_parent)
        if not wait_until(self._ready_or_exited, timeout):
            raise DaemonError(f"vmnetd did not report SERVING within {timeout:.0f} s; "
                              f"log:\n{self.log()}")
        if self.process.poll() is not None:
            raise DaemonError(f"vmnetd exited with status {self.process.returncode} while "
                              f"starting; log:\n{self.log()}")

    def _ready_or_exited(self):
        if self.process.poll() is not None:
            return True
        return os.path.exists(self.socket_path) and self.health() == "SERVING"

    def health(self, service=""):
        """The status name grpc.health.v1.Health/Check answers, or the error code's name."""
        return health_status(self.target, service)

    def log(self, this_start_only=False):
        """The daemon's stdout and stderr so far; with `this_start_only`, only what the current
        (or last) start wrote, not what earlier runs on the same state directory wrote."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start if this_start_only else 0)
                return f.read().decode(errors="replace")
        except OSError as e:
            return f"(no log: {e})"

    def metrics(self):
        """The daemon's Prometheus metrics, {'name{labels}': value}, fetched with curl inside
        its namespace; it must run with --metrics-listen=HOST:PORT."""
        listen = next((flag.split("=", 1)[1] for flag in self.extra_flags
                       if re.match(r"--metrics[-_]listen=", flag)), None)
        if listen is None:
            raise DaemonError("vmnetd was started without --metrics-listen")
        text = run_command("ip", "netns", "exec", self.ns, "curl", "-sS", "--max-time", "30",
                           f"http://{listen}/metrics").stdout
        return parse_metrics(text)

    @contextlib.contextmanager
    def paused(self):
        """Freezes the daemon (SIGSTOP) for the `with` block and lets it go on (SIGCONT) after,
        as a long scheduling stall would: the kernel keeps queueing events to its sockets."""
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

    def kill(self):
        """SIGKILL (kill -9), as a crash or the OOM killer would; returns the exit status.
        start() runs it again on the same state directory, socket path and log."""
        if self.process is None:
            return None
        self.process.kill()
        self.process.wait(DAEMON_STOP_TIMEOUT)
        self._log_file.close()
        status, self.process = self.process.returncode, None
        return status

    def stop(self, timeout=DAEMON_STOP_TIMEOUT):
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status (negative: signal),
        None when it was not running."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"lab: vmnetd did not stop within {timeout:.0f} s of SIGTERM; killing it",
                      file=sys.stderr)
                self.process.kill()
                self.process.wait(timeout)
        self._log_file.close()
        status, self.process = self.process.returncode, None
        return status

    def close(self):
        """Stops the daemon and removes its temp directory."""
        self.stop()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def parse_metrics(text):
    """Prometheus text format -> {'name{labels}': value}, comments left out."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            samples[series] = float(value)
    return samples


def metric_total(samples, name):
    """The sum of every series of metric `name` (all label values) in parse_metrics output."""
    return sum(value for series, value in samples.items()
               if series == name or series.startswith(name + "{"))


_health_classes = None


def health_status(target, service="", timeout=2.0):
    """Calls grpc.health.v1.Health/Check with messages compiled from grpc-proto, so that it
    works even when the server's reflection does not; returns e.g. "SERVING" or "UNAVAILABLE"."""
    global _health_classes
    if _health_classes is None:
        pool = grpcurl.load_proto("grpc/health/v1/health.proto")
        _health_classes = (grpcurl.message_class(pool, "grpc.health.v1.HealthCheckRequest"),
                           grpcurl.message_class(pool, "grpc.health.v1.HealthCheckResponse"))
    request_class, response_class = _health_classes
    with grpc.insecure_channel(target) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                    request_serializer=request_class.SerializeToString,
                                    response_deserializer=response_class.FromString)
        try:
            response = check(request_class(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name
    return response_class.DESCRIPTOR.fields_by_name["status"].enum_type \
        .values_by_number[response.status].name


# -- command line -----------------------------------------------------------------------------

def program_by_hand(lab, vm, host=None):
    """What vmnetd does for one VM, done with iproute2 (for the selftest only)."""
    host = host or lab.host
    lab.run(host, "ip", "link", "set", vm.interface, "up")
    lab.run(host, "ip", "route", "add", f"{vm.address}/32", "dev", vm.interface,
            "scope", "link", "proto", "237")
    lab.run(host, "ip", "neigh", "add", "proxy", vm.address, "dev", UPLINK, "proto", "237")
    lab.run(host, "ip", "addr", "add", f"{GATEWAY}/32", "dev", vm.interface,
            "scope", "link", "noprefixroute")


def program_by_hand6(lab, vm, host=None, uplink=UPLINK):
    """What vmnetd does for one VM's IPv6 address, done with iproute2 (for the selftests only);
    the host-wide sysctls are set by enable_ipv6_forwarding_by_hand."""
    host = host or lab.host
    lab.run(host, "sysctl", "-q", "-w", f"net.ipv6.conf.{vm.interface}.accept_ra=0")
    lab.run(host, "ip", "link", "set", vm.interface, "up")
    lab.run(host, "ip", "-6", "route", "add", f"{vm.address6}/128", "dev", vm.interface,
            "proto", AGENT_PROTOCOL)
    lab.run(host, "ip", "-6", "neigh", "add", "proxy", vm.address6, "dev", uplink,
            "proto", AGENT_PROTOCOL)
    lab.run(host, "ip", "-6", "addr", "add", f"{GATEWAY6}/128", "dev", vm.interface,
            "scope", "link", "nodad", "noprefixroute")


def enable_ipv6_forwarding_by_hand(lab, host=None, uplink=UPLINK):
    host = host or lab.host
    lab.run(host, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    lab.run(host, "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
    lab.run(host, "sysctl", "-q", "-w", f"net.ipv6.conf.{uplink}.proxy_ndp=1")


def selftest6():
    """selftest() for the dual-stack lab: both families programmed by hand, every ping of both
    families checked; returns an exit code."""
    with Lab(vm_count=2, ipv6=True) as lab:
        vm1, vm2 = lab.vms[1], lab.vms[2]
        checks = [("X cannot reach VM 1 over IPv6 before programming",
                   not lab.ping(lab.x, vm1.address6)),
                  ("the host has no IPv6 default route",
                   not any(r["dst"] == "default" for r in lab.routes6()))]
        enable_ipv6_forwarding_by_hand(lab)
        for vm in (vm1, vm2):
            program_by_hand(lab, vm)
            program_by_hand6(lab, vm)
        for vm in (vm1, vm2):
            checks += [
                (f"X reaches VM {vm.index} (IPv4)", lab.ping(lab.x, vm.address, deadline=3)),
                (f"X reaches VM {vm.index} (IPv6)", lab.ping(lab.x, vm.address6, deadline=3)),
                (f"VM {vm.index} reaches X (IPv4)", lab.ping(vm.ns, X_ADDRESS, deadline=3)),
                (f"VM {vm.index} reaches X (IPv6)", lab.ping(vm.ns, X_ADDRESS6, deadline=3)),
            ]
        checks += [("VM 1 reaches VM 2 (IPv6)", lab.ping(vm1.ns, vm2.address6, deadline=3)),
                    ("VM 2 reaches VM 1 (IPv4)", lab.ping(vm2.ns, vm1.address, deadline=3))]
        print(lab.run(lab.x, "ip", "-6", "neigh", "show").stdout)
        print(lab.run(lab.host, "ip", "-6", "neigh", "show", "proxy").stdout)
        for name, ok in checks:
            print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(ok for _, ok in checks) else 1


def announce_by_hand(ns, announcements):
    """send_announcements(interface, address, router=router) for each (interface, address,
    router) of `announcements`, run inside namespace `ns` by one process."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import lab\nfor i, a, r in {list(announcements)!r}: "
            f"lab.send_announcements(i, a, router=r)")
    run_command("ip", "netns", "exec", ns, sys.executable, "-c", code)


def ping_replies(lines):
    """[(timestamp, icmp_seq)] of the echo replies in the output lines of `ping -D`."""
    replies = []
    for line in lines:
        match = re.match(r"\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)", line)
        if match:
            replies.append((float(match.group(1)), int(match.group(2))))
    return replies


def reply_gap(lines, stopped, restarted):
    """How an interruption looked to `ping -D` (output `lines`): traffic `stopped` at that
    time.time() and the repair began at `restarted`. Returns a dict: `last` (time, seq) of the
    last reply before `stopped`, `first` (time, seq) of the first reply after it or None,
    `resumed_after` (seconds from `restarted` to `first`, None if none) and `lost` (echo
    requests between the two without a reply, None if none came after)."""
    replies = ping_replies(lines)
    before = [r for r in replies if r[0] <= stopped]
    after = [r for r in replies if r[0] > stopped]
    last = before[-1] if before else None
    first = after[0] if after else None
    return {"last": last, "first": first,
            "resumed_after": first[0] - restarted if first else None,
            "lost": first[1] - last[1] - 1 if first and last else None}


def selftest_migration():
    """MigrationLab, the VM programmed on A by hand, moved to B by hand: without announcements
    the pings must not resume within 3 s (so that the agent's test can fail), and with
    hand-made announcements from B they must resume within 1 s; returns an exit code."""
    with MigrationLab() as lab:
        a, b = lab.hosts["a"], lab.hosts["b"]
        vm_a, vm_b = lab.vm_on_a, lab.vm_on_b
        for host in (a, b):
            enable_ipv6_forwarding_by_hand(lab, host)
        program_by_hand(lab, vm_a, host=a)
        program_by_hand6(lab, vm_a, host=a)
        checks = [(f"X reaches the VM on A ({address})", lab.ping(lab.x, address, deadline=3))
                  for address in vm_a.addresses]
        checks += [(f"the VM on A reaches X ({address})", lab.ping(vm_a.ns, address, deadline=3))
                   for address in (X_ADDRESS, X_ADDRESS6)]
        lab.run(b, "ip", "link", "set", vm_b.interface, "up")  # the destination is prepared
        wait_until(lambda: lab.ipv6_settled(b) and lab.ipv6_settled(vm_b.ns), 10)
        pingers = [lab.start_ping(lab.x, address, 180, 0.05, ["-D", "-W", "1"])
                   for address in vm_a.addresses]
        time.sleep(1.5)
        carried = lab.switch_over()
        stopped = time.time()
        program_by_hand(lab, vm_b, host=b)
        program_by_hand6(lab, vm_b, host=b)
        for address in vm_b.addresses:  # as vmnetd does for an AttachVm with mac_address
            lab.run(b, "ip", "neigh", "replace", address, "lladdr", vm_b.mac,
                    "dev", vm_b.interface, "nud", "permanent")
        lab.run(a, "ip", "route", "del", f"{vm_a.address}/32", "dev", vm_a.interface)
        lab.run(a, "ip", "neigh", "del", "proxy", vm_a.address, "dev", UPLINK)
        lab.run(a, "ip", "-6", "route", "del", f"{vm_a.address6}/128", "dev", vm_a.interface)
        lab.run(a, "ip", "-6", "neigh", "del", "proxy", vm_a.address6, "dev", UPLINK)
        time.sleep(3)
        if os.environ.get("LAB_VERBOSE"):
            print(lab.run(vm_b.ns, "ip", "neigh", "show").stdout)
            print(lab.run(lab.x, "ip", "neigh", "show").stdout)
        announced = time.time()
        announce_by_hand(b, [(UPLINK, address, False) for address in vm_b.addresses]
                         + [(vm_b.interface, GATEWAY, False), (vm_b.interface, GATEWAY6, True)])
        if os.environ.get("LAB_VERBOSE"):
            print("after announcements:", time.time() - announced)
            print(lab.run(vm_b.ns, "ip", "neigh", "show").stdout)
            print(lab.run(lab.x, "ip", "neigh", "show").stdout)
            print(lab.mac(UPLINK, b), lab.mac(vm_b.interface, b))
        for pinger in pingers:
            pinger.wait()
        print(f"guest neighbour entries carried from A to B: {carried}")
        for address, pinger in zip(vm_a.addresses, pingers):
            gap = reply_gap(pinger.output, stopped, announced)
            print(f"{address}: {pinger.summary()}; {gap}")
            if os.environ.get("LAB_VERBOSE"):
                print(" ".join(f"{t - stopped:+.2f}:{seq}" for t, seq in
                               ping_replies(pinger.output)))
            checks += [
                (f"{address}: no reply in the 3 s without announcements",
                 gap["first"] is not None and gap["first"][0] > announced),
                (f"{address}: replies resume within 1 s of the announcements",
                 gap["resumed_after"] is not None and gap["resumed_after"] < 1.0),
            ]
        for name, ok in checks:
            print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(ok for _, ok in checks) else 1


def selftest():
    """Builds the lab, programs the host by hand and checks every ping; returns an exit code."""
    with Lab(vm_count=2) as lab:
        vm1, vm2 = lab.vms[1], lab.vms[2]
        checks = [("X cannot reach VM 1 before programming", not lab.ping(lab.x, vm1.address))]
        lab.run(lab.host, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        for vm in (vm1, vm2):
            program_by_hand(lab, vm)
        checks += [
            ("X reaches VM 1", lab.ping(lab.x, vm1.address, deadline=3)),
            ("X reaches VM 2", lab.ping(lab.x, vm2.address, deadline=3)),
            ("VM 1 reaches X", lab.ping(vm1.ns, X_ADDRESS, deadline=3)),
            ("VM 2 reaches X", lab.ping(vm2.ns, X_ADDRESS, deadline=3)),
            ("VM 1 reaches VM 2", lab.ping(vm1.ns, vm2.address, deadline=3)),
        ]
        print(lab.arp_text())
        for name, ok in checks:
            print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(ok for _, ok in checks) else 1


def _stale(name):
    """True for a vmnt-<pid>-... name whose process no longer runs."""
    match = re.match(rf"{NAMESPACE_PREFIX}(\d+)-", name)
    return bool(match) and not os.path.exists(f"/proc/{match.group(1)}")


def cleanup_stale():
    """Removes vmnt-<pid>-... namespaces and temp directories whose lab process no longer runs
    (left behind when a lab process was killed with SIGKILL)."""
    names = [line.split()[0] for line in run_command("ip", "netns", "list").stdout.splitlines()
             if line.strip()]
    for name in filter(_stale, names):
        pids = run_command("ip", "netns", "pids", name, check=False).stdout.split()
        if pids:
            print(f"keeping namespace {name}: processes {' '.join(pids)} still run in it")
            continue
        run_command("ip", "netns", "delete", name)
        print(f"removed namespace {name}")
    tmp = tempfile.gettempdir()
    for name in filter(_stale, os.listdir(tmp)):
        shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
        print(f"removed {os.path.join(tmp, name)}")
    return 0


if __name__ == "__main__":
    commands = {"selftest": selftest, "selftest6": selftest6,
                "selftest-migration": selftest_migration, "cleanup": cleanup_stale}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    sys.exit(commands[sys.argv[1]]())
