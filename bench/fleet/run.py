#!/usr/bin/python3
"""The fleet lab: N vmnetd agents on this machine, followed by one control plane.

    bench/fleet/run.sh [--agents 50] [--vms-per-agent 200] [--time-limit S] [--quiet-s 20]
                       [--progress-interval-ms 1000] [--json FILE] [--agent-flags '...']

Each agent runs in a host namespace of its own (vmfleet-<pid>-h<i>): an uplink eth0 (a veth
with 198.51.100.1/24 whose peer, lan0, stays in the namespace; no traffic is sent) and
--vms-per-agent tap devices vme0, vme1, ... made with `ip -batch` as bench/run.py makes them. VM k of the fleet (k = i * vms + j: id
bench-<k>, link vme<j hex> of host i, one /32 in 198.18.0.0/15, bench_common.h) is on host i.
One control plane, build/bench/vmnet_fleet_control_plane (bench/fleet/control_plane.cc), holds
a Watch stream to every agent with progress messages every --progress-interval-ms, keeps its
view and each host's last revision and epoch in a state file, and is driven through its stdin.
The phases, each checked:

  1 attach     every VM of the fleet attached at once (8 AttachVm calls in flight per agent)
               while the control plane follows every Watch: time until every VM is
               PROGRAMMED in its view (seen on Watch) and every call answered PROGRAMMED
  2 cp restart the control plane killed (SIGKILL) and started again on its state file; while
               it is down, one VM of every agent is detached and another one's spec changed
               (vmnetctl). It must resume every stream from its revision, without listing:
               time until all streams are in place again, the changes that did not arrive
               (missed, must be 0), re-lists (must be 0); then the VMs are put back (an
               attach of every VM again) and its view checked against every agent's ListVms
  3 agent      every agent restarted in turn (SIGTERM, start; its epoch changes): the control
    restarts   plane must notice (vmnetd answers the resume OUT_OF_RANGE, its revisions
               starting above its lease; a new epoch in a message would do too) and re-list
               that host only, exactly once: the agent's CPU over the ListVms call (its
               process CPU clock, ns)
  4 quiet      --quiet-s with every stream cancelled, then --quiet-s with the streams resumed
               and idle: progress messages received (one per interval per stream), no other
               message, and the agents' CPU in each window (process CPU clocks), by thread
               (schedstat): what an idle stream with progress messages costs is the difference

The agents run with --proxy-check-interval-ms=60000 and --full-resync-interval-s=3600 (change
with --agent-flags): the kernel keeps one proxy-neighbour table for every namespace, so in this
lab each agent's proxy check (every 500 ms by default) walks the whole fleet's 10,000 entries,
not its own 200, which no real host does; and a full resync would land in the quiet phase at
random. --announce-count=0: announcements on the uplink would reach nobody.

Bounded: --time-limit (default 8 min) stops the run; every namespace and process is removed on
every exit path (normal end, a failed check, an exception, SIGINT, SIGTERM, the time limit), and
namespaces, work directories and processes of earlier runs killed with SIGKILL are removed at
start (by the vmfleet- prefix, when the run that made them is gone). The root namespace is
never changed.

Exit status: 0 when every phase ran and its checks held, 1 when one failed (the table's
FAILED lines say which), 2 on usage errors, 77 without root (as root, a lab that cannot be
built is a failure, never a skip).
"""

import argparse
import concurrent.futures
import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
import run as bench  # noqa: E402  (bench/run.py: its process and namespace helpers)

PREFIX = "vmfleet-"
UPLINK = "eth0"
UPLINK_PEER = "lan0"
HOST_ADDRESS = "198.51.100.1/24"
PROTOCOL = 237
SKIPPED = 77
AGENT_FLAGS = ("--proxy-check-interval-ms=60000", "--full-resync-interval-s=3600",
               "--announce-count=0")


class FleetError(Exception):
    """A step did not do what it should; the message says which."""


