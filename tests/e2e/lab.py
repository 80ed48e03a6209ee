#!/usr/bin/python3
"""A network-namespace lab of the host-routed picture, and a runner for vmnetd inside it.

    Computer X ── LAN ── eth0 (uplink) [ HOST ] vme1a ══ eth0 [ VM 1 ]
    198.51.100.10        198.51.100.1              198.51.100.201/32
                                          vme2a ══ eth0 [ VM 2 ]
                                                   198.51.100.202/32

Every piece lives in network namespaces named ``vmnt-<pid>-<n>-<role>`` that the lab creates and
removes again on every exit path (close(), the `with` block, atexit, SIGTERM). The machine's own
(root) namespace is never changed: veth pairs are created directly inside the lab namespaces.
Only 198.51.100.0/24, 203.0.113.0/24 and the gateway 169.255.30.1 are used.

The host starts as the agent finds a real host: uplink configured, no default route, VM links
present but DOWN, forwarding off. vmnetd is expected to do the rest.

Run as root with /usr/bin/python3 (it has python3-grpcio). Commands:

    lab.py selftest   program the host by hand, as vmnetd would, and check the pings
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
import grpcurl  # noqa: E402  (sibling module)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VMNETD = os.environ.get("VMNETD") or os.path.join(REPO, "build", "server", "vmnetd")

NAMESPACE_PREFIX = "vmnt-"
UPLINK = "eth0"
VM_LINK = "eth0"  # the VM's adapter, inside its namespace
HOST_ADDRESS = "198.51.100.1"
X_ADDRESS = "198.51.100.10"
LAN_PREFIX_LEN = 24
GATEWAY = "169.255.30.1"

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

    def __init__(self, vm_count=2, vms_without_link=()):
        """`vm_count` VMs numbered from 1; those in `vms_without_link` get a namespace only
        (call add_vm_link later, as when the hypervisor creates the adapter after attach)."""
        Lab._sequence += 1
        self.prefix = f"{NAMESPACE_PREFIX}{os.getpid()}-{Lab._sequence}-"
        self.x = self.prefix + "x"
        self.host = self.prefix + "host"
        self.vms = {}
        self.daemon = None
        self._vm_count = vm_count
        self._vms_without_link = set(vms_without_link)
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
        self._configure_lan_end(self.x, X_ADDRESS)
        self._configure_lan_end(self.host, HOST_ADDRESS)
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
            if re.search(r"permission denied|not permitted", result.stderr, re.IGNORECASE):
                raise LabUnavailable(f"cannot create network namespaces here: "
                                     f"{result.stderr.strip()}")
            raise LabError(f"`ip netns add {ns}` failed: {result.stderr.strip()}")
        self._namespaces.append(ns)
        self._ip(ns, "link", "set", "lo", "up")

    def _ip(self, ns, *args):
        return run_command("ip", "-n", ns, *args)

    def _configure_lan_end(self, ns, address):
        self._ip(ns, "addr", "add", f"{address}/{LAN_PREFIX_LEN}", "dev", "eth0")
        self._ip(ns, "link", "set", "eth0", "up")

    def add_vm(self, index, with_link=True):
        """Creates VM `index`'s namespace and, when `with_link`, its adapter; returns its VmSpec."""
        vm = VmSpec(index=index, ns=f"{self.prefix}vm{index}", interface=vm_interface(index),
                    address=vm_address(index), mac=vm_mac(index), vm_id=f"vm-{index}")
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
        self._ip(vm.ns, "link", "set", VM_LINK, "address", vm.mac)
        self._ip(vm.ns, "addr", "add", f"{vm.address}/32", "dev", VM_LINK)
        self._ip(vm.ns, "link", "set", VM_LINK, "up")
        self._ip(vm.ns, "route", "add", GATEWAY, "dev", VM_LINK, "scope", "link")
        self._ip(vm.ns, "route", "add", "default", "via", GATEWAY, "dev", VM_LINK)

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

    def start_ping(self, ns, address, count, interval=0.2):
        """A ping from namespace `ns` running in the background; see Pinger."""
        return Pinger(ns, address, count, interval)

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

    # -- the daemon ---------------------------------------------------------------------------

    def start_daemon(self, *extra_flags, binary=None):
        """Starts vmnetd in the host namespace and waits until it reports SERVING."""
        if self.daemon is not None:
            raise DaemonError("vmnetd is already running in this lab")
        self.daemon = Daemon(self.host, binary or VMNETD, extra_flags)
        self.daemon.start()
        return self.daemon


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

    def __init__(self, ns, address, count, interval):
        self.command = ["ip", "netns", "exec", ns, "ping", "-n", "-i", str(interval),
                        "-c", str(count), address]
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
            if re.match(r"\d+ bytes from ", line):
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
            raise LabUnavailable(f"vmnetd binary not found at {self.binary}: build it "
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

def program_by_hand(lab, vm):
    """What vmnetd does for one VM, done with iproute2 (for the selftest only)."""
    lab.run(lab.host, "ip", "link", "set", vm.interface, "up")
    lab.run(lab.host, "ip", "route", "add", f"{vm.address}/32", "dev", vm.interface,
            "scope", "link", "proto", "237")
    lab.run(lab.host, "ip", "neigh", "add", "proxy", vm.address, "dev", UPLINK, "proto", "237")
    lab.run(lab.host, "ip", "addr", "add", f"{GATEWAY}/32", "dev", vm.interface,
            "scope", "link", "noprefixroute")


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
    commands = {"selftest": selftest, "cleanup": cleanup_stale}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    sys.exit(commands[sys.argv[1]]())
