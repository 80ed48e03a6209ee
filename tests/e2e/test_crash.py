#!/usr/bin/python3
"""kill -9 in the middle of spec changes (issue 13, case 5): after each restart the kernel holds
exactly what the specs vmnetd reports ask for, on every VM link, whatever the crash point.

Three dual-stack VMs (links vme1a..vme3a) and a spare link (vme4a). Each round picks a VM and a
change of its spec, sends AttachVm, and kills vmnetd with SIGKILL: in even rounds exactly between
the durable save and the kernel writes (the crash point after_state_saved, VMNET_FAILPOINTS), in
odd rounds a random 0-40 ms after the request (before, during or after either); then starts it
again on the same state directory and compares, for every VM that ListVms reports, the objects
marked with vmnetd's protocol (routes, proxy entries, neighbour entries) and the gateway
addresses in the kernel with what its spec asks for. The changes:

  family removed     dual stack -> IPv4 only (the IPv6 route, proxy entry and gateway go)
  address removed    one of two IPv4 addresses goes
  MAC removed        the permanent neighbour entries go
  interface changed  the VM moves to the spare link (nothing of it stays on the old one)
  full               back to two IPv4 addresses, IPv6 and the MAC

ROUNDS rounds (50 by default; VMNET_CRASH_ROUNDS overrides). Needs root:
    /usr/bin/python3 tests/e2e/test_crash.py [-v]
"""

import os
import random
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lab  # noqa: E402  (first: it explains a missing grpc module)
import grpcurl  # noqa: E402
from test_dual_stack import DualStackTestCase  # noqa: E402

ROUNDS = int(os.environ.get("VMNET_CRASH_ROUNDS", "50"))
SEED = int(os.environ.get("VMNET_CRASH_SEED", "13"))
CONVERGE_DEADLINE = 5  # seconds after the restart for the kernel to match the specs
PROTOCOLS = (lab.AGENT_PROTOCOL, "vmnet")
SPARE = 4  # the lab VM whose link is the spare one


def extra_address(index):
    return f"203.0.113.{200 + index}"