def log(message):
    print(f"[fleet {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def stale(name):
    """True for a vmfleet-<pid>-... name whose run no longer exists."""
    m = re.match(rf"{PREFIX}(\d+)-", name)
    return bool(m) and not os.path.exists(f"/proc/{m.group(1)}")


def cleanup_stale():
    """Namespaces, work directories and processes of fleet runs killed with SIGKILL."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        for arg in args:
            m = re.search(rf"/{PREFIX}(\d+)-".encode(), arg)
            if m and not os.path.exists(f"/proc/{m.group(1).decode()}"):
                log(f"killing pid {pid} left by an earlier run: {args[0].decode(errors='replace')}")
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
                break
    for line in bench.run("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if stale(name):
            bench.run("ip", "netns", "delete", name, check=False)
            log(f"removed stale namespace {name}")
    for name in filter(stale, os.listdir(tempfile.gettempdir())):
        shutil.rmtree(os.path.join(tempfile.gettempdir(), name), ignore_errors=True)
        log(f"removed stale directory {name}")


class Agent:
    """vmnetd in host namespace `ns`; socket, state, pid file and log under `workdir`."""

    def __init__(self, index, ns, workdir, vmnetd, flags):
        self.index, self.ns, self.workdir = index, ns, workdir
        self.name = f"h{index}"
        self.vmnetd, self.flags = vmnetd, flags
        os.makedirs(workdir, exist_ok=True)
        self.socket = os.path.join(workdir, "vmnetd.sock")
        self.pid_file = os.path.join(workdir, "vmnetd.pid")
        self.process = None

    def start(self):
        log_file = open(os.path.join(self.workdir, "vmnetd.log"), "ab")
        # `ip netns exec` execs vmnetd: the child's pid is vmnetd's.
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, self.vmnetd, f"--listen=unix://{self.socket}",
             f"--state-dir={os.path.join(self.workdir, 'state')}", f"--uplinks={UPLINK}",
             f"--route-protocol={PROTOCOL}", *self.flags],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            preexec_fn=bench._die_with_parent)
        log_file.close()
        with open(self.pid_file + ".tmp", "w") as f:
            f.write(f"{self.process.pid}\n")
        os.rename(self.pid_file + ".tmp", self.pid_file)
        return time.monotonic()

    def wait_serving(self, tool, timeout=120):
        out = bench.run(tool, f"--socket={self.socket}", f"--timeout_s={timeout}",
                        "--interval_ms=5", timeout=timeout + 10, check=False)
        if out.returncode != 0 or self.process.poll() is not None:
            raise FleetError(f"vmnetd {self.name} did not become SERVING: {out.stderr.strip()}"
                             f"\nlog tail:\n{self.log_tail()}")
        return json.loads(out.stdout.strip().splitlines()[-1])["serving_at"]

    def stop(self):
        if self.process is not None:
            bench.stop_process(self.process)
            self.process = None

    def rss_kib(self):
        with open(f"/proc/{self.process.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))

    def log_tail(self, lines=10):
        try:
            with open(os.path.join(self.workdir, "vmnetd.log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"


class ControlPlane:
    """The simulator process, spoken to one command and one JSON line at a time."""

    def __init__(self, binary, agents_file, state_file, log_path, progress_ms):
        self.cmd = [binary, f"--agents_file={agents_file}", f"--state_file={state_file}",
                    f"--progress_interval_ms={progress_ms}"]
        self.log_path = log_path
        self.process = None

    def start(self):
        log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=log_file, preexec_fn=bench._die_with_parent)
        log_file.close()
        return time.monotonic()

    def ask(self, command, timeout):
        self.process.stdin.write(f"{command}\n".encode())
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.process.stdout], [], [], left)[0]:
                raise FleetError(f"the control plane did not answer '{command}' within "
                                 f"{timeout} s")
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                raise FleetError(f"the control plane exited during '{command}' (status "
                                 f"{self.process.wait()}); see {self.log_path}")
            line += chunk
        return json.loads(line.decode())

    def kill(self):
        """SIGKILL: a crash, nothing flushed or said."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def quit(self):
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.stdin.write(b"quit\n")
                self.process.stdin.flush()
                self.process.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(10)
        self.process = None


class Fleet:
    def __init__(self, args, workdir):
        self.args, self.workdir = args, workdir
        self.prefix = f"{PREFIX}{os.getpid()}-"
        self.namespaces, self.agents = [], []
        self.cp = None
        self.results = {}
        self.failures = []

    def check(self, ok, message):
        if not ok:
            self.failures.append(message)
            log(f"FAILED: {message}")

    # -- the lab -------------------------------------------------------------------------

    def add_host(self, i):
        ns = f"{self.prefix}h{i}"
        bench.run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        n = self.args.vms_per_agent
        # One batch per host: lo up, the uplink, and the taps (all DOWN: attaching brings
        # them up). ip_forward first, so every new link inherits forwarding (conf/default).
        bench.run("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        # The uplink is a veth whose peer stays in the same namespace: a link with a carrier
        # and nobody on the other side (this kernel has no dummy links).
        batch = ["link set lo up", f"link add {UPLINK} type veth peer name {UPLINK_PEER}",
                 f"addr add {HOST_ADDRESS} dev {UPLINK}", f"link set {UPLINK_PEER} up",
                 f"link set {UPLINK} up"]
        batch += [f"tuntap add dev {bench.interface(j)} mode tap" for j in range(n)]
        bench.run("ip", "-n", ns, "-batch", "-", input="\n".join(batch) + "\n",
                  timeout=120 + n * 0.05)
        return ns

    def close(self):
        if self.cp is not None:
            self.cp.kill()
        for agent in self.agents:  # all told first: they stop in parallel
            if agent.process is not None and agent.process.poll() is None:
                agent.process.terminate()
        for agent in self.agents:
            agent.stop()
        for ns in reversed(self.namespaces):
            result = bench.run("ip", "netns", "delete", ns, check=False, timeout=60)
            if result.returncode != 0:
                log(f"could not delete namespace {ns}: {result.stderr.strip()}")
        self.namespaces.clear()

    # -- the run -------------------------------------------------------------------------

    def run(self, binaries):
        args, n, per = self.args, self.args.agents, self.args.vms_per_agent
        r = self.results
        r.update(agents=n, vms_per_agent=per, vms=n * per, nproc=os.cpu_count(),
                 load_average_at_start=round(os.getloadavg()[0], 2),
                 git=bench.run("git", "-C", REPO, "rev-parse", "--short", "HEAD",
                               check=False).stdout.strip(),
                 progress_interval_ms=args.progress_interval_ms,
                 agent_flags=" ".join(self.agent_flags()))
        started = time.monotonic()
        for i in range(n):
            ns = self.add_host(i)
            self.agents.append(Agent(i, ns, os.path.join(self.workdir, f"h{i}"),
                                     binaries["vmnetd"], self.agent_flags()))
        r["lab_build_s"] = time.monotonic() - started
        log(f"{n} host namespaces with {per} taps each in {r['lab_build_s']:.1f} s")
        for agent in self.agents:
            agent.start()
        for agent in self.agents:
            agent.wait_serving(binaries["vmnet_wait_serving"])
        log(f"{n} agents SERVING")
        agents_file = os.path.join(self.workdir, "agents")
        with open(agents_file, "w") as f:
            for a in self.agents:
                f.write(f"{a.name} {a.socket} {a.pid_file} {a.index * per} {per}\n")
        self.cp = ControlPlane(binaries["vmnet_fleet_control_plane"], agents_file,
                               os.path.join(self.workdir, "control-plane.state"),
                               os.path.join(self.workdir, "control-plane.log"),
                               args.progress_interval_ms)
        self.cp.start()
        live = self.cp.ask("wait_live 60", 70)
        self.check(live["ok"] and live["initial_lists"] == n,
                   f"first start: {live['live']}/{n} streams live, {live['initial_lists']} "
                   f"initial lists")
        self.phase_attach()
        self.phase_cp_restart(binaries)
        self.phase_agent_restarts(binaries)
        self.phase_quiet()
        final = self.cp.ask("stats", 30)
        r["final_stats"] = final
        per_host = final["relists_per_host"]
        self.check(all(v == 1 for v in per_host.values()),
                   "exactly one re-list per agent restart: " +
                   ", ".join(f"{k}={v}" for k, v in per_host.items() if v != 1))
        audit = self.cp.ask("audit", 120)
        self.check(audit["ok"], f"final audit: the view differs from the agents' ListVms: "
                                f"{audit}")
        r["final_audit_mismatches"] = audit["mismatches"]
        self.cp.quit()
        self.cp = None

    def agent_flags(self):
        return [*AGENT_FLAGS, *self.args.agent_flags.split()]

    def phase_attach(self):
        n, r = self.args.agents, self.results
        log(f"phase 1: attaching {r['vms']} VMs across {n} agents")
        out = self.cp.ask("attach", 330)
        r["attach"] = out
        self.check(out["ok"], f"attach: not converged: {out}")
        rss = [a.rss_kib() for a in self.agents]
        r["agent_rss_kib_total"], r["agent_rss_kib_max"] = sum(rss), max(rss)
        with open(f"/proc/{self.cp.process.pid}/status") as f:
            r["cp_rss_kib"] = int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))
        log(f"converged in {out['converge_s']:.2f} s; agents' RSS {sum(rss) / 1024:.0f} MiB in "
            f"all, {max(rss) / 1024:.1f} MiB the largest")

    def phase_cp_restart(self, binaries):
        n, per, r = self.args.agents, self.args.vms_per_agent, self.results
        log("phase 2: the control plane killed (SIGKILL), changes made meanwhile, restarted")
        # Killed once its state file holds the attach: a control plane that crashed before
        # writing its state down would rightly list again, which is not what is measured.
        self.check(self.cp.ask("persist", 30)["ok"], "the control plane could not write its state")
        self.cp.kill()
        changes = []

        def change(agent):
            server = f"--server=unix://{agent.socket}"
            first = agent.index * per
            gone = f"bench-{first}"
            bench.run(binaries["vmnetctl"], server, "detach", gone, timeout=60)
            lines = [f"{agent.name} {gone} removed"]
            if per >= 2:
                vm = first + 1
                mac = f"52:54:00:{(vm >> 16) & 255:02x}:{(vm >> 8) & 255:02x}:{vm & 255:02x}"
                bench.run(binaries["vmnetctl"], server, "attach", f"bench-{vm}", "--interface",
                          bench.interface(1), "--ip", bench.vm_address(vm), "--mac", mac,
                          timeout=60)
                lines.append(f"{agent.name} bench-{vm} changed {mac}")
            return lines

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for lines in pool.map(change, self.agents):
                changes += lines
        expect_file = os.path.join(self.workdir, "expect")
        with open(expect_file, "w") as f:
            f.write("\n".join(changes) + "\n")
        spawned = self.cp.start()
        live = self.cp.ask("wait_live 60", 70)
        answered = time.monotonic()
        expect = self.cp.ask(f"expect {expect_file} 30", 40)
        stats = self.cp.ask("stats", 30)
        r["cp_restart"] = {"live": live, "expect": expect, "stats": stats,
                           "spawn_to_live_s": answered - spawned}
        self.check(live["ok"] and live["resumed"] == n,
                   f"control plane restart: {live['live']}/{n} streams live, "
                   f"{live['resumed']} resumed")
        self.check(expect["missed"] == 0, f"control plane restart: {expect['missed']} of "
                                          f"{expect['expected']} changes missed")
        self.check(stats["relists"] == 0 and stats["initial_lists"] == 0 and
                   stats["out_of_range"] == 0,
                   f"control plane restart: re-lists {stats['relists']}, initial lists "
                   f"{stats['initial_lists']}, OUT_OF_RANGE {stats['out_of_range']} (all "
                   f"must be 0)")
        log(f"resumed {live['resumed']} streams, live {live['live_s']:.3f} s after start; "
            f"missed {expect['missed']}/{expect['expected']}; re-lists {stats['relists']}")
        restore = self.cp.ask("attach", 330)
        self.check(restore["ok"], f"putting the changed VMs back: {restore}")
        audit = self.cp.ask("audit", 120)
        self.check(audit["ok"], f"after the control plane's restart the view differs from "
                                f"the agents' ListVms: {audit}")
        r["cp_restart"]["audit_mismatches"] = audit["mismatches"]

    def phase_agent_restarts(self, binaries):
        r = self.results
        log(f"phase 3: every agent restarted in turn")
        samples = []
        for agent in self.agents:
            agent.stop()
            spawned = agent.start()
            serving = agent.wait_serving(binaries["vmnet_wait_serving"])
            out = self.cp.ask(f"relisted {agent.name} 1 60", 70)
            if not out["ok"]:
                self.check(False, f"agent {agent.name} restarted: no re-list within 60 s")
                continue
            out.update(start_to_serving_s=serving - spawned,
                       serving_to_relist_s=out["started_at"] - serving)
            samples.append(out)
            self.check(out["vms"] == self.args.vms_per_agent and out["cpu_ms"] >= 0,
                       f"agent {agent.name}: re-listed {out['vms']} VMs, CPU {out['cpu_ms']}")
        cpu = [s["cpu_ms"] for s in samples]
        r["agent_restarts"] = {
            "relists": len(samples), "samples": samples,
            "cpu_ms_median": statistics.median(cpu) if cpu else None,
            "cpu_ms_max": max(cpu) if cpu else None,
            "list_ms_median": statistics.median(s["list_s"] * 1000 for s in samples)
            if samples else None,
            "serving_to_relist_s_median": statistics.median(
                s["serving_to_relist_s"] for s in samples) if samples else None,
            "start_to_serving_s_median": statistics.median(
                s["start_to_serving_s"] for s in samples) if samples else None}
        stats = self.cp.ask("stats", 30)
        self.check(stats["relists"] == len(self.agents),
                   f"agent restarts: {stats['relists']} re-lists for {len(self.agents)} restarts")
        if cpu:
            log(f"re-list CPU per agent: median {statistics.median(cpu):.2f} ms, max "
                f"{max(cpu):.2f} ms")

    def thread_cpu_ns(self):
        """{(pid, tid): (thread name, ns on CPU)} of every agent thread (schedstat: ns)."""
        out = {}
        for agent in self.agents:
            pid = agent.process.pid
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{tid}/comm") as f:
                        comm = f.read().strip()
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        out[(pid, tid)] = (comm, int(f.read().split()[0]))
                except OSError:
                    continue
        return out

    def quiet_window(self, streams):
        """One quiet window: the control plane's answer, and the agents' CPU by thread name
        (ms per agent per minute, threads that ended during it left out)."""
        s = self.args.quiet_s
        before = self.thread_cpu_ns()
        out = self.cp.ask(f"quiet {s}{'' if streams else ' nostreams'}", s + 40)
        after = self.thread_cpu_ns()
        by_name = {}
        for key, (comm, ns) in after.items():
            if key in before:
                by_name[comm] = by_name.get(comm, 0) + ns - before[key][1]
        scale = 60 / out["held_s"] / len(self.agents) / 1e6
        out["cpu_ms_per_agent_minute_by_thread"] = {
            k: round(v * scale, 3) for k, v in sorted(by_name.items(), key=lambda x: -x[1])}
        out["cpu_ms_per_agent_minute"] = out["agent_cpu_ms_mean"] * 60 / out["held_s"]
        return out

    def phase_quiet(self):
        s = self.args.quiet_s
        log(f"phase 4: {s} s quiet without streams, then {s} s with them")
        live = self.cp.ask("wait_live 30", 40)  # every host's revision known after its re-list
        self.check(live["ok"], f"streams not live after the agent restarts: {live}")
        base = self.quiet_window(streams=False)
        self.check(base["ok"], f"quiet without streams: {base}")
        live = self.cp.ask("wait_live 30", 40)
        self.check(live["ok"], f"streams not live again after the window without them: {live}")
        out = self.quiet_window(streams=True)
        self.results["quiet_nostreams"] = base
        self.results["quiet"] = out
        self.check(out["ok"], f"quiet: {out}")
        log(f"idle agent CPU per minute: {out['cpu_ms_per_agent_minute']:.1f} ms with streams, "
            f"{base['cpu_ms_per_agent_minute']:.1f} ms without")


