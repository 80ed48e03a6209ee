#!/usr/bin/python3
"""Every class of drift against a host of 100 dual-stack VMs, repeated (issue 13's proof).

A dual-stack lab (X, the host, its uplink eth0) plus 100 VM links vmed000..vmed063, veth pairs
whose peers stay in the host namespace (these VMs carry no traffic): VM i has 198.51.100.(100+i)
and 2001:db8:1::1:i, and a MAC. Each round applies every class below to a VM picked at random,
times the repair from the end of the damage to the first poll that finds the VM's network (or
the setting) whole again, and checks that GetVm did not say PROGRAMMED while something had been
missing for longer than the bound. The slowest repair of each class is printed; every repair
must be within BOUND (1 s; ten times that under a sanitizer).

ROUNDS rounds (20; 5 under a sanitizer; VMNET_DRIFT_ROUNDS overrides). Needs root:
    /usr/bin/python3 tests/e2e/test_drift_suite.py [-v]
"""

import os
import random
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lab  # noqa: E402  (first: it explains a missing grpc module)
from test_dual_stack import DualStackTestCase, AGENT_PROTOCOLS  # noqa: E402

VMS = 100
ROUNDS = int(os.environ.get("VMNET_DRIFT_ROUNDS", "5" if lab.SANITIZED else "20"))
BOUND = lab.time_bound(1.0)
SEED = 13
PROGRAMMED = "VM_STATE_PROGRAMMED"
FAILED = "VM_STATE_FAILED"
PENDING = "VM_STATE_PENDING"


class BulkVm:
    def __init__(self, i):
        self.vm_id = f"drift-{i}"
        self.interface = f"vmed{i:03x}"
        self.peer = f"vmdp{i}"
        self.address = f"198.51.100.{100 + i}"
        self.address6 = f"2001:db8:1::1:{i:x}"
        self.mac = f"52:54:00:00:01:{i:02x}"