class CrashDuringSpecChangeTest(DualStackTestCase):
    vm_count = 4

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.links = {i: cls.lab.vms[i].interface for i in range(1, 5)}
        cls.holder = {}  # link -> index of the VM holding it
        for index in (1, 2, 3):
            cls.call("AttachVm", cls.request(index, "full", cls.links[index]))
            cls.holder[cls.links[index]] = index

    @classmethod
    def request(cls, index, change, interface):
        vm = cls.lab.vms[index]
        addresses = [vm.address, extra_address(index), vm.address6]
        request = {"vm_id": vm.vm_id, "interface": interface, "mac_address": vm.mac}
        if change == "family removed":
            addresses = addresses[:2]
        elif change == "address removed":
            addresses = [vm.address, vm.address6]
        elif change == "MAC removed":
            del request["mac_address"]
        request["ip_addresses"] = addresses
        return request

    # -- what the kernel holds, and what the specs ask for ------------------------------------

    def kernel(self):
        host = self.lab.host
        routes = {(r["dst"].split("/")[0], r["dev"])
                  for r in self.lab.routes() + self.lab.routes6()
                  if r.get("protocol") in PROTOCOLS}
        proxies = {p["dst"] for p in self.lab.proxy_entries() + self.lab.proxy_entries6()
                   if p.get("protocol") in PROTOCOLS}
        neighbours = {(n["dst"], n["dev"], n.get("lladdr"))
                      for family in ("-4", "-6")
                      for n in self.lab.ip_json(host, family, "neigh", "show", "nud", "permanent")
                      if n.get("protocol") in PROTOCOLS}
        gateways = {(link["ifname"], a["local"])
                    for link in self.lab.ip_json(host, "addr", "show")
                    for a in link.get("addr_info", [])
                    if a["local"] in (lab.GATEWAY, lab.GATEWAY6)}
        return {"routes": routes, "proxies": proxies, "neighbours": neighbours,
                "gateways": gateways}

    def wanted(self, vms):
        want = {"routes": set(), "proxies": set(), "neighbours": set(), "gateways": set()}
        for vm in vms:
            dev = vm["interface"]
            want["gateways"].add((dev, lab.GATEWAY))
            for a in vm["ip_addresses"]:
                want["routes"].add((a, dev))
                want["proxies"].add(a)
                if vm.get("mac_address"):
                    want["neighbours"].add((a, dev, vm["mac_address"]))
                if ":" in a:
                    want["gateways"].add((dev, lab.GATEWAY6))
        return want

    def listed(self):
        return self.call("ListVms", {}).get("vms", [])

    # -- the rounds ---------------------------------------------------------------------------

    def attach_and_kill(self, request, delay):
        """AttachVm, and vmnetd killed `delay` seconds later (None: at its crash point
        after_state_saved, see base/failpoint.h), then started again."""
        outcome = {}
        if delay is None:
            # Restarted with the crash point armed: it dies on this very change.
            self.lab.daemon.stop()
            os.environ["VMNET_FAILPOINTS"] = "after_state_saved"
            try:
                self.lab.daemon.start()
            finally:
                del os.environ["VMNET_FAILPOINTS"]

        def attach():
            try:
                with grpcurl.Client(self.lab.daemon.target) as client:
                    outcome["answer"] = client.call("vmnet.v1.VmNetwork/AttachVm", request)
            except Exception as e:  # noqa: BLE001  (cut off by the kill: expected)
                outcome["error"] = e

        thread = threading.Thread(target=attach, daemon=True)
        thread.start()
        if delay is None:
            exited = lab.wait_until(lambda: self.lab.daemon.process.poll() is not None, 10)
            self.assertTrue(exited, "vmnetd did not reach its crash point after_state_saved")
        else:
            time.sleep(delay)  # the crash point: a random input of the test, not a synchronisation
        self.lab.daemon.kill()
        thread.join(timeout=30)
        self.lab.daemon.start()
        self.__class__.client = self.enterClassContext(grpcurl.Client(self.lab.daemon.target))
        return outcome

    def test_kill_during_spec_changes(self):
        rng = random.Random(SEED)
        changes = ("family removed", "address removed", "MAC removed", "interface changed",
                   "full")
        counts = {}
        slowest = 0.0
        for round_number in range(ROUNDS):
            while True:  # a change that changes something
                index = rng.choice((1, 2, 3))
                change = rng.choice(changes)
                current = next(vm for vm in self.listed()
                               if vm["vm_id"] == self.lab.vms[index].vm_id)
                interface = current["interface"]
                if change == "interface changed":
                    free = [link for link in self.links.values()
                            if link not in {vm["interface"] for vm in self.listed()}]
                    interface = rng.choice(free)
                request = self.request(index, change, interface)
                if (request["interface"], sorted(request["ip_addresses"]),
                        request.get("mac_address", "")) != (
                        current["interface"], sorted(current["ip_addresses"]),
                        current.get("mac_address", "")):
                    break
            # Every other round dies exactly between saving the spec and its kernel writes.
            delay = rng.uniform(0, 0.04) if round_number % 2 else None
            when = "after saving" if delay is None else f"after {delay * 1000:.0f} ms"
            print(f"  round {round_number}: {change} of vm-{index} on {interface}, killed "
                  f"{when}", file=sys.stderr, flush=True)
            outcome = self.attach_and_kill(request, delay)
            counts[change] = counts.get(change, 0) + 1
            if "answer" in outcome:
                acknowledged = outcome["answer"]["vm"]
                listed = next((vm for vm in self.listed() if vm["vm_id"] == request["vm_id"]),
                              None)
                self.assertEqual((listed or {}).get("ip_addresses"),
                                 acknowledged["ip_addresses"],
                                 f"round {round_number}: an acknowledged {change} was lost by "
                                 f"the restart: {acknowledged} -> {listed}")
            start = time.monotonic()
            last = {}

            def converged():
                vms = self.listed()
                last["want"], last["have"] = self.wanted(vms), self.kernel()
                return last["want"] == last["have"]

            ok = lab.wait_until(converged, CONVERGE_DEADLINE, interval=0.05)
            slowest = max(slowest, time.monotonic() - start)
            if not ok:
                diff = {k: {"missing": sorted(last["want"][k] - last["have"][k]),
                            "extra": sorted(last["have"][k] - last["want"][k])}
                        for k in last["want"] if last["want"][k] != last["have"][k]}
                self.fail(f"round {round_number}: {change} of vm-{index} killed {when} "
                          f"({'acknowledged' if 'answer' in outcome else 'not acknowledged'}); "
                          f"{CONVERGE_DEADLINE} s after the restart the kernel differs from "
                          f"the specs: {diff}")
        print(f"\n  [measured] {ROUNDS} kill -9 rounds ({counts}); slowest convergence after a "
              f"restart {slowest * 1000:.0f} ms", file=sys.stderr, flush=True)


if __name__ == "__main__":
    unittest.main()