def table(r):
    """The results table (BENCHMARKS.md takes it as it is)."""
    def f(v, digits=2):
        return "—" if v is None else f"{v:.{digits}f}"
    head = (f"fleet: {r['agents']} agents x {r['vms_per_agent']} VMs = {r['vms']:,} VMs; "
            f"progress_interval {r['progress_interval_ms']} ms; agents run with "
            f"{r['agent_flags']}; {r['nproc']} CPUs, load average {r['load_average_at_start']} "
            f"at start")
    rows = []
    a = r.get("attach")
    if a:
        rows.append(("1 attach: all VMs PROGRAMMED, seen on Watch", f"{f(a['converge_s'])} s",
                     f"answers {f(a['answers_s'])} s, Watch {f(a['watch_converge_s'])} s; CPU: "
                     f"agents {f(a['agents_cpu_s'])} s, control plane "
                     f"{f(a['control_plane_cpu_s'])} s"))
    if "agent_rss_kib_total" in r:
        rows.append(("  agents' RSS after the storm", f"{r['agent_rss_kib_total'] / 1024:.0f} MiB",
                     f"largest {r['agent_rss_kib_max'] / 1024:.1f} MiB; control plane "
                     f"{r['cp_rss_kib'] / 1024:.1f} MiB"))
    c = r.get("cp_restart")
    if c:
        rows += [
            ("2 cp SIGKILL + restart: all streams live",
             f"{f(c['live']['live_s'], 3)} s",
             f"{c['live']['resumed']} resumed from their revision; spawn to answer "
             f"{f(c['spawn_to_live_s'], 3)} s"),
            ("  changes made while down, missed", f"{c['expect']['missed']}",
             f"of {c['expect']['expected']}; the last arrived {f(c['expect']['arrived_s'], 3)} "
             f"s after start"),
            ("  re-lists", f"{c['stats']['relists']}",
             f"OUT_OF_RANGE {c['stats']['out_of_range']}; view vs ListVms mismatches "
             f"{c.get('audit_mismatches')}")]
    g = r.get("agent_restarts")
    if g:
        rows += [("3 agent restarts: re-lists", f"{g['relists']}",
                  f"one per restart; serving to re-list {f(g['serving_to_relist_s_median'], 3)} s "
                  f"(median), start to serving {f(g['start_to_serving_s_median'], 3)} s"),
                 (f"  agent CPU per re-list of {r['vms_per_agent']} VMs",
                  f"{f(g['cpu_ms_median'])} ms", f"median; max {f(g['cpu_ms_max'])} ms; "
                  f"ListVms {f(g['list_ms_median'])} ms (median); target < 10 ms")]
    q, b = r.get("quiet"), r.get("quiet_nostreams")
    if q and b:
        rows += [(f"4 quiet {q['held_s']:.0f} s: progress messages", f"{q['progress_messages']}",
                  f"min {q['min_progress_per_stream']} per stream; other events {q['events']}, "
                  f"stream ends {q['stream_ends']}"),
                 ("  agent CPU while idle, with its stream", f"{f(q['cpu_ms_per_agent_minute'])} ms",
                  f"per agent per minute (max agent {f(q['agent_cpu_ms_max'] * 60 / q['held_s'])});"
                  f" target ~0"),
                 ("  the same without any stream", f"{f(b['cpu_ms_per_agent_minute'])} ms",
                  "per agent per minute: what the stream adds is the difference")]
    if not rows:
        return head
    width = max(len(x[0]) for x in rows)
    vwidth = max(len(x[1]) for x in rows)
    return head + "\n" + "\n".join(f"{name:<{width}}  {value:>{vwidth}}  {note}".rstrip()
                                    for name, value, note in rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=50, help="agents (default 50)")
    parser.add_argument("--vms-per-agent", type=int, default=200,
                        help="VM links per agent (default 200)")
    parser.add_argument("--time-limit", type=int, default=480,
                        help="seconds before the run gives up and cleans up (default 480)")
    parser.add_argument("--quiet-s", type=int, default=20,
                        help="length of each quiet window, without and with streams "
                             "(default 20 s)")
    parser.add_argument("--progress-interval-ms", type=int, default=1000,
                        help="the control plane's progress_interval (default 1000)")
    parser.add_argument("--agent-flags", default="",
                        help="more vmnetd flags, space-separated (after the fleet's own)")
    parser.add_argument("--json", help="also write every number measured to this file")
    parser.add_argument("--build-dir", default=os.path.join(REPO, "build"),
                        help="where vmnetd, vmnetctl and the bench programs are (default "
                             "build/; $VMNETD, $VMNETCTL, $VMNET_BENCH_BIN override)")
    args = parser.parse_args()
    if not 1 <= args.agents <= 200 or not 2 <= args.vms_per_agent <= 4096:
        parser.error("--agents: 1 to 200; --vms-per-agent: 2 to 4096")
    if not 100 <= args.progress_interval_ms <= 60000 or args.quiet_s < 1:
        parser.error("--progress-interval-ms: 100 to 60000; --quiet-s: at least 1")
    if args.agents * args.vms_per_agent > 60000:
        parser.error("at most 60,000 VMs in all")
    if os.geteuid() != 0:
        print("fleet: skipped: run as root (it creates network namespaces)", file=sys.stderr)
        return SKIPPED
    bin_dir = os.environ.get("VMNET_BENCH_BIN") or os.path.join(args.build_dir, "bench")
    binaries = {
        "vmnetd": os.environ.get("VMNETD") or os.path.join(args.build_dir, "server", "vmnetd"),
        "vmnetctl": os.environ.get("VMNETCTL") or os.path.join(args.build_dir, "client",
                                                               "vmnetctl"),
        "vmnet_wait_serving": os.path.join(bin_dir, "vmnet_wait_serving"),
        "vmnet_fleet_control_plane": os.path.join(bin_dir, "vmnet_fleet_control_plane")}
    for name, path in binaries.items():
        if not os.access(path, os.X_OK):
            print(f"fleet: {path} is missing: build it (cmake --build build --target vmnetd "
                  f"vmnetctl vmnet_bench)", file=sys.stderr)
            return 1

    def on_signal(signum, frame):
        raise bench.Terminated(f"signal {signum}")

    def on_alarm(signum, frame):
        raise bench.TimeLimit(f"the run did not finish within --time-limit={args.time_limit} s")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(args.time_limit)
    began = time.monotonic()
    workdir = None
    fleet = None
    status = 1
    try:
        cleanup_stale()
        probe = f"{PREFIX}{os.getpid()}-probe"
        result = bench.run("ip", "netns", "add", probe, check=False)
        if result.returncode != 0:
            raise FleetError(f"cannot create network namespaces: {result.stderr.strip()}")
        bench.run("ip", "netns", "delete", probe, check=False)
        workdir = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")
        copies = {}
        for name, path in binaries.items():  # a rebuild during the run changes nothing
            copies[name] = os.path.join(workdir, name)
            shutil.copy2(path, copies[name])
        fleet = Fleet(args, workdir)
        fleet.run(copies)
        status = 0 if not fleet.failures else 1
    except (FleetError, bench.BenchError, OSError) as e:
        log(f"ERROR: {e}")
        if fleet is not None:
            fleet.failures.append(str(e))
    except (bench.TimeLimit, bench.Terminated) as e:
        log(f"STOPPED: {e}")
        if fleet is not None:
            fleet.failures.append(str(e))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the cleanup runs to its end
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if fleet is not None:
            log("cleaning up")
            fleet.close()
            fleet.results["teardown_s"] = bench.wait_netns_cleanup(240)
        if workdir is not None:
            if status == 0 and not os.environ.get("VMNET_BENCH_KEEP_LOGS"):
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                log(f"logs kept in {workdir} (the next run removes it)")
    elapsed = time.monotonic() - began
    if fleet is not None:
        fleet.results["elapsed_s"] = elapsed
        fleet.results["failures"] = fleet.failures
        if args.json:
            with open(args.json, "w") as f:
                json.dump(fleet.results, f, indent=1)
        print(table(fleet.results))
        for failure in fleet.failures:
            print(f"FAILED: {failure}")
    print(f"fleet finished in {elapsed:.0f} s with status {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
