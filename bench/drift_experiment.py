#!/usr/bin/python3
"""Where the tail of drift repair comes from: the same lab, the same agent, drift repair
measured with vmnetd's periodic proxy check at its default (every 500 ms, a dump of every
proxy entry) and nearly off (--proxy-check-interval-ms=600000), and the floor (a minimal
netlink repairer on routes that are not vmnetd's, see bench/drift_repair.cc), alternating.

    /usr/bin/python3 bench/drift_experiment.py [--vms 10000] [--rounds 2] [--deletes 200]

Uses bench/run.py's lab and agent (same binaries, same cleanup on every exit path); prints
p50/p90/p99/max per round. Run as root; a few minutes at 10,000 VMs.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402

SETTINGS = (("default (500 ms)", []), ("nearly off (600 s)", ["--proxy-check-interval-ms=600000"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--deletes", type=int, default=200)
    parser.add_argument("--vmnetd", default=os.path.join(bench.REPO, "build", "server", "vmnetd"))
    parser.add_argument("--bin-dir", default=os.environ.get("VMNET_BENCH_BIN") or
                        os.path.join(bench.REPO, "build", "bench"))
    args = parser.parse_args()
    args.json = args.profile = args.heaptrack = None
    args.quick, args.agent_flags = False, []
    workdir = tempfile.mkdtemp(prefix=f"{bench.PREFIX}{os.getpid()}-")
    lab = bench.Lab()
    try:
        binaries = bench.find_binaries(args, workdir)
        ns = lab.host("a")
        lab.add_host("a", args.vms)
        agent = bench.Agent(lab, ns, binaries["vmnetd"], binaries, os.path.join(workdir, "a"))
        agent.start()
        storm = bench.run_json(binaries["vmnet_attach_storm"], f"--target={agent.target}",
                               f"--count={args.vms}", timeout=600)
        print(f"attached {storm['programmed']} VMs in {storm['wall_s']:.2f} s", flush=True)
        control = bench.Bench(args, lab, binaries, workdir)

        def show(what, r):
            print(f"round {round_ + 1}, {what}: p50 {r['p50_ms']:.2f} ms, p90 {r['p90_ms']:.2f} ms, "
                  f"p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.2f} ms, over 5 ms: "
                  f"{sum(1 for x in r['latencies_ms'] if x > 5)}/{r['repaired']}", flush=True)

        for round_ in range(args.rounds):
            for name, flags in SETTINGS:
                agent.stop()
                agent.extra_flags = flags
                agent.start()
                show(f"vmnetd, proxy check {name}",
                     bench.run_json("ip", "netns", "exec", ns, binaries["vmnet_drift_repair"],
                                    f"--count={args.deletes}", "--gap_ms=20",
                                    timeout=60 + args.deletes * 6))
            control.drift_control(ns, args.deletes)
            show("floor (minimal repairer, vmnetd running)", control.results["drift_control"])
        agent.stop()
    finally:
        lab.close()
        bench.shutil.rmtree(workdir, ignore_errors=True)
        bench.wait_netns_cleanup(240)


if __name__ == "__main__":
    main()
