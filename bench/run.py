#!/usr/bin/python3
"""vmnet benchmarks: vmnetd and the kernel's own tools side by side, in a namespace lab.

    bench/run.sh [--vms N] [--quick] [--json FILE] [--profile DIR | --heaptrack DIR]
                 [--agent-flags '--flag=value ...'] [--watch-rounds R]
                 [--only baseline,watch,getvm,agent,portsec,bandwidth]

A "host" is a network namespace with an uplink veth (eth0) to a namespace of its own standing
for computer X, and N tap devices vme0, vme1, ... created with `ip -batch`. Host b gets the
baseline `ip -batch`; host d the same batch VM by VM (for information); host c a vmnetd whose
attach storms alternate without and with 100 Watch streams; host g (N+1 taps) a vmnetd read by GetVm while
idle and during its storm; host a a vmnetd for everything else; hosts r (10 taps) and p (N
taps and a veth to a VM namespace) a vmnetd with port security (issue 12); host t the
bandwidth baseline and host l a vmnetd attaching VMs with bandwidth limits (issue 15). --only
runs some of these phases (baseline: b and d, watch: c, getvm: g, agent: a, portsec: r and p,
bandwidth: t and l). Rows, each with its baseline in the same run:

  attach storm    N AttachVm calls, 256 in flight over 4 connections (durable state on the
                  local disk), until all answered PROGRAMMED  vs  `ip -batch` installing the
                  same objects: link up, gateway 169.255.30.1/32 per link, /32 route, proxy
                  entry on eth0; with port security (vmnetd's default) followed by `nft -f` of
                  the same nftables objects: per VM the link in both vm_links sets, 4 named
                  counters, 4 map elements, `ifname . addr` in src4 and arp_src4, into
                  vmnetd's own tables (its base, dumped by host n's vmnetd with 0 VMs and
                  loaded untimed before, as vmnetd installs it at start)
  port security   (portsec) the storm in host p with port security on, vs the same baseline;
                  the ruleset's rule count with 10 VMs (host r) and N VMs (host p): must be
                  equal; forwarding X -> the VM of host p (203.0.113.2, behind a veth, with N
                  other VMs attached): iperf3 TCP, rounds alternating port security on and off
                  (the same agent and state, restarted with --port-security=false and back)
  bandwidth       (bandwidth) the storm in host l with every VM limited both ways (a tbf
                  root qdisc on vme<i>; an ifb vmb<i> with its own tbf, fed by a match-all
                  u32 filter on vme<i>'s ingress qdisc redirecting to it), until every VM is
                  PROGRAMMED  vs  in host t, `ip -batch` (the storm's four objects per VM and
                  the ifb devices) plus `tc -batch` (the qdiscs and filters, same handles,
                  prio and parameters), plus `nft -f` as above when port security is on;
                  both hosts' tc objects checked exactly
  restart         process start to health SERVING with N VMs, and zero kernel writes
                  (vmnet_kernel_writes_total and `ip monitor`)  vs  `ip` dumping the routes,
                  proxy entries and addresses
  drift repair    200 routes deleted one at a time over rtnetlink: delete to re-added, p50/p99
  /metrics        scrape time  vs  prometheus-node-exporter (netdev collector only) in host a
  memory          (RSS with N VMs - RSS empty) / N, after the storm and at its high-water mark
  Watch fan-out   (host c, one agent) median storm time with 100 watchers / median without, of
                  R storms each (--watch-rounds, default 3, 1 with --quick) in ABBA order
                  (without, with, with, without, ...); after each storm but the last a detach
                  storm (vmnet_attach_storm --detach) and the links reset (down, forwarding on),
                  so each storm starts from 0 VMs on the same links; every watcher must see
                  every event in every watched storm. Every sample is in the log and the JSON
  idle watchers   then (host c, N VMs, no changes) 100 idle Watch streams with progress every
                  1 s: the agent's RSS per stream, and its CPU with them vs without
  ListRoutes/Arp  every page of 1000  vs  `ip route show` / `ip neigh show proxy`
  GetVm           p99 latency of GetVm on VM N (attached first), one call in flight on its own
                  connection, 1 ms between calls, during the N-VM attach storm  vs  the same
                  loop on the same agent just before the storm (holding only VM N); the loop
                  alternates GetVm with a control call, grpc.health.v1.Health/Check, which
                  touches none of the reconciler's state: its own p99 ratio, next to GetVm's,
                  is what the machine alone adds during the storm

Fairness: the kernel's neighbour and proxy tables are shared by all namespaces (the proxy
table has 16 hash buckets), so one host's N proxy entries slow down another host's inserts and
dumps. Each host is therefore built just before its phase, and removed (its teardown waited
for) before the next is built; one agent runs at a time. Each host namespace sets
net.ipv4.ip_forward=1 before its links exist, as a routing host does, so new links forward and
both sides install exactly the four objects per VM named above.

Addresses: VMs get /32s in 198.18.0.0/15 and no traffic is ever sent to them; the uplink uses
198.51.100.0/24; the gateway is 169.255.30.1. The one exception is the forwarding row's VM,
203.0.113.2, a namespace of the lab: iperf3 and one ping from X reach it. The root namespace is
never changed. Every namespace and process is removed on every exit path (normal end, exception,
SIGINT, SIGTERM, the overall --time-limit), and the kernel's teardown of the lab is waited for.

--profile DIR writes perf reports per phase (DWARF call graphs of vmnetd, and the whole
machine); --heaptrack DIR runs host a's vmnetd under heaptrack. Both perturb the numbers: use
separate runs. The binaries are copied at start, so a rebuild during the run changes nothing.

Exit status: 0 when every measurement ran and its checks held (targets met or not: the table
says), 1 when a check failed (an attach not programmed, a watcher missing events, a route not
repaired, a kernel object count off, a kernel write on restart, a GetVm call failed or none
measured, nftables objects missing, the rule count growing with the VMs, the baseline's
nftables objects differing from vmnetd's, iperf3 failing, a bandwidth object missing or
wrong), 2 on usage or environment
errors, 77 when the lab cannot be built here (not root, no namespaces). Run as root with
Debian's /usr/bin/python3. The numbers are noisy on a small shared machine; compare the ratios
of one run.
"""

import argparse
import atexit
import ctypes
import difflib
import hashlib
import json
import os
import re
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "vmbench-"
UPLINK = "eth0"
HOST_ADDRESS = "198.51.100.1/24"
X_ADDRESS = "198.51.100.10/24"
GATEWAY = "169.255.30.1"
PROTOCOL = 237
CONTROL_PROTOCOL = 238            # routes of the drift-repair control, never vmnetd's
METRICS = "127.0.0.1:9447"        # vmnetd's /metrics, on each host namespace's loopback
NODE_EXPORTER = "127.0.0.1:9100"  # prometheus-node-exporter, in host a
GETVM_GAP_US = 1000  # the GetVm loop's pause between an answer and the next call
GETVM_CONTROL = "health"  # the loop alternates GetVm with grpc.health.v1.Health/Check
SKIPPED = 77  # exit status when the lab cannot be built here (CTest SKIP_RETURN_CODE)
TOOLS = ("vmnet_attach_storm", "vmnet_getvm_latency", "vmnet_list_pages", "vmnet_wait_serving",
         "vmnet_drift_repair", "vmnet_idle_watchers")
FANOUT_WATCHERS = 100  # Watch streams following the watched storms of the fan-out row (host c)
FANOUT_ROUNDS = 3  # pairs of storms (without, with watchers) on host c; 1 with --quick
IDLE_WATCHERS = 100  # idle Watch streams held after the fan-out rounds (host c)
IDLE_PROGRESS_MS = 1000  # their progress_interval
# --only: the phases, each in hosts of its own (see Bench.run).
PHASES = ("baseline", "watch", "getvm", "agent", "portsec", "bandwidth")
# The bandwidth phase (issue 15): every VM limited both ways, with the default burst.
BW_INGRESS_BPS = 100_000_000  # towards the VM: a root tbf on vme<i>
BW_EGRESS_BPS = 50_000_000    # from the VM: redirected to the ifb vmb<i>, whose root tbf shapes
BW_HANDLE = "ed:"             # vmnetd's root qdiscs (tc_objects.h kQdiscHandle)
BW_FILTER_PRIO = 237          # vmnetd's redirect filter on the ingress qdisc (kFilterPrio)
# The port-security phase's forwarding row: the one VM that traffic is sent to (iperf3 from X),
# in a namespace of its own behind a veth, with an address of TEST-NET-3 (never 198.18.0.0/15).
FORWARD_VM_ADDRESS = "203.0.113.2"
FORWARD_VM_ID = "bench-forward"
IPERF_PORT = 5201
NFT_TABLES = (("inet", "vmnet"), ("arp", "vmnet"))  # vmnetd's own (docs/port-security.md)
# Per VM link, vmnetd's port security installs (docs/port-security.md): the link in both `vm_links`
# sets, 3 named counters in `inet vmnet` and 1 in `arp vmnet`, an element `ifname : counter`
# in each of the 4 maps, and per IPv4 address `ifname . addr` in `src4` and `arp_src4`.
NFT_PER_VM = ("inet counters", "inet set vm_links", "inet set src4", "inet map spoofed_source",
              "inet map spoofed_arp_nd", "inet map to_host", "arp counters",
              "arp set vm_links", "arp set arp_src4", "arp map spoofed_arp_nd")
NFT_COUNTERS_PER_VM = {"inet counters": 3, "arp counters": 1}


class BenchError(Exception):
    """A check failed or a command did not do what it should; the message says which."""


class TimeLimit(BaseException):
    """The overall time limit passed (SIGALRM); unwinds through every `finally`."""


class Terminated(BaseException):
    """SIGINT or SIGTERM; unwinds through every `finally`."""


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _die_with_parent():
    """In a child before exec: SIGTERM when the benchmark dies, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run(*cmd, timeout=60, check=True, input=None):
    """Runs a command; returns the CompletedProcess, raising BenchError when it fails."""
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"`{' '.join(cmd)}` did not finish within {timeout} s") from e
    if check and result.returncode != 0:
        raise BenchError(f"`{' '.join(cmd)}` failed ({result.returncode}): "
                         f"{(result.stderr or result.stdout).strip()[:2000]}")
    return result


MONITOR_MARKER = "203.0.113.254"  # a blackhole route added and deleted: no traffic


# The kernel's own multicast neighbour entries (ff02::..., NOARP), which its garbage collector
# deletes when the machine-wide table is over gc_thresh1 (a 10,000-VM host fills it); vmnetd
# never makes such entries (as tests/e2e/test_reconciler.py's QuietRestartTest).
MULTICAST_GC = re.compile(r"^Deleted ff02::\S+ dev \S+ lladdr 33:33:[0-9a-f:]{11} NOARP\s*$")


def wait_monitor_subscribed(ns, path, timeout=10):
    """`ip monitor` (writing to `path`) prints nothing once it has subscribed: add and delete a
    marker route in `ns` until the file shows the deletion. Returns the number of lines up to
    and including it: what follows is what the monitor saw after subscribing. (A fixed sleep
    instead would let a late subscription miss the writes it must see.)"""
    deleted = re.compile(rf"^Deleted blackhole {re.escape(MONITOR_MARKER)}\b")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run("ip", "-n", ns, "route", "add", "blackhole", f"{MONITOR_MARKER}/32")
        run("ip", "-n", ns, "route", "del", "blackhole", f"{MONITOR_MARKER}/32")
        poll_until = time.monotonic() + 0.5
        while time.monotonic() < poll_until:
            with open(path) as f:
                lines = f.readlines()
            for i, line in enumerate(lines):
                if deleted.match(line):
                    return i + 1
            time.sleep(0.01)
    raise BenchError(f"`ip monitor` in {ns} did not show the marker route {MONITOR_MARKER} "
                     f"within {timeout} s")


def run_json(*cmd, timeout=60):
    """Runs one of the bench programs and parses the JSON line it prints (also when it exits 1:
    the JSON says what failed)."""
    result = run(*cmd, timeout=timeout, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"`{' '.join(cmd)}` printed no result ({result.returncode}): "
                         f"{result.stderr.strip()[:2000]}")
    return json.loads(lines[-1])


def timed(*cmd, timeout=60, cpu=None):
    """Wall time of a command run to completion, its output discarded. With `cpu` (a list),
    appends the CPU seconds (user + system) the command used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            timeout=timeout)
    elapsed = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise BenchError(f"`{' '.join(cmd)}` failed: {result.stderr.strip()[:2000]}")
    if cpu is not None:
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return elapsed


# -- the lab ----------------------------------------------------------------------------------