class DriftSuiteTest(DualStackTestCase):
    vm_count = 0

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.vms = [BulkVm(i) for i in range(VMS)]
        cls.lab.ip_batch(cls.lab.host, [line for vm in cls.vms for line in (
            f"link add {vm.interface} type veth peer name {vm.peer}", f"link set {vm.peer} up")])
        for vm in cls.vms:
            response = cls.call("AttachVm", {
                "vm_id": vm.vm_id, "interface": vm.interface, "mac_address": vm.mac,
                "ip_addresses": [vm.address, vm.address6]})
            assert response["vm"]["state"] == PROGRAMMED, response

    # -- the kernel, for one VM -----------------------------------------------------------------

    def ip(self, *args):
        return self.lab.ip_json(self.lab.host, *args)

    def missing(self, vm):
        dev = vm.interface
        missing = []
        routes = {r["dst"].split("/")[0] for r in self.ip("route", "show", "dev", dev)
                  + self.ip("-6", "route", "show", "dev", dev)
                  if r.get("protocol") in AGENT_PROTOCOLS}
        for a in (vm.address, vm.address6):
            if a not in routes:
                missing.append(f"route {a} dev {dev}")
        proxies = {p["dst"] for p in self.ip("neigh", "show", "proxy", "dev", lab.UPLINK)}
        for a in (vm.address, vm.address6):
            if a not in proxies:
                missing.append(f"proxy {a} dev {lab.UPLINK}")
        links = self.ip("addr", "show", "dev", dev)
        local = {a["local"] for link in links for a in link.get("addr_info", [])}
        for g in (lab.GATEWAY, lab.GATEWAY6):
            if g not in local:
                missing.append(f"address {g} dev {dev}")
        if not links or "UP" not in links[0]["flags"]:
            missing.append(f"link {dev} up")
        neighbours = {n["dst"] for n in self.ip("neigh", "show", "dev", dev, "nud", "permanent")
                      if n.get("lladdr") == vm.mac}
        for a in (vm.address, vm.address6):
            if a not in neighbours:
                missing.append(f"neighbour {a} dev {dev}")
        return missing

    def state(self, vm):
        return self.call("GetVm", {"vm_id": vm.vm_id})["vm"]["state"]

    def host(self, *args):
        self.lab.run(self.lab.host, *args)

    def wait_state(self, vm, state):
        self.assertTrue(lab.wait_until(lambda: self.state(vm) == state, lab.time_bound(5), 0.02),
                        f"{vm.vm_id} did not become {state}")

    # -- one repair ------------------------------------------------------------------------------

    def repaired(self, case, vm, whole):
        """Seconds from now until `whole()` holds; fails past BOUND, or when GetVm lied."""
        start = time.monotonic()
        while True:
            if whole():
                elapsed = time.monotonic() - start
                self.assertLessEqual(elapsed, BOUND, f"{case} on {vm.interface}: the repair "
                                                     f"took {elapsed * 1000:.0f} ms")
                return elapsed
            elapsed = time.monotonic() - start
            if elapsed > BOUND:
                self.assertNotEqual(self.state(vm), PROGRAMMED,
                                    f"{case} on {vm.interface}: GetVm says PROGRAMMED "
                                    f"{elapsed:.2f} s after, while it lacks {self.missing(vm)}")
            if elapsed > lab.time_bound(5):
                self.fail(f"{case} on {vm.interface}: not repaired; lacks {self.missing(vm)}")

    def objects(self, case, vm):
        return self.repaired(case, vm, lambda: not self.missing(vm))

    def setting(self, case, vm, name, value):
        return self.repaired(case, vm, lambda: self.lab.sysctl(name) == value)

    # -- the classes -----------------------------------------------------------------------------

    def classes(self):
        U = lab.UPLINK

        def route(vm):
            self.host("ip", "route", "del", f"{vm.address}/32", "dev", vm.interface)
            return self.objects("route deleted", vm)

        def route6(vm):
            self.host("ip", "-6", "route", "del", f"{vm.address6}/128", "dev", vm.interface)
            return self.objects("IPv6 route deleted", vm)

        def replaced(vm):
            other = next(o for o in self.vms if o is not vm)
            self.host("ip", "route", "replace", f"{vm.address}/32", "dev", other.interface,
                      "proto", "static")
            self.wait_state(vm, FAILED)
            self.host("ip", "route", "del", f"{vm.address}/32", "dev", other.interface)
            return self.objects("route replaced, then deleted", vm)

        def proxy(vm):
            self.host("ip", "neigh", "del", "proxy", vm.address, "dev", U)
            return self.objects("proxy entry deleted", vm)

        def proxy6(vm):
            self.host("ip", "-6", "neigh", "del", "proxy", vm.address6, "dev", U)
            return self.objects("IPv6 proxy entry deleted", vm)

        def gateway(vm):
            self.host("ip", "addr", "del", f"{lab.GATEWAY}/32", "dev", vm.interface)
            return self.objects("gateway deleted", vm)

        def gateway6(vm):
            self.host("ip", "-6", "addr", "del", f"{lab.GATEWAY6}/128", "dev", vm.interface)
            return self.objects("IPv6 gateway deleted", vm)

        def neighbour(vm):
            self.host("ip", "neigh", "del", vm.address, "dev", vm.interface)
            return self.objects("neighbour entry deleted", vm)

        def down(vm):
            self.host("ip", "link", "set", vm.interface, "down")
            return self.objects("link set down", vm)

        def flap(vm):
            self.host("ip", "link", "set", vm.interface, "down")
            self.host("ip", "link", "set", vm.interface, "up")
            return self.objects("link down and up", vm)

        def rename(vm):
            self.host("ip", "link", "set", vm.interface, "name", "vmedfff")
            self.wait_state(vm, PENDING)
            self.host("ip", "link", "set", "vmedfff", "name", vm.interface)
            return self.objects("link renamed and back", vm)

        def mtu(vm):
            self.host("ip", "link", "set", vm.interface, "mtu", "1200")
            self.wait_state(vm, FAILED)
            self.host("ip", "link", "set", vm.interface, "mtu", "1500")
            return self.objects("MTU 1200, then 1500", vm)

        def accept_ra(vm):
            name = f"net/ipv6/conf/{vm.interface}/accept_ra"
            self.lab.set_sysctl(name, 2)
            return self.setting("accept_ra set to 2", vm, name, "0")

        def forwarding4(vm):
            name = f"net/ipv4/conf/{vm.interface}/forwarding"
            self.lab.set_sysctl(name, 0)
            return self.setting("IPv4 forwarding off", vm, name, "1")

        def proxy_ndp(vm):
            name = f"net/ipv6/conf/{U}/proxy_ndp"
            self.lab.set_sysctl(name, 0)
            return self.setting("proxy_ndp off", vm, name, "1")

        def forwarding6(vm):
            name = "net/ipv6/conf/all/forwarding"
            self.lab.set_sysctl(name, 0)
            return self.setting("IPv6 forwarding off", vm, name, "1")

        def uplink(vm):
            self.host("ip", "link", "set", U, "down")
            self.host("ip", "link", "set", U, "up")
            return self.objects("uplink down and up", vm)

        return [route, route6, replaced, proxy, proxy6, gateway, gateway6, neighbour, down, flap,
                rename, mtu, accept_ra, forwarding4, proxy_ndp, forwarding6, uplink]

    def test_every_class_repaired_within_the_bound(self):
        # The host's own static IPv6 address would go with an uplink flap (a network manager
        # puts it back); keep it, as those do.
        self.lab.set_sysctl(f"net/ipv6/conf/{lab.UPLINK}/keep_addr_on_down", 1)
        rng = random.Random(SEED)
        slowest = {}
        for _ in range(ROUNDS):
            for damage in self.classes():
                vm = rng.choice(self.vms)
                elapsed = damage(vm)
                slowest[damage.__name__] = max(slowest.get(damage.__name__, 0), elapsed)
                # The next class starts from a whole host.
                self.assertTrue(lab.wait_until(lambda: not self.missing(vm), BOUND),
                                f"after {damage.__name__}, {vm.vm_id} lacks {self.missing(vm)}")
        print(f"\n  [measured] {VMS} VMs, {ROUNDS} rounds of {len(slowest)} classes; slowest "
              f"repair per class: " + "; ".join(f"{name} {t * 1000:.0f} ms"
                                                for name, t in slowest.items())
              + f"; slowest of all {max(slowest.values()) * 1000:.0f} ms",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    unittest.main()