def latency_stats(latencies):
    """count, p50/p90/p99 (nearest rank, as vmnet_getvm_latency), mean and max in ms."""
    ordered = sorted(latencies)

    def rank(p):
        if not ordered:
            return -1.0
        return ordered[min(max(1, -(-len(ordered) * p // 100)), len(ordered)) - 1] * 1e3

    return {"count": len(ordered), "p50_ms": rank(50), "p90_ms": rank(90), "p99_ms": rank(99),
            "max_ms": ordered[-1] * 1e3 if ordered else -1.0,
            "mean_ms": statistics.fmean(ordered) * 1e3 if ordered else -1.0}


def interface(i):
    return f"vme{i:x}"


def vm_address(i):
    """VM i's address in 198.18.0.0/15 (bench_common.h has the same scheme)."""
    a = (198 << 24) + (18 << 16) + 1 + i
    return f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}"


class Lab:
    """Namespaces named vmbench-<pid>-<host>-{host,x}; removed by close() on every exit path."""

    def __init__(self):
        self.prefix = f"{PREFIX}{os.getpid()}-"
        self.namespaces = []
        self.processes = []  # Popen objects to stop before the namespaces go
        self.wrapped_pids = []

    def host(self, name):
        return f"{self.prefix}{name}-host"

    def add_host(self, name, vms):
        """A host namespace with an uplink to its own X and `vms` tap devices, all DOWN but
        the uplink. Returns the time it took."""
        start = time.monotonic()
        host, x = self.host(name), f"{self.prefix}{name}-x"
        for ns in (host, x):
            run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        # Before any link exists, so every link inherits it (conf/default).
        run("ip", "netns", "exec", host, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        run("ip", "-n", host, "link", "add", UPLINK, "type", "veth", "peer", "name", UPLINK,
            "netns", x)
        run("ip", "-n", host, "addr", "add", HOST_ADDRESS, "dev", UPLINK)
        run("ip", "-n", x, "addr", "add", X_ADDRESS, "dev", UPLINK)
        run("ip", "-n", host, "link", "set", UPLINK, "up")
        run("ip", "-n", x, "link", "set", UPLINK, "up")
        batch = "".join(f"tuntap add dev {interface(i)} mode tap\n" for i in range(vms))
        run("ip", "-n", host, "-batch", "-", input=batch, timeout=120 + vms * 0.02)
        return time.monotonic() - start

    def vm_namespace(self, name):
        return f"{self.prefix}{name}-vm"

    def add_vm(self, name, link, address):
        """A namespace standing for one VM of host `name`: a veth whose host end is `link`
        (DOWN: attaching the VM brings it up) and whose VM end, eth0, holds `address`/32 with
        a default route through the gateway, as a host-routed VM is configured. X routes the
        address through the host. IPv6 is off in the VM so that it sends nothing unasked."""
        host, vm, x = self.host(name), self.vm_namespace(name), f"{self.prefix}{name}-x"
        run("ip", "netns", "add", vm)
        self.namespaces.append(vm)
        run("ip", "netns", "exec", vm, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1")
        run("ip", "-n", vm, "link", "set", "lo", "up")
        run("ip", "-n", host, "link", "add", link, "type", "veth", "peer", "name", "eth0",
            "netns", vm)
        run("ip", "-n", vm, "addr", "add", f"{address}/32", "dev", "eth0")
        run("ip", "-n", vm, "link", "set", "eth0", "up")
        run("ip", "-n", vm, "route", "add", GATEWAY, "dev", "eth0", "scope", "link")
        run("ip", "-n", vm, "route", "add", "default", "via", GATEWAY, "dev", "eth0")
        run("ip", "-n", x, "route", "add", f"{address}/32", "via", HOST_ADDRESS.split("/")[0])
        return vm

    def remove_host(self, name):
        for ns in (self.host(name), f"{self.prefix}{name}-x", self.vm_namespace(name)):
            if ns in self.namespaces:
                run("ip", "netns", "delete", ns, timeout=60)
                self.namespaces.remove(ns)

    def spawn(self, cmd, **kwargs):
        """A background process that the lab stops in close()."""
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
                                   **kwargs)
        self.processes.append(process)
        return process

    def close(self):
        for pid in self.wrapped_pids:  # vmnetd under a profiler: the profiler's child
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.processes:
            stop_process(process)
        self.processes.clear()
        for ns in reversed(self.namespaces):
            result = run("ip", "netns", "delete", ns, check=False, timeout=60)
            if result.returncode != 0:
                log(f"could not delete namespace {ns}: {result.stderr.strip()}")
        self.namespaces.clear()


def stop_process(process, timeout=15):
    """SIGTERM, then SIGKILL; returns the time SIGTERM took to end it."""
    if process.poll() is not None:
        return 0.0
    start = time.monotonic()
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        log(f"pid {process.pid} did not stop within {timeout} s of SIGTERM; killing it")
        process.kill()
        process.wait(10)
    return time.monotonic() - start


def _stale(name):
    """True for a vmbench-<pid>-... name whose benchmark process no longer runs."""
    m = re.match(rf"{PREFIX}(\d+)-", name)
    return bool(m) and not os.path.exists(f"/proc/{m.group(1)}")


def cleanup_stale():
    """Removes the namespaces and work directories of benchmark runs killed with SIGKILL."""
    for line in run("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if _stale(name):
            run("ip", "netns", "delete", name, check=False)
            log(f"removed stale namespace {name}")
    for name in filter(_stale, os.listdir(tempfile.gettempdir())):
        shutil.rmtree(os.path.join(tempfile.gettempdir(), name), ignore_errors=True)
        log(f"removed stale directory {name}")


def netns_cleanup_running():
    """True while a kernel worker is tearing down deleted network namespaces (its name then
    ends in "+netns"). Deleting a namespace returns at once; the kernel frees its links,
    routes and neighbours afterwards, for tens of seconds with 10,000 links, on the CPUs
    the next measurement needs."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read()
        except OSError:
            continue
        if comm.startswith("kworker") and "+netns" in comm:
            return True
    return False


def wait_netns_cleanup(limit):
    """Waits (at most `limit` seconds) until no namespace teardown has been seen for 1.5 s;
    returns the seconds waited."""
    start = time.monotonic()
    quiet_since = start
    while time.monotonic() - start < limit:
        if netns_cleanup_running():
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= 1.5:
            break
        time.sleep(0.25)
    return time.monotonic() - start


def count_kernel_objects(ns):
    """vmnetd's objects in namespace `ns`: (routes, proxy entries, gateway addresses)."""
    routes = run("ip", "-n", ns, "route", "show", "table", "main", "proto", str(PROTOCOL),
                 timeout=60).stdout.count("\n")
    proxies = run("ip", "-n", ns, "neigh", "show", "proxy", timeout=60).stdout.count("\n")
    addresses = run("ip", "-n", ns, "-4", "-o", "addr", "show", timeout=60).stdout.count(
        f" {GATEWAY}/32 ")
    return routes, proxies, addresses


def link_state(ns, links):
    """{link: what the kernel shows of it}: `ip -d addr show` (flags, qdisc, addresses) and its
    IPv4 and IPv6 sysctls, for comparing a link before and after an attach and detach."""
    state = {}
    for link in links:
        shown = run("ip", "-n", ns, "-d", "addr", "show", "dev", link).stdout
        # grep of the link's own directories (`sysctl -a` would read every link's); one
        # entry, stable_secret, cannot be read while unset: -s, and no check of the status.
        sysctls = run("ip", "netns", "exec", ns, "grep", "-rs", ".",
                      f"/proc/sys/net/ipv4/conf/{link}", f"/proc/sys/net/ipv6/conf/{link}",
                      check=False).stdout
        state[link] = shown + "".join(sorted(sysctls.splitlines(keepends=True)))
    return state


# -- traffic control (bandwidth limits, issue 15) ---------------------------------------------

def ifb_name(link):
    """The ifb device of a VM link's egress limit (tc_objects.cc IfbName, for the lab's short
    vme<hex> names): "vmb" and the link's name after its first three characters."""
    assert link.startswith("vme") and 3 < len(link) < 16, link
    return "vmb" + link[3:]


def tbf_params(bits_per_second):
    """(rate bytes/s, burst bytes, limit bytes) of the tbf vmnetd installs for a limit with
    the default burst (tc_codec.cc Tbf, DefaultBurstBytes): the burst is 10 ms at the rate, at
    least 64 KiB; the limit is the burst plus 50 ms at the rate."""
    rate = bits_per_second // 8
    burst = min(max(rate // 100, 64 << 10), 2**32 - 1)
    return rate, burst, min(burst + rate // 20, 2**32 - 1)


def tc_batches(n, order):
    """The `ip -batch` lines (per VM, its ifb's lines: created, addrgenmode none, up) and the `tc -batch` lines (the
    tbf towards the VM, the tbf on the ifb, the ingress qdisc and the match-all redirect
    filter) that install what vmnetd installs for VMs 0..n-1 with BW_INGRESS_BPS and
    BW_EGRESS_BPS (README "Bandwidth limits": the same handles, prio, flags and parameters).
    order "kind": each kind of object for every VM, then the next kind; "vm": VM by VM."""
    tbf = {}
    for key, bps in (("in", BW_INGRESS_BPS), ("out", BW_EGRESS_BPS)):
        rate, burst, limit = tbf_params(bps)
        tbf[key] = f"tbf rate {rate * 8}bit burst {burst} limit {limit}"
    ip_lines, tc_per_vm = [], []
    for i in range(n):
        dev = interface(i)
        ifb = ifb_name(dev)
        # As vmnetd does (tc_codec.h EncodeIfbBringUp): created down, no IPv6 address
        # generation (which the kernel ignores on create), then up; an ifb brought up with
        # it does IPv6 setup whose cost grows with the host's routes.
        ip_lines.append([f"link add {ifb} type ifb", f"link set {ifb} addrgenmode none",
                         f"link set {ifb} up"])
        tc_per_vm.append([
            f"qdisc replace dev {dev} root handle {BW_HANDLE} {tbf['in']}",
            f"qdisc replace dev {ifb} root handle {BW_HANDLE} {tbf['out']}",
            f"qdisc add dev {dev} ingress",
            f"filter add dev {dev} parent ffff: prio {BW_FILTER_PRIO} protocol all u32 "
            f"match u32 0 0 action mirred egress redirect dev {ifb}"])
    if order == "kind":
        tc_lines = [vm[k] for k in range(4) for vm in tc_per_vm]
    else:
        tc_lines = [line for vm in tc_per_vm for line in vm]
    return ip_lines, tc_lines


def tc_objects(ns, n):
    """The bandwidth objects of VMs 0..n-1 in namespace `ns`, as the kernel reports them:
    {"ifb links up", "tbf towards the VM", "tbf on the ifb", "ingress qdiscs",
    "redirect filters"}, each counting only objects that are exactly right (handle, rate, the
    queue's 50 ms, prio, the redirect's target being the VM's own ifb)."""
    counts = dict.fromkeys(("ifb links up", "tbf towards the VM", "tbf on the ifb",
                            "ingress qdiscs", "redirect filters"), 0)
    for line in run("ip", "-n", ns, "-o", "link", "show", "type", "ifb",
                    timeout=120).stdout.splitlines():
        m = re.match(r"^\d+: (vmb[0-9a-f]+): <([^>]*)>", line)
        if m and "UP" in m.group(2).split(","):
            counts["ifb links up"] += 1
    want_rate = {"vme": BW_INGRESS_BPS // 8, "vmb": BW_EGRESS_BPS // 8}
    for q in json.loads(run("tc", "-n", ns, "-j", "qdisc", "show", timeout=120).stdout or "[]"):
        dev = q.get("dev", "")
        if q.get("kind") == "ingress" and dev.startswith("vme") and q.get("handle") == "ffff:":
            counts["ingress qdiscs"] += 1
        elif (q.get("kind") == "tbf" and q.get("root") and q.get("handle") == BW_HANDLE and
              dev[:3] in want_rate):
            options = q.get("options", {})
            if (options.get("rate") == want_rate[dev[:3]] and
                    abs(options.get("lat", 0) - 50000) <= 100):  # the limit: 50 ms at the rate
                counts["tbf towards the VM" if dev.startswith("vme") else "tbf on the ifb"] += 1
    # One `filter show` per VM link; with -j each prints one JSON array, in order.
    shows = "".join(f"filter show dev {interface(i)} ingress\n" for i in range(n))
    out = run("tc", "-n", ns, "-j", "-force", "-batch", "-", input=shows,
              timeout=120 + n * 0.02, check=False).stdout
    decoder, position = json.JSONDecoder(), 0
    for i in range(n):
        while position < len(out) and out[position].isspace():
            position += 1
        if position >= len(out):
            break
        filters, position = decoder.raw_decode(out, position)
        for f in filters:
            options = f.get("options", {})
            if (f.get("pref") == BW_FILTER_PRIO and f.get("kind") == "u32" and
                    f.get("protocol") == "all" and options.get("match", {}).get("mask") == "0"
                    and any(a.get("kind") == "mirred" and a.get("mirred_action") == "redirect"
                            and a.get("direction") == "egress" and
                            a.get("to_dev") == ifb_name(interface(i))
                            for a in options.get("actions", []))):
                counts["redirect filters"] += 1
                break
    return counts


# -- nftables (port security) ----------------------------------------------------------------

def port_security_enabled(flags):
    """Whether vmnetd runs with port security given its extra `flags` (on by default)."""
    enabled = True
    for flag in flags:
        name, _, value = flag.lstrip("-").partition("=")
        name = name.replace("_", "-")
        if name == "port-security":
            enabled = value.lower() not in ("false", "0", "no")
        elif name == "noport-security":
            enabled = False
    return enabled


def nft_objects(ns):
    """vmnetd's nftables objects in namespace `ns`, counted from `nft -j list ruleset`:
    {"<family> counters": n, "<family> set|map <name>": elements, "<family> rules": n} over
    the tables named vmnet only (empty when there are none)."""
    out = run("ip", "netns", "exec", ns, "nft", "-j", "list", "ruleset", timeout=120).stdout
    counts = {}
    for item in json.loads(out).get("nftables", []):
        (kind, value), = item.items()
        if not isinstance(value, dict) or value.get("table") != "vmnet":
            continue
        family = value.get("family")
        if kind == "counter":
            key = f"{family} counters"
            counts[key] = counts.get(key, 0) + 1
        elif kind in ("set", "map"):
            counts[f"{family} {kind} {value['name']}"] = len(value.get("elem", []))
        elif kind == "rule":
            key = f"{family} rules"
            counts[key] = counts.get(key, 0) + 1
    return counts


def nft_per_vm_mismatches(counts, vms):
    """The per-VM objects of `counts` (nft_objects) that are not there `vms` times (one IPv4
    address per VM): a list of "what: have, want" strings, empty when all are right."""
    wrong = []
    for key in NFT_PER_VM:
        want = vms * NFT_COUNTERS_PER_VM.get(key, 1)
        if counts.get(key, 0) != want:
            wrong.append(f"{key}: {counts.get(key, 0)}, want {want}")
    return wrong


def nft_rule_count(ns):
    """The rules of the whole ruleset of namespace `ns`: the lines of `nft -a -t list ruleset`
    that carry a handle inside a chain (-t leaves set elements out; rules are the same)."""
    out = run("ip", "netns", "exec", ns, "nft", "-a", "-t", "list", "ruleset",
              timeout=120).stdout
    rules, in_chain = 0, False
    for line in out.splitlines():
        stripped = line.strip()
        if stripped.startswith("chain ") and stripped.split("#")[0].rstrip().endswith("{"):
            in_chain = True
        elif in_chain and stripped == "}":
            in_chain = False
        elif in_chain and "# handle " in stripped:
            rules += 1
    return rules


def wait_nft(ns, want, timeout):
    """Polls nft_objects(ns) until `want(counts)` holds or `timeout` s pass; returns the
    counts last seen and the seconds until the listing that showed them had begun (0 when the
    first one did: a listing of 10,000 VMs' objects takes about 1.5 s by itself)."""
    start = began = time.monotonic()
    while True:
        counts = nft_objects(ns)
        if want(counts) or began - start > timeout:
            return counts, began - start
        time.sleep(0.1)
        began = time.monotonic()


# nft prints vmnetd's neighbour-advertisement check, `iifname . <16 raw bytes>` looked up in
# the `ifname . ipv6_addr` set src6, but cannot parse it back (docs/port-security.md: the bytecode is
# built by hand). The baseline loads the same rule with the VM's IPv6 source in place of the
# raw target: the same lookup in the same set, for the same packets (NAs only).
_NFT_UNPARSABLE = (("iifname . @th,64,128 != @src6", "iifname . ip6 saddr != @src6"),)


def nft_base_from_dump(text):
    """vmnetd's base ruleset as `nft list ruleset` printed it with 0 VMs, made loadable by
    `nft -f`: only its own tables, the counters' values left out, the unparsable rule
    rewritten (see _NFT_UNPARSABLE). Returns (text, rewritten rules)."""
    rewritten = 0
    for old, new in _NFT_UNPARSABLE:
        rewritten += text.count(old)
        text = text.replace(old, new)
    keep, lines, inside = [], text.splitlines(), False
    for line in lines:
        if re.match(r"^table (inet|arp) vmnet \{", line):
            inside = True
        if inside:
            keep.append(line)
        if inside and line == "}":
            inside = False
    return "\n".join(keep) + "\n", rewritten


def nft_elements_file(path, vms):
    """Writes the `nft -f` file that adds what vmnetd's port security adds for VMs 0..vms-1
    (one IPv4 address each) to its existing tables: the named counters (in table blocks, the
    fastest form measured: 0.9 s for 10,000 VMs, as fast as `add counter` lines) and one
    `add element` statement per set and map with every VM's element."""
    r = range(vms)
    lines = ["table inet vmnet {"]
    lines += [f"\tcounter {reason}.{interface(i)} {{ }}"
              for reason in ("spoofed_source", "spoofed_arp_nd", "to_host") for i in r]
    lines += ["}", "table arp vmnet {"]
    lines += [f"\tcounter spoofed_arp_nd.{interface(i)} {{ }}" for i in r]
    lines.append("}")

    def add(family, name, elements):
        if elements:
            lines.append(f"add element {family} vmnet {name} {{ " + ", ".join(elements) + " }")

    for family in ("inet", "arp"):
        add(family, "vm_links", [f'"{interface(i)}"' for i in r])
    add("inet", "src4", [f'"{interface(i)}" . {vm_address(i)}' for i in r])
    add("arp", "arp_src4", [f'"{interface(i)}" . {vm_address(i)}' for i in r])
    for reason in ("spoofed_source", "spoofed_arp_nd", "to_host"):
        add("inet", reason, [f'"{interface(i)}" : "{reason}.{interface(i)}"' for i in r])
    add("arp", "spoofed_arp_nd", [f'"{interface(i)}" : "spoofed_arp_nd.{interface(i)}"'
                                  for i in r])
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def iperf3_gbits(result):
    """Received Gbit/s of an iperf3 -J result."""
    return result["end"]["sum_received"]["bits_per_second"] / 1e9


# -- vmnetd -----------------------------------------------------------------------------------

class Agent:
    """vmnetd in a host namespace, its socket, state and log in a directory of its own."""

    def __init__(self, lab, ns, binary, tools, workdir, extra_flags=()):
        self.lab, self.ns, self.binary, self.tools = lab, ns, binary, tools
        self.extra_flags = list(extra_flags)
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.socket = os.path.join(workdir, "vmnetd.sock")
        self.target = f"unix://{self.socket}"
        self.process = None  # what was spawned: vmnetd, or the wrapper that runs it
        self.pid = None      # vmnetd's own pid

    def command(self, wrapper):
        return ["ip", "netns", "exec", self.ns, *wrapper, self.binary, f"--listen={self.target}",
                f"--state-dir={os.path.join(self.workdir, 'state')}", f"--uplinks={UPLINK}",
                f"--metrics-listen={METRICS}", f"--route-protocol={PROTOCOL}",
                *self.extra_flags]

    def start(self, timeout=300, wrapper=()):
        """Starts vmnetd, under `wrapper` (a profiler command) when given; returns the seconds
        from process start to health SERVING, measured by vmnet_wait_serving, which polls
        every 5 ms and is started first."""
        waiter = subprocess.Popen(
            [self.tools["vmnet_wait_serving"], f"--socket={self.socket}",
             f"--timeout_s={timeout}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, preexec_fn=_die_with_parent)
        time.sleep(0.05)  # let the waiter reach its polling loop
        log_file = open(os.path.join(self.workdir, "vmnetd.log"), "ab")
        started = time.monotonic()
        self.process = self.lab.spawn(self.command(wrapper), stdout=log_file,
                                      stderr=subprocess.STDOUT)
        log_file.close()
        self.pid = self.process.pid if not wrapper else None
        # An agent that exits fails the phase at once, not when the waiter gives up.
        deadline = time.monotonic() + timeout + 10
        while (waiter.poll() is None and self.process.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.05)
        if waiter.poll() is None:
            waiter.kill()
        out, err = waiter.communicate()
        if waiter.returncode != 0 or self.process.poll() is not None:
            raise BenchError(f"vmnetd in {self.ns} did not become SERVING: {err.strip()}\n"
                             f"log tail:\n{self.log_tail()}")
        if self.pid is None:
            self.pid = find_descendant(self.process.pid, os.path.basename(self.binary))
            self.lab.wrapped_pids.append(self.pid)
        return json.loads(out.strip().splitlines()[-1])["serving_at"] - started

    def stop(self):
        """SIGTERM to vmnetd; waits for it (and its wrapper, which may then write its data
        for minutes) to exit. Returns the seconds vmnetd took to exit."""
        if self.process is None:
            return 0.0
        if self.pid == self.process.pid:
            took = stop_process(self.process)
        else:
            start = time.monotonic()
            try:
                os.kill(self.pid, signal.SIGTERM)
                while os.path.exists(f"/proc/{self.pid}") and time.monotonic() - start < 15:
                    time.sleep(0.02)
            except ProcessLookupError:
                pass
            took = time.monotonic() - start
            try:
                self.process.wait(600)
            except subprocess.TimeoutExpired:
                stop_process(self.process)
        self.lab.processes.remove(self.process)
        self.process = self.pid = None
        return took

    def log_tail(self, lines=20):
        try:
            with open(os.path.join(self.workdir, "vmnetd.log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def rss_kib(self):
        with open(f"/proc/{self.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))

    def thread_cpu_seconds(self):
        """{tid: (thread name, CPU seconds)} of vmnetd's threads."""
        out = {}
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{tid}/stat") as f:
                    head, tail = f.read().rsplit(")", 1)
            except OSError:
                continue
            fields = tail.split()
            out[tid] = (head.split("(", 1)[1],
                        (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
        return out

    def cpu_seconds(self):
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def scrape(self):
        """(seconds, bytes) of one GET /metrics, timed by curl."""
        return curl_time(self.ns, f"http://{METRICS}/metrics")

    def metric(self, name):
        """{labels: value} of every series of metric `name` in one scrape."""
        body = run("ip", "netns", "exec", self.ns, "curl", "-sf", f"http://{METRICS}/metrics",
                   timeout=60).stdout
        series = {}
        for line in body.splitlines():
            m = re.match(rf"^{name}(?:{{(.*)}})? (\S+)$", line)
            if m:
                series[m.group(1) or ""] = float(m.group(2))
        return series

    def metric_sum(self, name):
        return sum(self.metric(name).values())

    def metric_sums(self, *names):
        """{name: the sum of its series} of several metrics, from one scrape (a scrape of
        10,000 VMs takes most of a second)."""
        body = run("ip", "netns", "exec", self.ns, "curl", "-sf", f"http://{METRICS}/metrics",
                   timeout=60).stdout
        sums = dict.fromkeys(names, 0.0)
        for line in body.splitlines():
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:{.*})? (\S+)$", line)
            if m and m.group(1) in sums:
                sums[m.group(1)] += float(m.group(2))
        return sums

    def wait_quiet(self, timeout=20.0, window=0.5, busy=0.05):
        """Polls the agent's CPU until it used less than `busy` of a core over `window` s (its
        last change's work and announcements are over), or `timeout` s passed. Returns (quiet,
        seconds waited)."""
        start = time.monotonic()
        while True:
            cpu, began = self.cpu_seconds(), time.monotonic()
            time.sleep(window)
            used = self.cpu_seconds() - cpu
            if used < busy * (time.monotonic() - began):
                return True, time.monotonic() - start
            if time.monotonic() - start > timeout:
                return False, time.monotonic() - start


def thread_cpu_delta(before, after):
    """{thread name: CPU seconds} used between two Agent.thread_cpu_seconds(): summed over the
    threads of a name, except "vmnetd" (the main thread and unnamed ones: the busiest)."""
    by_name = {}
    for tid, (name, seconds) in after.items():
        by_name.setdefault(name, []).append(seconds - before.get(tid, (name, 0.0))[1])
    return {name: round(max(v) if name == "vmnetd" else sum(v), 3)
            for name, v in by_name.items() if max(v) >= 0.01}


def find_descendant(pid, comm):
    """The pid of the first process named `comm` below `pid` (breadth first)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                head, tail = f.read().rsplit(")", 1)
        except OSError:
            continue
        children.setdefault(int(tail.split()[1]), []).append((int(entry), head.split("(", 1)[1]))
    queue = [pid]
    while queue:
        for child, name in children.get(queue.pop(0), []):
            if name == comm[:15]:
                return child
            queue.append(child)
    raise BenchError(f"no process {comm} below pid {pid}")


def curl_time(ns, url):
    out = run("ip", "netns", "exec", ns, "curl", "-s", "-o", "/dev/null", "-w",
              "%{http_code} %{size_download} %{time_total}", url, timeout=60).stdout.split()
    if out[0] != "200":
        raise BenchError(f"GET {url} in {ns} answered {out[0]}")
    return float(out[2]), int(out[1])


# -- profiling (optional) ---------------------------------------------------------------------

class Profiler:
    """With --profile DIR: `perf record` around each phase, and reports in DIR/<phase>.txt:
    self time by library and symbol, inclusive time (self and callees) by symbol, time by
    thread name.

    A phase with a running vmnetd (pid given) records that process with DWARF call graphs, so
    that inclusive costs through vmnetd's functions are right although Debian's libraries
    have no frame pointers. A phase without one (the `ip` baselines) records the whole system
    with frame-pointer call graphs (right for the kernel) and reports the processes named
    `comm`. A restart runs vmnetd under `perf record` (wrapper()) from its first instruction."""

    def __init__(self, lab, directory):
        self.lab, self.directory = lab, directory
        if directory:
            os.makedirs(directory, exist_ok=True)

    def phase(self, name, pid=None, comm=None):
        return _ProfiledPhase(self, name, pid, comm)

    def data_path(self, name):
        return os.path.join(self.directory, f"{name}.perf.data")

    def wrapper(self, name):
        """The command prefix that runs a program under perf record for phase `name`."""
        if not self.directory:
            return []
        return ["perf", "record", "-q", "-o", self.data_path(name), "-F", "499",
                "--call-graph", "dwarf,16384", "--"]

    PROCESS_SECTIONS = (
        ("self time by library and symbol",
         ["--no-children", "--sort", "dso,symbol", "--percent-limit", "0.5"]),
        ("inclusive time (self and callees) by symbol",
         ["--children", "--sort", "symbol", "--percent-limit", "2"]),
        ("time by thread name", ["--no-children", "--sort", "comm", "--percent-limit", "0.5"]))
    SYSTEM_SECTIONS = (
        ("whole machine: time by thread name",
         ["--no-children", "--sort", "comm", "--percent-limit", "1"]),
        ("whole machine: self time by thread name and symbol",
         ["--no-children", "--sort", "comm,symbol", "--percent-limit", "0.7"]))

    def report(self, name, select=(), sections=PROCESS_SECTIONS, data_suffix="", append=False,
               keep=False):
        """Writes (or with `append` adds to) DIR/<name>.txt from <name><data_suffix>.perf.data,
        which is then deleted unless `keep`."""
        path = os.path.join(self.directory, f"{name}.txt")
        data = self.data_path(name + data_suffix)
        with open(path, "a" if append else "w") as out:
            for title, options in sections:
                out.write(f"===== {name}: {title}; {' '.join(select) or 'all samples'} =====\n")
                result = run("perf", "report", "-i", data, "--stdio", "--no-inline", "-g",
                             "none", *select, *options, timeout=900, check=False)
                out.write(tidy_report(result.stdout) if result.returncode == 0
                          else result.stderr)
                out.write("\n")
        if not keep:
            os.remove(data)  # large; the report is what is kept
        log(f"profile of {name}: {path}")


def tidy_report(text, width=220):
    """perf report --stdio without its comment lines, column padding and empty IPC columns."""
    lines = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        line = re.sub(r"\s+-\s+-\s*$", "", line)
        lines.append(re.sub(r" {3,}", "  ", line)[:width])
    return "\n".join(lines) + "\n"


class _ProfiledPhase:
    def __init__(self, profiler, name, pid, comm):
        self.profiler, self.name, self.pid, self.comm = profiler, name, pid, comm
        self.processes = []

    def _record(self, data, target):
        self.processes.append(self.profiler.lab.spawn(
            ["perf", "record", "-q", "-o", data] + target,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def __enter__(self):
        if not self.profiler.directory:
            return self
        data = self.profiler.data_path(self.name)
        if self.pid:
            self._record(data, ["-p", str(self.pid), "-F", "499", "--call-graph", "dwarf,16384"])
            # Also the whole machine, lightly: kernel work the process causes may run in
            # kernel threads (link events are handled by a kworker).
            self._record(self.profiler.data_path(self.name + ".system"), ["-a", "-F", "199", "-g"])
        else:
            self._record(data, ["-a", "-F", "499", "-g"])
        time.sleep(1.0)  # perf needs a moment before it samples
        return self

    def __exit__(self, *exc):
        for process in self.processes:
            process.send_signal(signal.SIGINT)
        for process in self.processes:
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                process.kill()
            self.profiler.lab.processes.remove(process)
        if not self.processes or exc[0] is not None:
            return
        if self.pid:
            self.profiler.report(self.name)
            self.profiler.report(self.name, sections=Profiler.SYSTEM_SECTIONS,
                                 data_suffix=".system", append=True)
        else:
            self.profiler.report(self.name, ["--comm", self.comm] if self.comm else [],
                                 keep=True)
            self.profiler.report(self.name, sections=Profiler.SYSTEM_SECTIONS, append=True)


class HeapProfiler:
    """With --heaptrack DIR: vmnetd of host a runs under heaptrack for the storm (its first
    start) and from its last restart to the end (scrapes, lists, drift repair); the
    allocation sites holding the most memory at the peak are written to DIR/<name>.txt."""

    def __init__(self, directory):
        self.directory = directory
        if directory:
            os.makedirs(directory, exist_ok=True)

    def wrapper(self, name):
        if not self.directory:
            return []
        return ["heaptrack", "-o", os.path.join(self.directory, name)]

    def report(self, name):
        if not self.directory:
            return
        data = [f for f in os.listdir(self.directory)
                if f.startswith(name + ".") and not f.endswith(".txt")]
        if not data:
            log(f"heaptrack wrote no data for {name}")
            return
        path = os.path.join(self.directory, f"{name}.txt")
        result = run("heaptrack_print", "-f", os.path.join(self.directory, data[0]), "-p", "1",
                     "-a", "0", "-T", "0", "-n", "15", "-s", "3", timeout=900, check=False)
        with open(path, "w") as out:
            out.write(result.stdout if result.returncode == 0 else result.stderr)
        log(f"heap profile of {name}: {path}")


# -- the measurements -------------------------------------------------------------------------

class Bench:
    def __init__(self, args, lab, binaries, workdir):
        self.args, self.lab, self.workdir = args, lab, workdir
        self.vmnetd = binaries["vmnetd"]
        self.tools = binaries
        self.n = args.vms
        self.results = {"vms": self.n, "quick": args.quick}
        self.failures = []
        self.completed = False
        self.profiler = Profiler(lab, args.profile)
        self.heap = HeapProfiler(args.heaptrack)

    def check(self, ok, message):
        if not ok:
            self.failures.append(message)
            log(f"CHECK FAILED: {message}")

    def check_objects(self, ns, who, want=None):
        want = self.n if want is None else want
        routes, proxies, addresses = count_kernel_objects(ns)
        self.check(routes == want and proxies == want and addresses == want,
                   f"{who}: {routes} routes, {proxies} proxy entries, {addresses} gateway "
                   f"addresses in {ns}; want {want} each")

    def baseline_attach(self, ns, order, key, bandwidth=False):
        """`ip -batch` installing the objects vmnetd installs for N VMs. order "kind": all links
        up, then all gateway addresses, routes, proxy entries (the fastest order found: a link
        coming up makes the kernel walk every neighbour and proxy entry, so bringing links up
        before any proxy entry exists avoids a quadratic cost). order "vm": VM by VM, the order
        in which VMs arrive on a host (shown for information). With `bandwidth` (issue 15),
        the ip batch also creates every VM's ifb device (up, no IPv6 address generation;
        first, before any proxy entry),
        and `tc -batch` then installs the qdiscs and filters (tc_batches): timed apart, the
        baseline is their sum."""
        ifb_lines, tc_lines = tc_batches(self.n, order) if bandwidth else ([], [])
        per_vm = []
        for i in range(self.n):
            dev, address = interface(i), vm_address(i)
            per_vm.append((ifb_lines[i] if bandwidth else []) + [
                           f"link set dev {dev} up",
                           # iproute2 6.1 cannot mark an address with a protocol (vmnetd
                           # does: one attribute more, the same kernel work).
                           f"addr add {GATEWAY}/32 dev {dev} scope link noprefixroute",
                           f"route add {address}/32 dev {dev} scope link proto {PROTOCOL}",
                           f"neigh add proxy {address} dev {UPLINK} proto {PROTOCOL}"])
        if order == "kind":
            lines = [vm[k] for k in range(len(per_vm[0])) for vm in per_vm]
        else:
            lines = [line for vm in per_vm for line in vm]
        path = os.path.join(self.workdir, f"{key}.batch")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        base = self.nft_base() if order == "kind" else None
        if base:
            # vmnetd installs its tables when it starts, before any VM: not timed here either.
            base_path = os.path.join(self.workdir, "nft-base.nft")
            with open(base_path, "w") as f:
                f.write(base)
            self.results["nft_base_load_s"] = timed("ip", "netns", "exec", ns, "nft", "-f",
                                                    base_path)
        cpu = []
        with self.profiler.phase(key, comm="ip"):
            seconds = timed("ip", "-n", ns, "-batch", path, timeout=120 + self.n * 0.05, cpu=cpu)
        self.check_objects(ns, f"ip -batch ({order} order)")
        self.results[f"{key}_s"] = seconds
        self.results[f"{key}_cpu_s"] = cpu[0]
        log(f"ip -batch ({order} order) installed {len(lines)} objects in {seconds:.3f} s "
            f"(CPU {cpu[0]:.2f} s)")
        if bandwidth:
            tc_path = os.path.join(self.workdir, f"{key}.tc")
            with open(tc_path, "w") as f:
                f.write("\n".join(tc_lines) + "\n")
            cpu = []
            with self.profiler.phase(f"{key}_tc", comm="tc"):
                tc_s = timed("tc", "-n", ns, "-batch", tc_path, timeout=120 + self.n * 0.05,
                             cpu=cpu)
            self.results[f"{key}_tc_s"] = tc_s
            self.results[f"{key}_tc_cpu_s"] = cpu[0]
            self.check_bandwidth(ns, f"tc -batch ({order} order)", key)
            log(f"tc -batch ({order} order) installed {len(tc_lines)} objects in {tc_s:.3f} s "
                f"(CPU {cpu[0]:.2f} s); ip -batch + tc -batch {seconds + tc_s:.3f} s")
        if base:
            # Median of 3 loads (1 with --quick): nft -f of 10,000 VMs' elements took 1.0 to
            # 3.5 s on this shared machine. Between loads vmnetd's tables are deleted and the
            # base loaded again; the last load stays for the checks.
            elements = os.path.join(self.workdir, "nft-elements.nft")
            nft_elements_file(elements, self.n)
            times, cpu = [], []
            for attempt in range(1 if self.args.quick else 3):
                if attempt:
                    run("ip", "netns", "exec", ns, "nft", "delete table inet vmnet; "
                        "delete table arp vmnet", timeout=120)
                    run("ip", "netns", "exec", ns, "nft", "-f", base_path, timeout=120)
                    time.sleep(0.5)
                with self.profiler.phase(f"{key}_nft_{attempt}", comm="nft"):
                    times.append(timed("ip", "netns", "exec", ns, "nft", "-f", elements,
                                       timeout=120 + self.n * 0.05, cpu=cpu))
            nft_s = statistics.median(times)
            cpu = [statistics.median(cpu)]
            self.results[f"{key}_nft_times_s"] = times
            counts = nft_objects(ns)
            wrong = nft_per_vm_mismatches(counts, self.n)
            self.check(not wrong, f"nft -f (baseline): {', '.join(wrong)} in {ns}")
            if not bandwidth:
                self.results["nft_objects_baseline"] = counts
                self.results["nft_rules_baseline"] = nft_rule_count(ns)
            self.results[f"{key}_nft_s"] = nft_s
            self.results[f"{key}_nft_cpu_s"] = cpu[0]
            log(f"nft -f installed port security's {10 * self.n} per-VM objects in "
                f"{', '.join(f'{t:.3f}' for t in times)} s (median CPU {cpu[0]:.2f} s); "
                f"ip -batch{' + tc -batch' if bandwidth else ''} + nft -f "
                f"{seconds + self.results.get(f'{key}_tc_s', 0.0) + nft_s:.3f} s")

    def check_bandwidth(self, ns, who, key):
        """Every VM's bandwidth objects are in `ns`, exactly right (tc_objects); records the
        counts under <key>_tc_objects."""
        counts = tc_objects(ns, self.n)
        self.results[f"{key}_tc_objects"] = counts
        wrong = [f"{k}: {v}" for k, v in counts.items() if v != self.n]
        self.check(not wrong, f"{who}: {', '.join(wrong)} in {ns}; want {self.n} each")
        return counts

    def nft_base(self):
        """vmnetd's base ruleset (its tables, chains, rules and constant sets; no VM), as the
        agent installs it, for the baseline to load with `nft -f`: dumped once from a vmnetd
        with 0 VMs in a host of its own (host n) and cached. None when port security is off
        in --agent-flags, or when this vmnetd installs no nftables table (a build without
        port security): the baseline then installs no nftables objects, like the agent."""
        if hasattr(self, "_nft_base"):
            return self._nft_base
        self._nft_base = None
        if not port_security_enabled(self.args.agent_flags):
            log("port security is off in --agent-flags: the baseline installs no nftables")
            return None
        if not self.port_security_supported():
            return None
        self.lab.add_host("n", 0)
        try:
            agent = Agent(self.lab, self.lab.host("n"), self.vmnetd, self.tools,
                          os.path.join(self.workdir, "agent-n"), self.args.agent_flags)
            agent.start()
            counts, _ = wait_nft(agent.ns, lambda c: "inet rules" in c and "arp rules" in c,
                                 5.0)
            dump = run("ip", "netns", "exec", agent.ns, "nft", "list", "ruleset").stdout
            agent.stop()
        finally:
            self.lab.remove_host("n")
        if "inet rules" not in counts:
            log("this vmnetd installed no nftables table with 0 VMs: no port security; the "
                "baseline installs no nftables objects")
            self.results["nft_base"] = None
            return None
        text, rewritten = nft_base_from_dump(dump)
        self.results["nft_base"] = {"objects": counts, "rewritten_rules": rewritten,
                                    "lines": text.count("\n")}
        log(f"vmnetd's base ruleset with 0 VMs: {counts.get('inet rules', 0)} + "
            f"{counts.get('arp rules', 0)} rules ({rewritten} rewritten to be loadable)")
        self._nft_base = text
        return text

    def storm(self, agent, watchers, key, before_scrape=None, extra=(), store=True):
        """One attach storm of N VMs; `before_scrape` runs after it and before /metrics is
        read (a scrape leaves its memory in the agent's RSS); `extra`: more flags of
        vmnet_attach_storm. Recorded under results[key] unless `store` is False."""
        counters = ("vmnet_reconcile_passes_total", "vmnet_kernel_writes_total")
        before = {} if self.heap.directory else agent.metric_sums(*counters)
        cpu = agent.cpu_seconds()
        threads = agent.thread_cpu_seconds()
        with self.profiler.phase(key, pid=agent.pid):
            result = run_json(self.tools["vmnet_attach_storm"], f"--target={agent.target}",
                              f"--count={self.n}", "--concurrency=256", "--channels=4",
                              f"--watchers={watchers}", "--timeout_s=400", *extra,
                              timeout=480 + self.n * 0.01)
        result["agent_cpu_s"] = agent.cpu_seconds() - cpu
        # Per thread: the reconciler is the busiest "vmnetd" thread (the main thread waits).
        after = agent.thread_cpu_seconds()
        if before_scrape:
            before_scrape()
        if not self.heap.directory:  # a scrape would be the heap profile's peak
            sums = agent.metric_sums(*counters)
            result["reconcile_passes"] = sums[counters[0]] - before[counters[0]]
            result["kernel_writes"] = sums[counters[1]]  # since the agent started
            result["storm_kernel_writes"] = sums[counters[1]] - before[counters[1]]
        result["thread_cpu_s"] = thread_cpu_delta(threads, after)
        if store:
            self.results[key] = result
        self.check(result["ok"], f"{key}: {json.dumps(result)[:600]}")
        log(f"{key}: {self.n} attaches in {result['wall_s']:.3f} s "
            f"(agent CPU {result['agent_cpu_s']:.2f} s, client CPU {result['client_cpu_s']:.2f} s)"
            + (f", {result.get('watchers_complete')}/{watchers} watchers saw every event"
               if watchers else ""))
        return result

    def attach_and_memory(self, agent):
        agent.start(wrapper=self.heap.wrapper("storm"))
        time.sleep(1.0)
        self.results["memory"] = {"rss_empty_kib": agent.rss_kib()}

        def settle_and_note_rss():
            time.sleep(2.0)
            self.note_rss(agent, "after_storm")

        self.storm(agent, 0, "storm", before_scrape=settle_and_note_rss)
        self.check_objects(agent.ns, "vmnetd")
        if self.nft_base():  # port security on, and this vmnetd has it
            self.check_nft(agent.ns, "vmnetd", self.n)
        self.results["stop_s"] = agent.stop()
        self.heap.report("storm")

    def check_nft(self, ns, who, vms, timeout=30.0):
        """Port security's per-VM objects for `vms` VMs are all in `ns` (waited for up to
        `timeout` s: PROGRAMMED need not wait for them); returns nft_objects(ns)."""
        counts, waited = wait_nft(ns, lambda c: not nft_per_vm_mismatches(c, vms), timeout)
        wrong = nft_per_vm_mismatches(counts, vms)
        self.check(not wrong, f"{who}: nftables objects {', '.join(wrong)} in {ns} after "
                              f"{waited:.1f} s")
        if waited > 0:
            log(f"{who}: nftables objects not all there at first; complete within "
                f"{waited:.1f} s")
        return counts

    def note_rss(self, agent, when):
        """Records vmnetd's RSS now, and (RSS - RSS empty) / N."""
        memory = self.results["memory"]
        memory[f"rss_{when}_kib"] = rss = agent.rss_kib()
        memory[f"per_vm_{when}_kib"] = (rss - memory["rss_empty_kib"]) / self.n
        log(f"RSS {rss} KiB {when.replace('_', ' ')}: "
            f"{memory[f'per_vm_{when}_kib']:.2f} KiB per VM over the empty agent's "
            f"{memory['rss_empty_kib']} KiB")

    def watch_fanout(self, agent):
        """Issue 16's fan-out row, on host c alone: R rounds (--watch-rounds; 3, 1 with
        --quick) of one storm without watchers and one with FANOUT_WATCHERS, in ABBA order
        (without, with, with, without, ...), on one agent. Every storm but the last is
        followed by a detach storm and the links' reset (reset_links), so that each storm
        starts from zero VMs on the same links in the same state; the agent is let go quiet
        before each. The row is median(with) / median(without) of these samples, each one
        recorded; then the idle watchers, on the last storm's N VMs."""
        rounds = self.args.watch_rounds or (1 if self.args.quick else FANOUT_ROUNDS)
        order = []
        for r in range(rounds):
            order += [0, FANOUT_WATCHERS] if r % 2 == 0 else [FANOUT_WATCHERS, 0]
        began = time.monotonic()
        # Links come up once and go down again before the agent starts: the kernel gives a
        # link its default qdisc the first time it comes up and keeps it, so without this the
        # first storm alone would pay for 10,000 qdiscs.
        self.reset_links(agent.ns, up_first=True)
        reference = link_state(agent.ns, self.sample_links())
        agent.start()
        samples = []
        for i, watchers in enumerate(order):
            label = "with" if watchers else "without"
            quiet, waited = agent.wait_quiet()
            load = os.getloadavg()[0]
            result = self.storm(agent, watchers, f"watch_{i + 1}_{label}", store=False)
            result.update(sample=i + 1, round=i // 2 + 1, quiet_before=quiet,
                          quiet_wait_s=waited, load_average_1min=load)
            samples.append(result)
            if i + 1 < len(order):
                result["detach"] = self.detach_storm(agent, f"watch_{i + 1}_detach")
                started = time.monotonic()
                self.reset_links(agent.ns)
                result["reset_links_s"] = time.monotonic() - started
                state = link_state(agent.ns, self.sample_links())
                changed = [line for link in state for line in difflib.unified_diff(
                    reference[link].splitlines(), state[link].splitlines(), lineterm="", n=0)
                    if line[:1] in "+-" and line[:3] not in ("+++", "---")]
                self.check(not changed,
                           f"watch fan-out: after detaching sample {i + 1}, links "
                           f"{self.sample_links()} differ from before the first storm: "
                           f"{'; '.join(changed)[:1500]}")
        self.check_objects(agent.ns, "vmnetd (watch fan-out, last storm)")
        with_ = [x for x in samples if x["watchers"]]
        without = [x for x in samples if not x["watchers"]]

        def median(xs, key):
            return statistics.median(x[key] for x in xs)

        fanout = {
            "watchers": FANOUT_WATCHERS, "rounds": rounds, "order": order,
            "median_with_s": median(with_, "wall_s"),
            "median_without_s": median(without, "wall_s"),
            "median_agent_cpu_with_s": median(with_, "agent_cpu_s"),
            "median_agent_cpu_without_s": median(without, "agent_cpu_s"),
            "all_seen": all(x.get("watchers_complete") == x["watchers"] and
                            x.get("watch_revision_gaps") == 0 and
                            x.get("watch_duplicates") == 0 for x in with_),
            "samples": samples,
        }
        fanout["ratio"] = fanout["median_with_s"] / fanout["median_without_s"]
        fanout["cpu_ratio"] = (fanout["median_agent_cpu_with_s"] /
                               fanout["median_agent_cpu_without_s"])
        threads = sorted({name for x in samples for name in x.get("thread_cpu_s", {})})
        fanout["median_thread_cpu_s"] = {
            label: {name: round(statistics.median(x.get("thread_cpu_s", {}).get(name, 0.0)
                                                  for x in xs), 3) for name in threads}
            for label, xs in (("with", with_), ("without", without))}
        fanout["rounds_s"] = time.monotonic() - began
        self.results["watch_fanout"] = fanout
        log(f"watch fan-out: {rounds} round{'s' if rounds > 1 else ''} in "
            f"{fanout['rounds_s']:.0f} s; storm wall s "
            + ", ".join(f"{'with' if x['watchers'] else 'without'} {x['wall_s']:.3f}"
                        for x in samples)
            + f"; median with / without {fanout['median_with_s']:.3f} / "
            f"{fanout['median_without_s']:.3f} = {fanout['ratio']:.2f}; vmnetd CPU "
            f"{fanout['median_agent_cpu_with_s']:.2f} / "
            f"{fanout['median_agent_cpu_without_s']:.2f} s")
        self.idle_watchers(agent)
        agent.stop()
        fanout["phase_s"] = time.monotonic() - began

    def sample_links(self):
        """The links whose state reset_links is checked on: the first VM's and the last's."""
        return sorted({interface(0), interface(self.n - 1)})

    def detach_storm(self, agent, key):
        """DetachVm of the N VMs, 256 in flight over 4 connections (vmnet_attach_storm
        --detach), each answered OK; then the host must hold none of their objects (kernel
        and, with port security, nftables)."""
        cpu, threads = agent.cpu_seconds(), agent.thread_cpu_seconds()
        with self.profiler.phase(key, pid=agent.pid):
            result = run_json(self.tools["vmnet_attach_storm"], f"--target={agent.target}",
                              f"--count={self.n}", "--concurrency=256", "--channels=4",
                              "--detach", "--timeout_s=400", timeout=480 + self.n * 0.01)
        result["agent_cpu_s"] = agent.cpu_seconds() - cpu
        result["thread_cpu_s"] = thread_cpu_delta(threads, agent.thread_cpu_seconds())
        self.check(result["ok"], f"detach storm: {json.dumps(result)[:600]}")
        self.check_objects(agent.ns, "vmnetd after the detach storm", want=0)
        counts, _ = wait_nft(agent.ns, lambda c: not nft_per_vm_mismatches(c, 0), 30.0)
        wrong = nft_per_vm_mismatches(counts, 0)
        self.check(not wrong, f"detach storm: nftables objects left: {', '.join(wrong)}")
        log(f"detach storm: {self.n} detaches in {result['wall_s']:.3f} s (agent CPU "
            f"{result['agent_cpu_s']:.2f} s)")
        return {k: result[k] for k in ("wall_s", "agent_cpu_s", "client_cpu_s", "ok",
                                       "thread_cpu_s")}

    def reset_links(self, ns, up_first=False):
        """Puts the N VM links back as the lab built them, as far as an attach can tell: down
        (DetachVm leaves a link's up/down state alone) with IPv4 forwarding on (DetachVm turns
        it off; the host was built forwarding). With `up_first`, each link comes up first."""
        lines = [f"link set dev {interface(i)} down" for i in range(self.n)]
        if up_first:
            lines = [f"link set dev {interface(i)} up" for i in range(self.n)] + lines
        run("ip", "-n", ns, "-batch", "-", input="\n".join(lines) + "\n",
            timeout=120 + self.n * 0.02)
        path = os.path.join(self.workdir, "forwarding.conf")
        with open(path, "w") as f:
            f.writelines(f"net.ipv4.conf.{interface(i)}.forwarding = 1\n"
                         for i in range(self.n))
        run("ip", "netns", "exec", ns, "sysctl", "-q", "-p", path, timeout=120 + self.n * 0.01)

    def idle_watchers(self, agent):
        """After the fan-out rounds (N VMs, no changes): the agent's CPU over `hold` seconds
        alone, then with IDLE_WATCHERS idle Watch streams (progress every IDLE_PROGRESS_MS),
        and its RSS before and after they opened."""
        hold = 3.0 if self.args.quick else 10.0
        time.sleep(3.0)  # the storm's announcements are over
        cpu = agent.cpu_seconds()
        time.sleep(hold)
        result = {"hold_s": hold, "agent_cpu_alone_s": agent.cpu_seconds() - cpu,
                  "rss_before_kib": agent.rss_kib()}
        stop_file = os.path.join(self.workdir, "idle-stop")
        ready_file = os.path.join(self.workdir, "idle-ready")
        process = self.lab.spawn(
            [self.tools["vmnet_idle_watchers"], f"--target={agent.target}",
             f"--watchers={IDLE_WATCHERS}", f"--progress_interval_ms={IDLE_PROGRESS_MS}",
             f"--ready_file={ready_file}", f"--stop_file={stop_file}", "--duration_s=120"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 40
            while not os.path.exists(ready_file):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise BenchError("idle watchers: vmnet_idle_watchers did not get its "
                                     f"streams in place: {process.stderr.read()[:600]}")
                time.sleep(0.01)
            time.sleep(1.0)  # the streams' set-up is over
            result["rss_with_kib"] = agent.rss_kib()
            cpu = agent.cpu_seconds()
            time.sleep(hold)
            result["agent_cpu_with_s"] = agent.cpu_seconds() - cpu
        finally:
            with open(stop_file, "w"):
                pass
        out, err = process.communicate(timeout=60)
        if process in self.lab.processes:
            self.lab.processes.remove(process)
        try:
            result.update(json.loads(out.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            raise BenchError(f"idle watchers: no JSON from vmnet_idle_watchers: {err[:600]}")
        result["rss_per_watcher_kib"] = ((result["rss_with_kib"] - result["rss_before_kib"]) /
                                         IDLE_WATCHERS)
        result["cpu_per_watcher_ms_per_s"] = (
            (result["agent_cpu_with_s"] - result["agent_cpu_alone_s"]) * 1000 /
            IDLE_WATCHERS / hold)
        self.results["idle_watchers"] = result
        self.check(result["ok"], f"idle watchers: {json.dumps(result)[:600]}")
        log(f"idle watchers: {IDLE_WATCHERS} streams, RSS +{result['rss_per_watcher_kib']:.1f} "
            f"KiB each; agent CPU over {hold:.0f} s: {result['agent_cpu_alone_s']:.3f} s alone, "
            f"{result['agent_cpu_with_s']:.3f} s with them; "
            f"{result['progress_messages']} progress messages")

    def getvm_loop(self, agent, vm_id, name, seconds=None, stop_file=None, ready_file=None):
        """Starts vmnet_getvm_latency on `vm_id` (GetVm in a closed loop, one call in flight,
        GETVM_GAP_US between an answer and the next call) for `seconds` or until `stop_file`
        exists; returns (process, samples file)."""
        samples = os.path.join(self.workdir, f"getvm-{name}.txt")
        cmd = [self.tools["vmnet_getvm_latency"], f"--target={agent.target}",
               f"--vm_id={vm_id}", f"--gap_us={GETVM_GAP_US}", f"--samples={samples}",
               f"--control={GETVM_CONTROL}",
               f"--duration_s={seconds if seconds else 900}"]
        if stop_file:
            cmd.append(f"--stop_file={stop_file}")
        if ready_file:
            cmd.append(f"--ready_file={ready_file}")
        return self.lab.spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True), samples

    def getvm_result(self, process, samples, name, window=None):
        """Waits for a vmnet_getvm_latency run; returns GetVm's statistics, over the calls
        that overlapped `window` (start, end) when given, else over all of them, and the
        control calls' (Health/Check, same loop, same window) under "control"."""
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"vmnet_getvm_latency ({name}) did not stop") from e
        finally:
            if process in self.lab.processes:
                self.lab.processes.remove(process)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if not lines:
            raise BenchError(f"vmnet_getvm_latency ({name}) printed no result "
                             f"({process.returncode}): {err.strip()[:2000]}")
        tool = json.loads(lines[-1])
        calls = {"getvm": [], GETVM_CONTROL: []}
        with open(samples) as f:
            for line in f:
                start, latency, method = line.split()
                calls[method].append((float(start), float(latency)))
        if window:
            calls = {m: [(t, lat) for t, lat in c if t < window[1] and t + lat > window[0]]
                     for m, c in calls.items()}
        result = latency_stats([lat for _, lat in calls["getvm"]])
        result.update(calls_total=tool["count"], errors=tool["errors"],
                      error_codes=tool["error_codes"], first_error=tool["first_error"])
        self.check(tool["count"] > 0 and tool["errors"] == 0 and result["count"] > 0,
                   f"GetVm {name}: {result['count']} calls measured, {tool['errors']} errors "
                   f"{tool['error_codes']} {tool['first_error']}; {err.strip()[:300]}")
        ctool = tool["control"]
        control = latency_stats([lat for _, lat in calls[GETVM_CONTROL]])
        control.update(method=ctool["method"], calls_total=ctool["count"],
                       errors=ctool["errors"], error_codes=ctool["error_codes"],
                       first_error=ctool["first_error"])
        self.check(ctool["count"] > 0 and ctool["errors"] == 0 and control["count"] > 0,
                   f"control {ctool['method']} {name}: {control['count']} calls measured, "
                   f"{ctool['errors']} errors {ctool['error_codes']} {ctool['first_error']}")
        self.check(tool["ok"], f"vmnet_getvm_latency ({name}) failed: {err.strip()[:300]}")
        result["control"] = control
        log(f"GetVm {name}: {result['count']} calls, p50 {result['p50_ms']:.3f} ms, "
            f"p99 {result['p99_ms']:.3f} ms, max {result['max_ms']:.3f} ms; control "
            f"Health/Check: {control['count']} calls, p50 {control['p50_ms']:.3f} ms, "
            f"p99 {control['p99_ms']:.3f} ms, max {control['max_ms']:.3f} ms")
        return result

    def getvm_during_storm(self, agent, idle_seconds):
        """GetVm latency while the agent is idle and during the N-VM attach storm (issue 11:
        readers must not wait for the writer's disk writes). The host has N+1 taps; VM N, not
        one of the storm's, is attached first and is the one read. Idle: the agent holding
        that one VM, i.e. the state just before the storm (GetVm is a lookup by id, so it
        does not depend on how many VMs are held; the same loop after the storm, holding
        N+1, is recorded for information). During the storm: the same loop, one call in
        flight on its own connection, started before the storm; the calls that overlapped
        the storm (first AttachVm to last answer) are counted. The loop alternates GetVm with
        the control, grpc.health.v1.Health/Check (no reconciler state): the control's p99
        ratio is what the machine alone adds in the same windows."""
        agent.start()
        vm_id = f"bench-{self.n}"
        probe = run_json(self.tools["vmnet_attach_storm"], f"--target={agent.target}",
                         f"--first={self.n}", "--count=1", "--concurrency=1", "--channels=1",
                         "--timeout_s=30", timeout=60)
        if not probe["ok"]:
            raise BenchError(f"GetVm: attaching {vm_id} failed: {json.dumps(probe)[:600]}")
        time.sleep(1.0)  # the probe's announcements and its reconcile pass are over
        result = {"vm_id": vm_id, "gap_us": GETVM_GAP_US}
        process, samples = self.getvm_loop(agent, vm_id, "idle", seconds=idle_seconds)
        result["idle"] = self.getvm_result(process, samples, "idle")

        stop_file = os.path.join(self.workdir, "getvm-stop")
        ready_file = os.path.join(self.workdir, "getvm-ready")
        process, samples = self.getvm_loop(agent, vm_id, "storm", stop_file=stop_file,
                                           ready_file=ready_file)
        try:
            deadline = time.monotonic() + 15
            while not os.path.exists(ready_file):
                if process.poll() is not None:
                    raise BenchError("GetVm: vmnet_getvm_latency ended before its loop ran: "
                                     f"{process.stderr.read().strip()[:600]}")
                if time.monotonic() > deadline:
                    raise BenchError("GetVm: vmnet_getvm_latency's loop did not start in 15 s")
                time.sleep(0.01)
            time.sleep(0.2)  # a few calls before the storm, as a reader that was there
            storm = self.storm(agent, 0, "getvm_storm")
            window = (storm["started_at"], storm["started_at"] + storm["wall_s"])
        finally:
            with open(stop_file, "w"):
                pass
        result["storm"] = self.getvm_result(process, samples, "during the storm", window)
        result["storm"]["window_s"] = window[1] - window[0]
        self.check_objects(agent.ns, "vmnetd (GetVm phase)", want=self.n + 1)
        time.sleep(2.0)  # the storm's announcements are over
        process, samples = self.getvm_loop(agent, vm_id, "idle_after", seconds=idle_seconds)
        result["idle_after"] = self.getvm_result(process, samples, f"idle with {self.n + 1} VMs")
        result["ratio_p99"] = (result["storm"]["p99_ms"] / result["idle"]["p99_ms"]
                               if result["idle"]["p99_ms"] > 0 else None)
        cs, ci = result["storm"]["control"], result["idle"]["control"]
        result["control_ratio_p99"] = cs["p99_ms"] / ci["p99_ms"] if ci["p99_ms"] > 0 else None
        # The same window, the same loop: what GetVm adds over a call that reads nothing.
        result["storm_p99_getvm_over_control"] = (result["storm"]["p99_ms"] / cs["p99_ms"]
                                                  if cs["p99_ms"] > 0 else None)
        self.results["getvm"] = result
        log(f"GetVm p99 during the storm / idle: {result['ratio_p99']}; control "
            f"(Health/Check) in the same windows: {result['control_ratio_p99']}")
        agent.stop()

    def restart(self, agent, repeats):
        """Restarts of the stopped agent with N VMs on a kernel that holds them all: each
        timed to SERVING, each checked for zero kernel writes. Each is paired with an `ip`
        dump of the same routes, proxy entries and addresses, run just before it while no
        agent runs."""
        if self.profiler.directory:  # an extra restart under perf, not timed
            agent.start(wrapper=self.profiler.wrapper("restart"))
            time.sleep(1.0)
            agent.stop()
            self.profiler.report("restart")
        path = os.path.join(self.workdir, "dump.batch")
        with open(path, "w") as f:
            f.write("route show table main\nneigh show proxy\naddr show\n")
        times, dump, writes, monitor_lines = [], [], [], []
        for r in range(repeats):
            dump.append(timed("ip", "-4", "-n", agent.ns, "-batch", path, timeout=120))
            monitor_path = os.path.join(self.workdir, f"monitor-{r}.txt")
            with open(monitor_path, "w") as out:
                monitor = self.lab.spawn(["ip", "-n", agent.ns, "monitor", "route", "neigh",
                                          "address"], stdout=out, stderr=subprocess.STDOUT)
            subscribed = wait_monitor_subscribed(agent.ns, monitor_path)
            last = r + 1 == repeats
            times.append(agent.start(wrapper=self.heap.wrapper("after_restart") if last else []))
            time.sleep(1.0)  # writes right after SERVING count too
            series = agent.metric("vmnet_kernel_writes_total")
            writes.append(sum(series.values()))
            if writes[-1]:
                log(f"restart {r} wrote to the kernel: "
                    f"{ {k: v for k, v in series.items() if v} }; log tail:\n"
                    f"{agent.log_tail(10)}")
            stop_process(monitor)
            self.lab.processes.remove(monitor)
            with open(monitor_path) as f:
                # What came after the marker; ip monitor's own complaint about the uplink's
                # peer in another namespace is not a change, nor the kernel's garbage
                # collection of its own multicast entries (MULTICAST_GC).
                monitor_lines.append([line.rstrip() for line in f.readlines()[subscribed:]
                                      if line.strip() and
                                      not line.startswith("Error: Peer netns reference") and
                                      not MULTICAST_GC.match(line)])
            if not last:
                agent.stop()
        changes = sum(len(lines) for lines in monitor_lines)
        self.check(max(writes) == 0 and changes == 0,
                   f"restart wrote to the kernel: vmnet_kernel_writes_total {writes}, "
                   f"ip monitor lines {[lines[:5] for lines in monitor_lines]}")
        self.results["restart"] = {"times_s": times, "median_s": statistics.median(times),
                                   "kernel_writes": writes, "monitor_lines": changes,
                                   "baseline_times_s": dump,
                                   "baseline_median_s": statistics.median(dump)}
        log(f"restart to SERVING {times} s, writes {writes}, ip monitor lines {changes}; "
            f"ip dump {dump} s")

    def scrape(self, agent, repeats):
        ours, theirs, sizes = [], [], {}
        exporter = None
        if shutil.which("prometheus-node-exporter"):
            log_file = open(os.path.join(self.workdir, "node-exporter.log"), "wb")
            exporter = self.lab.spawn(
                ["ip", "netns", "exec", agent.ns, "prometheus-node-exporter",
                 "--collector.disable-defaults", "--collector.netdev",
                 f"--web.listen-address={NODE_EXPORTER}"], stdout=log_file,
                stderr=subprocess.STDOUT)
            log_file.close()
            deadline = time.monotonic() + 20
            while run("ip", "netns", "exec", agent.ns, "curl", "-sf", "-o", "/dev/null",
                      f"http://{NODE_EXPORTER}/metrics", check=False).returncode != 0:
                if time.monotonic() > deadline or exporter.poll() is not None:
                    raise BenchError("prometheus-node-exporter did not start")
                time.sleep(0.2)
        else:
            log("prometheus-node-exporter is not installed: the scrape row has no baseline")
        try:
            with self.profiler.phase("scrape", pid=agent.pid):
                agent.scrape()  # warm-up
                if exporter:
                    curl_time(agent.ns, f"http://{NODE_EXPORTER}/metrics")
                for _ in range(repeats):
                    seconds, sizes["vmnetd_bytes"] = agent.scrape()
                    ours.append(seconds)
                    if exporter:
                        seconds, sizes["node_exporter_bytes"] = curl_time(
                            agent.ns, f"http://{NODE_EXPORTER}/metrics")
                        theirs.append(seconds)
        finally:
            if exporter:
                stop_process(exporter)
                self.lab.processes.remove(exporter)
        self.results["scrape"] = {"times_s": ours, "median_s": statistics.median(ours),
                                  "baseline_times_s": theirs,
                                  "baseline_median_s": statistics.median(theirs) if theirs else None,
                                  **sizes}
        log(f"scrape vmnetd {ours} s, node-exporter {theirs} s, {sizes}")

    def lists(self, agent, repeats):
        for what, baseline in (("routes", ["route", "show"]),
                               ("arp", ["neigh", "show", "proxy"])):
            with self.profiler.phase(f"list_{what}", pid=agent.pid):
                result = run_json(self.tools["vmnet_list_pages"], f"--target={agent.target}",
                                  f"--what={what}", "--page_size=1000", f"--repeat={repeats}",
                                  timeout=600)
            self.check(result["entries"] >= self.n,
                       f"List{what}: {result['entries']} entries, want at least {self.n}")
            times = [timed("ip", "-n", agent.ns, *baseline, timeout=120)
                     for _ in range(max(3, repeats))]
            result["baseline_times_s"] = times
            result["baseline_median_s"] = statistics.median(times)
            self.results[f"list_{what}"] = result
            log(f"List{what}: {result['entries']} entries in {result['pages']} pages, "
                f"{result['times_s']} s; ip {' '.join(baseline)} {times} s")

    def drift(self, agent, count):
        with self.profiler.phase("drift", pid=agent.pid):
            result = run_json("ip", "netns", "exec", agent.ns, self.tools["vmnet_drift_repair"],
                              f"--count={count}", f"--route_protocol={PROTOCOL}",
                              "--timeout_ms=5000", "--gap_ms=20", timeout=60 + count * 6)
        self.results["drift"] = result
        self.check(result["missed"] == 0 and result["delete_failures"] == 0,
                   f"drift repair: {result['missed']} routes not repaired within 5 s, "
                   f"{result['delete_failures']} deletes failed")
        time.sleep(0.5)
        self.check_objects(agent.ns, "vmnetd after drift repair")
        log(f"drift repair p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
            f"max {result['max_ms']:.2f} ms over {result['repaired']} repairs")
        self.drift_control(agent.ns, count)

    def drift_control(self, ns, count):
        """The floor of drift repair on this machine at this moment: the same deletes of
        routes that are not vmnetd's (protocol CONTROL_PROTOCOL, addresses 198.19.254.0/23),
        each re-added by a minimal repairer (vmnet_drift_repair --repairer), while vmnetd
        keeps running beside it."""
        routes = [f"198.19.{254 + k // 256}.{k % 256}/32 dev {interface(k % self.n)} "
                  f"scope link proto {CONTROL_PROTOCOL}" for k in range(min(count, 512))]
        run("ip", "-n", ns, "-batch", "-", input="".join(f"route add {r}\n" for r in routes))
        repairer = self.lab.spawn(["ip", "netns", "exec", ns, self.tools["vmnet_drift_repair"],
                                   "--repairer", f"--route_protocol={CONTROL_PROTOCOL}"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            # It prints "subscribed" once its monitor socket is bound: from then on it sees
            # every deletion (a fixed sleep instead would let a late one miss the first).
            ready, _, _ = select.select([repairer.stdout], [], [], 10)
            line = repairer.stdout.readline() if ready else ""
            if line.strip() != "subscribed":
                raise BenchError(f"the control repairer did not subscribe within 10 s: {line!r}")
            result = run_json("ip", "netns", "exec", ns, self.tools["vmnet_drift_repair"],
                              f"--count={len(routes)}", f"--route_protocol={CONTROL_PROTOCOL}",
                              "--timeout_ms=5000", "--gap_ms=20", timeout=60 + count * 6)
        finally:
            stop_process(repairer)
            self.lab.processes.remove(repairer)
            run("ip", "-n", ns, "-batch", "-", check=False,
                input="".join(f"route del {r}\n" for r in routes))
        self.results["drift_control"] = result
        log(f"control repairer p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
            f"max {result['max_ms']:.2f} ms over {result['repaired']} repairs")

    def idle(self, agent, seconds):
        cpu = agent.cpu_seconds()
        time.sleep(seconds)
        self.results["idle_cpu_percent"] = 100 * (agent.cpu_seconds() - cpu) / seconds
        log(f"idle with {self.n} VMs: {self.results['idle_cpu_percent']:.1f}% of a core")

    def run(self):
        """The phases, in an order that keeps them from disturbing each other. The kernel's
        neighbour and proxy tables are shared by all namespaces (the proxy table has 16 hash
        buckets), so a host's 10,000 proxy entries slow down every other host's inserts: each
        host is built just before its phase, and every host but a is removed (and its
        teardown waited for) before the next one is built. One agent runs at a time. --only
        runs some of the phases (PHASES): each builds its own hosts."""
        quick = self.args.quick
        self.results["load_average_at_start"] = os.getloadavg()
        self.results["lab_build_s"] = {}

        only = self.args.only
        if "baseline" in only or "agent" in only:
            self.nft_base()  # host n, before any other host exists

        def build(name, vms=self.n):
            took = self.lab.add_host(name, vms)
            self.results["lab_build_s"][name] = took
            log(f"host {name}: {vms} tap devices in {took:.1f} s")
            return self.lab.host(name)

        def remove(name):
            self.lab.remove_host(name)
            log(f"host {name} removed; the kernel tore it down in "
                f"{wait_netns_cleanup(240):.1f} s")

        if "baseline" in only:
            self.baseline_attach(build("b"), "kind", "attach_baseline")
            remove("b")
            self.baseline_attach(build("d"), "vm", "attach_baseline_vm_order")
            remove("d")
        if "watch" in only:
            agent_c = Agent(self.lab, build("c"), self.vmnetd, self.tools,
                            os.path.join(self.workdir, "agent-c"), self.args.agent_flags)
            self.watch_fanout(agent_c)
            remove("c")
        if "getvm" in only:
            agent_g = Agent(self.lab, build("g", self.n + 1), self.vmnetd, self.tools,
                            os.path.join(self.workdir, "agent-g"), self.args.agent_flags)
            self.getvm_during_storm(agent_g, 1.0 if quick else 3.0)
            remove("g")
        if "agent" in only:
            self.host_a(build("a"))
        if "portsec" in only:
            if "agent" in only:
                remove("a")
            if self.port_security_supported():
                self.portsec(build, remove)
        if "bandwidth" in only:
            if self.lab.host("a") in self.lab.namespaces:
                remove("a")
            self.bandwidth(build, remove)
        self.results["load_average_at_end"] = os.getloadavg()
        self.completed = True

    def portsec(self, build, remove):
        """Issue 12's rows. Host r: a vmnetd with port security attaches 10 VMs; the rules of
        its ruleset are counted. Host p (N taps, and a veth to a VM namespace with
        FORWARD_VM_ADDRESS): a vmnetd with port security attaches N VMs (the storm row, vs the
        baseline phase's ip -batch + nft -f), the ruleset's rules are counted (must equal host
        r's) and its objects compared with the baseline's; then the forwarding VM is attached
        and iperf3 runs from X to it in alternating rounds with port security on and off (the
        same agent, state and N+1 VMs, restarted with --port-security=false and back)."""
        quick = self.args.quick
        flags = [f for f in self.args.agent_flags  # on and off are set here
                 if not re.match(r"--?(no)?port[-_]security(=|$)", f)]
        result = self.results["portsec"] = {}

        agent = Agent(self.lab, build("r", 10), self.vmnetd, self.tools,
                      os.path.join(self.workdir, "agent-r"), flags)
        agent.start()
        storm = run_json(self.tools["vmnet_attach_storm"], f"--target={agent.target}",
                         "--count=10", "--concurrency=10", "--channels=1", "--timeout_s=60",
                         timeout=120)
        self.check(storm["ok"], f"port security, 10 VMs: {json.dumps(storm)[:600]}")
        self.check_nft(agent.ns, "vmnetd with 10 VMs", 10)
        result["rules_10"] = nft_rule_count(agent.ns)
        agent.stop()
        remove("r")

        ns = build("p")
        link = interface(self.n)
        vm_ns = self.lab.add_vm("p", link, FORWARD_VM_ADDRESS)
        x_ns = f"{self.lab.prefix}p-x"
        workdir = os.path.join(self.workdir, "agent-p")
        on = Agent(self.lab, ns, self.vmnetd, self.tools, workdir, flags)
        off = Agent(self.lab, ns, self.vmnetd, self.tools, workdir,
                    flags + ["--port-security=false"])
        on.start()
        self.storm(on, 0, "storm_portsec")
        self.check_objects(ns, "vmnetd with port security")
        counts = self.check_nft(ns, "vmnetd with port security", self.n)
        result["objects"] = counts
        result["rules_n"] = nft_rule_count(ns)
        self.check(result["rules_n"] == result["rules_10"],
                   f"port security: {result['rules_10']} rules with 10 VMs, "
                   f"{result['rules_n']} with {self.n}: the rule count must not grow")
        base = self.results.get("nft_objects_baseline")
        if base is not None:
            differ = sorted(k for k in set(base) | set(counts) if base.get(k) != counts.get(k))
            self.check(not differ, "the baseline's nftables objects differ from vmnetd's: " +
                       ", ".join(f"{k} {base.get(k)} vs {counts.get(k)}" for k in differ))
        log(f"port security: {result['rules_10']} rules with 10 VMs, {result['rules_n']} with "
            f"{self.n}")

        # The forwarding VM, N + 1st.
        attach = run(self.tools["vmnetctl"], f"--server={on.target}", "attach", FORWARD_VM_ID,
                     "--interface", link, "--ip", FORWARD_VM_ADDRESS, timeout=60)
        log(f"vmnetctl attach: {attach.stdout.strip()}")
        self.wait_programmed(on, FORWARD_VM_ID)
        self.check_objects(ns, "vmnetd with the forwarding VM", want=self.n + 1)
        self.check_nft(ns, "vmnetd with the forwarding VM", self.n + 1)
        ping = run("ip", "netns", "exec", x_ns, "ping", "-c", "1", "-W", "3",
                   FORWARD_VM_ADDRESS, check=False, timeout=30)
        self.check(ping.returncode == 0, f"X cannot ping the forwarding VM: {ping.stdout}")
        server = self.lab.spawn(["ip", "netns", "exec", vm_ns, "iperf3", "-s", "-p",
                                 str(IPERF_PORT)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        rounds, seconds, omit = (1, 1, 0) if quick else (3, 3, 1)
        result.update(iperf_seconds=seconds, iperf_omit_s=omit, on_gbits=[], off_gbits=[],
                      restart_s=[], nft_ready_s=[])
        current = on
        try:
            result["warmup_gbits"] = self.iperf3(x_ns, 1, 0)  # not counted
            for mode in ["on", "off"] * rounds:
                agent = on if mode == "on" else off
                if agent is not current:
                    current.stop()
                    result["restart_s"].append(agent.start())
                    current = agent
                    if mode == "on":  # the agent rebuilds its tables and all elements
                        counts, waited = wait_nft(
                            ns, lambda c: not nft_per_vm_mismatches(c, self.n + 1), 60)
                        wrong = nft_per_vm_mismatches(counts, self.n + 1)
                        self.check(not wrong, "vmnetd restarted with port security: "
                                   f"nftables objects {', '.join(wrong)} after {waited:.1f} s")
                    else:  # the agent deletes its tables
                        counts, waited = wait_nft(ns, lambda c: not c, 30)
                        self.check(not counts, "vmnetd restarted with --port-security=false "
                                   f"left its nftables objects in place: {counts}")
                    result["nft_ready_s"].append(waited)
                time.sleep(1.0 if quick else 2.0)  # the restart's own work is over
                cpu = current.cpu_seconds()
                gbits = self.iperf3(x_ns, seconds, omit)
                # vmnetd's CPU during the run: competition for the cores iperf3 uses.
                result.setdefault(f"{mode}_agent_cpu_s", []).append(
                    round(current.cpu_seconds() - cpu, 3))
                result[f"{mode}_gbits"].append(gbits)
                log(f"forwarding X -> VM with {self.n + 1} VMs, port security {mode}: "
                    f"{gbits:.2f} Gbit/s")
        finally:
            current.stop()
            stop_process(server)
            self.lab.processes.remove(server)
        if result["on_gbits"] and result["off_gbits"]:
            result["on_mean_gbits"] = statistics.fmean(result["on_gbits"])
            result["off_mean_gbits"] = statistics.fmean(result["off_gbits"])
            result["ratio"] = result["on_mean_gbits"] / result["off_mean_gbits"]
        remove("p")

    def bandwidth(self, build, remove):
        """Issue 15's rows. Host t: the baseline, `ip -batch` (the four objects per VM of the
        storm row and an ifb device per VM) and `tc -batch` (per VM a tbf towards the VM, a tbf
        on the ifb, the ingress qdisc and the redirect filter), then `nft -f` of port
        security's objects as in the baseline phase when port security is on. Host l: a fresh
        vmnetd attaches N VMs, each limited to BW_INGRESS_BPS towards it and BW_EGRESS_BPS
        from it; the storm ends when every VM is PROGRAMMED (vmnet_attach_storm --settle: an
        egress limit answers PENDING until the ifb's RTM_NEWLINK comes back). Both hosts are
        then checked for every object, the tc ones exactly (tc_objects)."""
        self.nft_base()  # host n, before host t exists (cached when it ran already)
        self.baseline_attach(build("t"), "kind", "attach_bw_baseline", bandwidth=True)
        remove("t")
        ns = build("l")
        agent = Agent(self.lab, ns, self.vmnetd, self.tools,
                      os.path.join(self.workdir, "agent-l"), self.args.agent_flags)
        agent.start()
        self.storm(agent, 0, "storm_bandwidth",
                   extra=(f"--ingress_bps={BW_INGRESS_BPS}", f"--egress_bps={BW_EGRESS_BPS}",
                          "--settle"))
        self.check_objects(ns, "vmnetd with bandwidth limits")
        self.check_bandwidth(ns, "vmnetd with bandwidth limits", "storm_bandwidth")
        if self.nft_base():
            self.check_nft(ns, "vmnetd with bandwidth limits", self.n)
        agent.stop()
        remove("l")

    def port_security_supported(self):
        """Whether this vmnetd has --port-security (issue 12). Without it (an older build)
        the portsec phase is skipped, not failed, and the baseline installs no nftables."""
        if not hasattr(self, "_port_security"):
            out = run(self.vmnetd, "--helpfull", check=False, timeout=30)
            self._port_security = bool(re.search(r"port[-_]security", out.stdout + out.stderr))
            if not self._port_security:
                log("this vmnetd has no --port-security flag: no port security rows")
                self.results["portsec"] = {"skipped": "vmnetd has no --port-security"}
        return self._port_security

    def wait_programmed(self, agent, vm_id, timeout=60.0):
        deadline = time.monotonic() + timeout
        while True:
            out = run(self.tools["vmnetctl"], f"--server={agent.target}", "get", vm_id,
                      check=False, timeout=30).stdout
            m = re.search(r"^state:\s+(\S+)", out, re.M)
            if m and m.group(1).upper() == "PROGRAMMED":
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{vm_id} not PROGRAMMED within {timeout} s: {out.strip()}")
            time.sleep(0.1)

    def iperf3(self, x_ns, seconds, omit):
        """One iperf3 TCP run from X to the forwarding VM, `seconds` measured after `omit`
        (slow start); returns the received Gbit/s."""
        out = run("ip", "netns", "exec", x_ns, "iperf3", "-c", FORWARD_VM_ADDRESS, "-p",
                  str(IPERF_PORT), "-t", str(seconds), "-O", str(omit), "-J",
                  "--connect-timeout", "5000", timeout=seconds + omit + 60, check=False)
        try:
            gbits = iperf3_gbits(json.loads(out.stdout))
        except (ValueError, KeyError) as e:
            raise BenchError(f"iperf3 X -> {FORWARD_VM_ADDRESS} failed ({out.returncode}): "
                             f"{(out.stdout + out.stderr).strip()[-600:]}") from e
        self.check(out.returncode == 0 and gbits > 0,
                   f"iperf3 X -> {FORWARD_VM_ADDRESS}: exit {out.returncode}, {gbits} Gbit/s")
        return gbits

    def host_a(self, ns):
        """Host a (namespace `ns`, built): the storm without watchers and memory, then
        restarts, scrapes, list reads, drift repair and idle CPU on the same agent."""
        quick = self.args.quick
        agent_a = Agent(self.lab, ns, self.vmnetd, self.tools,
                        os.path.join(self.workdir, "agent-a"), self.args.agent_flags)
        self.attach_and_memory(agent_a)
        self.restart(agent_a, 1 if quick else 3)
        self.note_rss(agent_a, "after_restart")
        self.scrape(agent_a, 2 if quick else 5)
        self.note_rss(agent_a, "after_scrapes")
        self.lists(agent_a, 1 if quick else 3)
        self.note_rss(agent_a, "after_lists")
        self.drift(agent_a, 20 if quick else 200)
        self.idle(agent_a, 1.0 if quick else 5.0)
        self.note_rss(agent_a, "at_end")
        agent_a.stop()
        self.heap.report("after_restart")


# -- the table --------------------------------------------------------------------------------

def table(r):
    n = r["vms"]
    rows = []

    def ratio(ours, theirs):
        return ours / theirs if theirs else None

    def add(what, ours, baseline, value, target, met):
        rows.append((what, ours, baseline, "-" if value is None else f"{value:.2f}", target,
                     "n/a" if met is None else ("yes" if met else "NO")))

    # With port security (vmnetd's default, and the base found in the agent), the baseline is
    # ip -batch followed by nft -f of the same nftables elements (issue 12).
    nft_s = r.get("attach_baseline_nft_s")
    nft_cpu = r.get("attach_baseline_nft_cpu_s", 0.0)
    base_s = r["attach_baseline_s"] + (nft_s or 0.0) if "attach_baseline_s" in r else None
    base_name = "ip -batch + nft -f" if nft_s is not None else "ip -batch"

    def storm_rows(s, what):
        if s and base_s is not None:
            v = ratio(s["wall_s"], base_s)
            add(f"{what}, {n} VMs (wall s)", f"{s['wall_s']:.3f}",
                f"{base_s:.3f} ({base_name})", v, "ratio <= 1.0", v <= 1.0)
            if nft_s is not None:
                add("  (information: of which ip -batch / nft -f)", "-",
                    f"{r['attach_baseline_s']:.3f} / {nft_s:.3f}", None, "-", None)
            vm_order = r["attach_baseline_vm_order_s"] + (nft_s or 0.0)
            v = ratio(s["wall_s"], vm_order)
            add("  (information: vs ip -batch VM by VM" + (" + nft -f)" if nft_s is not None
                                                           else ")"),
                f"{s['wall_s']:.3f}", f"{vm_order:.3f}", v, "-", None)
            base_cpu = r["attach_baseline_cpu_s"] + nft_cpu
            v = ratio(s["agent_cpu_s"], base_cpu)
            add("  (information: CPU s, vmnetd vs ip" + (" + nft)" if nft_s is not None
                                                         else ")"),
                f"{s['agent_cpu_s']:.3f}", f"{base_cpu:.3f}", v, "-", None)
        elif s:
            add(f"{what}, {n} VMs (wall s)", f"{s['wall_s']:.3f}", "not run (--only)", None,
                "ratio <= 1.0", None)

    storm_rows(r.get("storm"), "attach storm")
    s = r.get("storm")
    ps = r.get("portsec") or {}
    if ps.get("skipped"):
        add("port security (issue 12)", "not run", ps["skipped"], None, "-", None)
    storm_rows(r.get("storm_portsec"), "attach storm, port security on")
    if "rules_n" in ps:
        add(f"nftables rules, 10 / {n} VMs", f"{ps['rules_10']} / {ps['rules_n']}",
            f"{r['nft_rules_baseline']} (nft -f, {n} VMs)" if "nft_rules_baseline" in r
            else "none", None, "equal", ps["rules_10"] == ps["rules_n"])
    if "ratio" in ps:
        add(f"forwarding X -> VM, {n + 1} VMs (iperf3 Gbit/s)",
            f"{ps['on_mean_gbits']:.2f} on", f"{ps['off_mean_gbits']:.2f} off", ps["ratio"],
            "on/off >= 0.95", ps["ratio"] >= 0.95)
    sb = r.get("storm_bandwidth")
    if sb and "attach_bw_baseline_s" in r:
        parts = [("ip", r["attach_bw_baseline_s"], r["attach_bw_baseline_cpu_s"]),
                 ("tc", r["attach_bw_baseline_tc_s"], r["attach_bw_baseline_tc_cpu_s"])]
        if "attach_bw_baseline_nft_s" in r:
            parts.append(("nft", r["attach_bw_baseline_nft_s"],
                          r["attach_bw_baseline_nft_cpu_s"]))
        names = {"ip": "ip -batch", "tc": "tc -batch", "nft": "nft -f"}
        base = sum(p[1] for p in parts)
        v = ratio(sb["wall_s"], base)
        add(f"attach storm, limits both ways, {n} VMs (wall s)", f"{sb['wall_s']:.3f}",
            f"{base:.3f} ({' + '.join(names[p[0]] for p in parts)})", v, "ratio <= 1.0",
            v <= 1.0)
        add(f"  (information: of which {' / '.join(names[p[0]] for p in parts)})", "-",
            " / ".join(f"{p[1]:.3f}" for p in parts), None, "-", None)
        base_cpu = sum(p[2] for p in parts)
        add(f"  (information: CPU s, vmnetd vs {' + '.join(p[0] for p in parts)})",
            f"{sb['agent_cpu_s']:.3f}", f"{base_cpu:.3f}", ratio(sb["agent_cpu_s"], base_cpu),
            "-", None)
        add("  (information: last answer / all PROGRAMMED, s)",
            f"{sb['answers_wall_s']:.3f} / {sb['wall_s']:.3f}",
            f"{sb['answered_pending']} answered PENDING", None, "-", None)
    elif sb:
        add(f"attach storm, limits both ways, {n} VMs (wall s)", f"{sb['wall_s']:.3f}",
            "not run", None, "ratio <= 1.0", None)
    if "restart" in r:
        rs = r["restart"]
        v = ratio(rs["median_s"], rs["baseline_median_s"])
        writes = max(rs["kernel_writes"])
        add(f"restart with {n} VMs (to SERVING, s)",
            f"{rs['median_s']:.3f}, {writes:.0f} writes", f"{rs['baseline_median_s']:.3f}", v,
            "ratio <= 1.5, 0 writes", v <= 1.5 and writes == 0 and rs["monitor_lines"] == 0)
    if "drift" in r:
        d = r["drift"]
        c = r.get("drift_control")
        add(f"drift repair, {d['repaired']} deletes (ms)",
            f"p50 {d['p50_ms']:.2f} / p99 {d['p99_ms']:.2f}",
            f"none (floor: p50 {c['p50_ms']:.2f} / p99 {c['p99_ms']:.2f})" if c else "none",
            None, "p99 <= 10 ms", d["missed"] == 0 and 0 <= d["p99_ms"] <= 10)
    if "scrape" in r:
        sc = r["scrape"]
        v = ratio(sc["median_s"], sc["baseline_median_s"])
        add(f"/metrics scrape, {n} VMs (s)", f"{sc['median_s']:.4f}",
            f"{sc['baseline_median_s']:.4f}" if sc["baseline_median_s"] else "not installed",
            v, "ratio <= 1.0", None if v is None else v <= 1.0)
    if "memory" in r and "per_vm_after_storm_kib" in r["memory"]:
        m = r["memory"]
        add("memory per VM, after the storm (KiB)", f"{m['per_vm_after_storm_kib']:.2f}",
            "none", None, "<= 1.5 KiB", m["per_vm_after_storm_kib"] <= 1.5)
        high = max(v for k, v in m.items() if k.startswith("per_vm_"))
        add("memory per VM, high-water (KiB)", f"{high:.2f}", "none", None, "<= 1.5 KiB",
            high <= 1.5)
    if "watch_fanout" in r:
        f = r["watch_fanout"]
        samples = f["samples"]
        with_ = [x for x in samples if x["watchers"]]
        without = [x for x in samples if not x["watchers"]]
        seen = sum(x.get("watchers_complete") == x["watchers"] for x in with_)
        add(f"Watch fan-out, {f['watchers']} watchers, "
            + (f"medians of {f['rounds']} storms each" if f["rounds"] > 1 else "one storm each")
            + " (wall s)",
            f"{f['median_with_s']:.3f} with / {f['median_without_s']:.3f} without; all saw "
            f"all in {seen}/{len(with_)}", "none", f["ratio"], "<= 1.10, every event",
            f["ratio"] <= 1.10 and f["all_seen"])
        add("  (information: the storms in order, wall s)",
            ", ".join(f"{x['wall_s']:.3f} {'with' if x['watchers'] else 'w/o'}"
                      for x in samples), "-", None, "-", None)
        add("  (information: vmnetd CPU s, medians with / without)",
            f"{f['median_agent_cpu_with_s']:.3f}", f"{f['median_agent_cpu_without_s']:.3f}",
            f["cpu_ratio"], "-", None)
    elif "storm_watched" in r:  # an earlier run's --json: one watched storm, host a's without
        w = r["storm_watched"]
        v = ratio(w["wall_s"], s["wall_s"]) if s else None
        all_seen = (w.get("watchers_complete") == w["watchers"] and
                    w.get("watch_revision_gaps") == 0)
        add(f"Watch fan-out, {w['watchers']} watchers (storm s)",
            (f"{w['wall_s']:.3f} with / {s['wall_s']:.3f} without; " if s else
             f"{w['wall_s']:.3f} with; ") +
            f"{w.get('watchers_complete')}/{w['watchers']} saw all", "none", v,
            "<= 1.10, every event", None if v is None else v <= 1.10 and all_seen)
    if "idle_watchers" in r:
        iw = r["idle_watchers"]
        add(f"idle Watch streams, {iw['watchers']}, progress every "
            f"{iw['progress_interval_ms'] / 1000:g} s: agent memory per stream (KiB)",
            f"{iw['rss_per_watcher_kib']:.1f}", "none", None, "<= 32 KiB",
            iw["rss_per_watcher_kib"] <= 32)
        add(f"  agent CPU over {iw['hold_s']:g} s with {n} VMs: with the streams / alone (s)",
            f"{iw['agent_cpu_with_s']:.3f}", f"{iw['agent_cpu_alone_s']:.3f} (alone)",
            ratio(iw["agent_cpu_with_s"], iw["agent_cpu_alone_s"]), "~0 added", None)
    for key, name, base in (("list_routes", "ListRoutes", "ip route show"),
                            ("list_arp", "ListArp", "ip neigh show proxy")):
        if key not in r:
            continue
        lr = r[key]
        v = ratio(lr["median_s"], lr["baseline_median_s"])
        add(f"{name}, {lr['entries']} entries, pages of 1000 (s)", f"{lr['median_s']:.4f}",
            f"{lr['baseline_median_s']:.4f} ({base})", v, "ratio <= 2.0", v <= 2.0)
    if "getvm" in r:
        g = r["getvm"]
        v = g["ratio_p99"]
        add(f"GetVm during storm, {n} VMs (ms)",
            f"p50 {g['storm']['p50_ms']:.3f} / p99 {g['storm']['p99_ms']:.3f} in storm",
            f"p50 {g['idle']['p50_ms']:.3f} / p99 {g['idle']['p99_ms']:.3f} idle", v,
            "p99 ratio <= 2.0", None if v is None else v <= 2.0)
        c, cv = (g["storm"]["control"], g["idle"]["control"]), g.get("control_ratio_p99")
        add("  control: Health/Check, same loop (ms)",
            f"p50 {c[0]['p50_ms']:.3f} / p99 {c[0]['p99_ms']:.3f} in storm",
            f"p50 {c[1]['p50_ms']:.3f} / p99 {c[1]['p99_ms']:.3f} idle", cv,
            "(reference: the machine)", None)

    headers = ("what", "ours", "baseline", "ratio", "target", "met?")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(widths[i]) for i, h in enumerate(headers)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(row)) + " |")
    return "\n".join(lines)


def details(r):
    lines = []
    s, w, m, rs = r.get("storm"), r.get("storm_watched"), r.get("memory"), r.get("restart")
    if s:
        lines.append(
            f"storm: {s['attaches_per_s']:.0f} attaches/s, vmnetd CPU {s['agent_cpu_s']:.2f} s "
            f"(busiest threads {s.get('thread_cpu_s')}), client CPU {s['client_cpu_s']:.2f} s, "
            f"kernel writes {s.get('kernel_writes', 0):.0f}, reconcile passes "
            f"{s.get('reconcile_passes', 0):.0f}; ip -batch CPU "
            f"{r.get('attach_baseline_cpu_s', 0):.2f} s "
            f"(VM order {r.get('attach_baseline_vm_order_cpu_s', 0):.2f} s)")
    f = r.get("watch_fanout")
    if f:
        lines.append(
            f"Watch fan-out (host c, one agent, {f['rounds']} round"
            f"{'s' if f['rounds'] > 1 else ''} in ABBA order, "
            f"{f['rounds_s']:.0f} s; the whole watch phase {f.get('phase_s', 0):.0f} s): "
            f"median vmnetd CPU per thread with {f['median_thread_cpu_s']['with']}, without "
            f"{f['median_thread_cpu_s']['without']}")
        for x in f["samples"]:
            one = (f"  #{x['sample']} {'with' if x['watchers'] else 'without'}: "
                   f"{x['wall_s']:.3f} s, vmnetd CPU {x['agent_cpu_s']:.2f} s, client CPU "
                   f"{x['client_cpu_s']:.2f} s, reconcile passes "
                   f"{x.get('reconcile_passes', 0):.0f}, kernel writes "
                   f"{x.get('storm_kernel_writes', 0):.0f}, load average "
                   f"{x.get('load_average_1min', -1):.1f} before it")
            if x["watchers"]:
                one += (f", {x.get('watchers_complete')}/{x['watchers']} watchers saw all, "
                        f"gaps {x.get('watch_revision_gaps')}, duplicates "
                        f"{x.get('watch_duplicates')}, resumes {x.get('watch_resumes')}, "
                        f"{x.get('watch_messages')} messages, last complete "
                        f"{x.get('watch_all_seen_s', -1):.3f} s")
            if "detach" in x:
                one += (f"; then detached in {x['detach']['wall_s']:.3f} s (vmnetd CPU "
                        f"{x['detach']['agent_cpu_s']:.2f} s), links reset in "
                        f"{x['reset_links_s']:.2f} s")
            if not x.get("quiet_before", True):
                one += "; the agent was not quiet before it"
            lines.append(one)
    if w:
        lines.append(
            f"storm with watchers: vmnetd CPU {w['agent_cpu_s']:.2f} s, client CPU "
            f"{w['client_cpu_s']:.2f} s (the 100 watchers run in the client), resumes "
            f"{w.get('watch_resumes')}, revision gaps {w.get('watch_revision_gaps')}, Watch "
            f"messages {w.get('watch_messages')} for {w['watchers']} x {w['count']} events, last "
            f"watcher complete {w.get('watch_all_seen_s', -1):.3f} s after the storm began")
    if m:
        lines.append("memory: RSS " + ", ".join(f"{v} KiB {k[4:-4].replace('_', ' ')}"
                                                for k, v in m.items() if k.startswith("rss_")))
    if rs:
        lines.append(
            f"restart: {', '.join(f'{t:.3f}' for t in rs['times_s'])} s; ip dump "
            f"{', '.join(f'{t:.3f}' for t in rs['baseline_times_s'])} s; kernel writes "
            f"{rs['kernel_writes']}, ip monitor lines {rs['monitor_lines']}; SIGTERM to exit "
            f"{r.get('stop_s', 0):.3f} s")
    if "scrape" in r:
        lines.append(f"scrape: vmnetd {r['scrape'].get('vmnetd_bytes')} bytes, node-exporter "
                     f"{r['scrape'].get('node_exporter_bytes')} bytes")
    if "drift" in r:
        lines.append(
            f"drift: p90 {r['drift']['p90_ms']:.2f} ms, max {r['drift']['max_ms']:.2f} ms; the "
            f"floor (a minimal netlink repairer on routes not vmnetd's, same deletes): p90 "
            f"{r.get('drift_control', {}).get('p90_ms', -1):.2f} ms, max "
            f"{r.get('drift_control', {}).get('max_ms', -1):.2f} ms")
    ps = r.get("portsec") or {}
    if "ratio" in ps:
        sp = r.get("storm_portsec", {})
        lines.append(
            f"port security: storm vmnetd CPU {sp.get('agent_cpu_s', 0):.2f} s, kernel writes "
            f"{sp.get('kernel_writes', 0):.0f}; " +
            (f"nft -f {', '.join(f'{t:.3f}' for t in r['attach_baseline_nft_times_s'])} s "
             f"(median CPU {r['attach_baseline_nft_cpu_s']:.2f} s), base loaded in "
             f"{r.get('nft_base_load_s', 0):.3f} s; " if "attach_baseline_nft_times_s" in r
             else "") +
            f"forwarding ({ps['iperf_seconds']} s per run after {ps.get('iperf_omit_s', 0)} s "
            f"omitted, alternating) on {', '.join(f'{g:.2f}' for g in ps['on_gbits'])}, off "
            f"{', '.join(f'{g:.2f}' for g in ps['off_gbits'])} Gbit/s" +
            (f" (vmnetd CPU during them: on {ps['on_agent_cpu_s']}, off "
             f"{ps['off_agent_cpu_s']} s)" if "on_agent_cpu_s" in ps else "") +
            "; restarts to SERVING "
            f"{', '.join(f'{t:.2f}' for t in ps['restart_s'])} s, then nftables ready "
            f"{', '.join(f'{t:.2f}' for t in ps['nft_ready_s'])} s later")
    sb = r.get("storm_bandwidth")
    if sb:
        lines.append(
            f"bandwidth limits ({BW_INGRESS_BPS // 10**6} Mbit/s towards each VM, "
            f"{BW_EGRESS_BPS // 10**6} Mbit/s from it, default burst): storm vmnetd CPU "
            f"{sb['agent_cpu_s']:.2f} s (busiest threads {sb.get('thread_cpu_s')}), client CPU "
            f"{sb['client_cpu_s']:.2f} s, kernel writes {sb.get('kernel_writes', 0):.0f}, "
            f"reconcile passes {sb.get('reconcile_passes', 0):.0f}; tc objects vmnetd "
            f"{r.get('storm_bandwidth_tc_objects')}, baseline "
            f"{r.get('attach_bw_baseline_tc_objects')}")
    if "idle_cpu_percent" in r:
        lines.append(f"idle with {r['vms']} VMs: vmnetd uses {r['idle_cpu_percent']:.1f}% of "
                     f"a core")
    if "getvm" in r:
        g = r["getvm"]

        def stats(x):
            one = (f"{x['count']} calls, p50 {x['p50_ms']:.3f} / p90 {x['p90_ms']:.3f} / "
                   f"p99 {x['p99_ms']:.3f} / max {x['max_ms']:.3f} ms")
            c = x.get("control")
            if c:
                one += (f" (control Health/Check: {c['count']} calls, p50 {c['p50_ms']:.3f} / "
                        f"p90 {c['p90_ms']:.3f} / p99 {c['p99_ms']:.3f} / max "
                        f"{c['max_ms']:.3f} ms)")
            return one

        gs = r.get("getvm_storm", {})
        lines.append(
            f"GetVm ({g['vm_id']}, one call in flight, {g['gap_us']} us between calls): idle "
            f"with 1 VM {stats(g['idle'])}; during the storm ({g['storm']['window_s']:.3f} s, "
            f"{gs.get('reconcile_passes', 0):.0f} reconcile passes) {stats(g['storm'])}; idle "
            f"with {r['vms'] + 1} VMs after it {stats(g['idle_after'])}")
        if g.get("storm_p99_getvm_over_control") is not None:
            lines.append(
                f"GetVm vs its control: p99 ratio storm/idle {g['ratio_p99']:.2f} for GetVm, "
                f"{g['control_ratio_p99']:.2f} for Health/Check; during the storm GetVm's p99 "
                f"is {g['storm_p99_getvm_over_control']:.2f}x the control's")
    lines.append("machine: " + ", ".join(f"{k} {v}" for k, v in r.get("machine", {}).items()))
    lines.append(f"load average (1, 5, 15 min) at start {r.get('load_average_at_start')}, at "
                 f"end {r.get('load_average_at_end')}; {os.cpu_count()} CPUs")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------

def find_binaries(args, workdir):
    """Copies vmnetd and the bench programs into `workdir`, so that a rebuild during the run
    cannot swap them; waits up to 2 minutes for a binary that is briefly missing."""
    wanted = {"vmnetd": args.vmnetd}
    wanted.update({tool: os.path.join(args.bin_dir, tool) for tool in TOOLS})
    if "portsec" in args.only:  # attaches the forwarding VM, whose address is not bench's
        wanted["vmnetctl"] = args.vmnetctl
    copies = {}
    for name, path in wanted.items():
        deadline = time.monotonic() + 120
        while not os.access(path, os.X_OK):
            if time.monotonic() > deadline:
                raise BenchError(f"{path} does not exist: build it (cmake --build build "
                                 f"--target vmnetd vmnet_bench) or point --vmnetd/--bin-dir "
                                 f"at it")
            log(f"waiting for {path} (a build may be running)")
            time.sleep(5)
        copies[name] = os.path.join(workdir, name)
        for attempt in range(10):
            try:
                shutil.copy2(path, copies[name])
                break
            except OSError:  # replaced while copying
                time.sleep(2)
        else:
            raise BenchError(f"could not copy {path}")
    return copies


def machine_description(args, vmnetd):
    """What the numbers were measured on and with."""
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")), "unknown")
    with open(vmnetd, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    commit = run("git", "-C", REPO, "rev-parse", "--short", "HEAD", check=False).stdout.strip()
    dirty = run("git", "-C", REPO, "status", "--short", "--untracked-files=no",
                check=False).stdout.count("\n")
    return {"nproc": os.cpu_count(), "kernel": os.uname().release, "cpu": model,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "state_dir_fs": run("stat", "-f", "-c", "%T", tempfile.gettempdir(),
                                check=False).stdout.strip(),
            "iproute2": run("ip", "-V", check=False).stdout.strip(),
            "vmnetd": args.vmnetd, "vmnetd_sha256": digest,
            "git": f"{commit}{f' (+{dirty} modified files)' if dirty else ''}"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=10000, help="VMs per host (default 10000)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repetitions, for a smoke run (use with --vms 100)")
    parser.add_argument("--json", help="also write every number measured to this file")
    parser.add_argument("--watch-rounds", type=int, metavar="R",
                        help=f"the watch phase's rounds, each a storm without watchers and one "
                             f"with {FANOUT_WATCHERS}, in ABBA order (default "
                             f"{FANOUT_ROUNDS}, 1 with --quick)")
    parser.add_argument("--profile", metavar="DIR",
                        help="perf record each phase and write the top functions to DIR "
                             "(perturbs the numbers: profile in a separate run)")
    parser.add_argument("--heaptrack", metavar="DIR",
                        help="run host a's vmnetd under heaptrack and write where its memory "
                             "goes to DIR (perturbs the numbers: use a separate run)")
    parser.add_argument("--agent-flags", default="",
                        help="extra vmnetd flags, space-separated, e.g. "
                             "'--proxy-check-interval-ms=5000' (for experiments)")
    parser.add_argument("--vmnetd", default=os.environ.get("VMNETD") or
                        os.path.join(REPO, "build", "server", "vmnetd"),
                        help="the agent (default $VMNETD or build/server/vmnetd)")
    parser.add_argument("--bin-dir", default=os.environ.get("VMNET_BENCH_BIN") or
                        os.path.join(REPO, "build", "bench"),
                        help="the vmnet_* bench programs (default $VMNET_BENCH_BIN or "
                             "build/bench)")
    parser.add_argument("--vmnetctl", default=os.environ.get("VMNETCTL"),
                        help="the client, for the portsec phase (default $VMNETCTL or "
                             "client/vmnetctl next to --bin-dir)")
    parser.add_argument("--time-limit", type=int,
                        help="seconds before the run gives up and cleans up (default 25 min, "
                             "40 min with --profile or --heaptrack; the bandwidth phase alone "
                             "takes 7.5 min at 10,000 VMs)")
    parser.add_argument("--only", metavar="PHASES", default=",".join(PHASES),
                        help="run only these phases, comma-separated: baseline (hosts b and "
                             "d: ip -batch), watch (host c: storms with and without 100 "
                             "watchers, alternating, then idle watchers), "
                             "getvm (host g: GetVm latency idle and during the storm), agent "
                             "(host a: the storm, memory, restart, scrape, lists, drift), "
                             "portsec (hosts r and p: port security's storm, rule count and "
                             "forwarding on/off), bandwidth (hosts t and l: the storm with "
                             "bandwidth limits vs ip -batch + tc -batch); the table then has "
                             "only their rows "
                             "(default: all)")
    parser.add_argument("--report", metavar="FILE",
                        help="print the table of an earlier run's --json FILE and exit")
    args = parser.parse_args()
    args.agent_flags = args.agent_flags.split()
    if not args.vmnetctl:
        args.vmnetctl = os.path.join(os.path.dirname(os.path.abspath(args.bin_dir)), "client",
                                     "vmnetctl")
    args.only = [phase.strip() for phase in args.only.split(",") if phase.strip()]
    if not args.only or any(phase not in PHASES for phase in args.only):
        parser.error(f"--only: give some of {','.join(PHASES)}")
    if args.report:
        with open(args.report) as f:
            results = json.load(f)
        print(table(results))
        print()
        print(details(results))
        return 0
    if args.time_limit is None:
        args.time_limit = 2400 if args.profile or args.heaptrack else 1500
    if not 1 <= args.vms <= 100000:
        parser.error("--vms: give 1 to 100000")
    if args.watch_rounds is not None and not 1 <= args.watch_rounds <= 20:
        parser.error("--watch-rounds: give 1 to 20")
    if args.profile and args.heaptrack:
        parser.error("--profile and --heaptrack: one at a time")
    if os.geteuid() != 0:
        print("bench: skipped: run as root (it creates network namespaces)", file=sys.stderr)
        return SKIPPED
    probe = f"{PREFIX}{os.getpid()}-probe"
    result = run("ip", "netns", "add", probe, check=False)
    if result.returncode != 0:
        print(f"bench: skipped: cannot create network namespaces here: {result.stderr.strip()}",
              file=sys.stderr)
        return SKIPPED
    run("ip", "netns", "delete", probe, check=False)

    def on_signal(signum, frame):
        raise Terminated(f"signal {signum}")

    def on_alarm(signum, frame):
        raise TimeLimit(f"the benchmark did not finish within --time-limit={args.time_limit} s")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(args.time_limit)

    began = time.monotonic()
    cleanup_stale()
    waited = wait_netns_cleanup(180)
    if waited > 2:
        log(f"waited {waited:.0f} s for the kernel to finish tearing down earlier namespaces")
    workdir = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")
    lab = Lab()
    atexit.register(lab.close)
    bench = None
    status = 1
    try:
        binaries = find_binaries(args, workdir)
        bench = Bench(args, lab, binaries, workdir)
        bench.results["machine"] = machine_description(args, binaries["vmnetd"])
        bench.run()
        status = 0 if not bench.failures else 1
    except BenchError as e:
        log(f"ERROR: {e}")
        status = 2 if bench is None else 1
    except (TimeLimit, Terminated) as e:
        log(f"STOPPED: {e}")
        status = 1
    finally:
        signal.alarm(0)
        log("cleaning up the lab")
        lab.close()
        if bench is not None:
            # Waited for here, so that what runs next does not pay for it.
            bench.results["teardown_s"] = wait_netns_cleanup(240)
            log(f"the kernel tore the lab down in {bench.results['teardown_s']:.0f} s")
        if status == 0 and not os.environ.get("VMNET_BENCH_KEEP_LOGS"):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"logs kept in {workdir} (the next run removes it)")
    elapsed = time.monotonic() - began
    if bench is not None:
        results = bench.results
        results["elapsed_s"] = elapsed
        results["failures"] = bench.failures
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        if bench.completed:
            print(table(results))
            print()
            print(details(results))
        for failure in bench.failures:
            print(f"FAILED CHECK: {failure}")
    print(f"benchmark finished in {elapsed:.0f} s with status {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
