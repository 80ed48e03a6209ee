#!/usr/bin/python3
"""End-to-end test of host-routed mode: vmnetd in a namespace lab, driven as grpcurl would.

    Computer X ── LAN ── eth0 (uplink) [ HOST ] vme1a ══ eth0 [ VM 1 ]  198.51.100.201/32
    198.51.100.10        198.51.100.1              vme2a ══ eth0 [ VM 2 ]  198.51.100.202/32

One lab and one vmnetd per test class: ReflectionTest (what grpcurl sees), AttachedTest (both
VMs attached: reachability, what the host and the API show, rejected requests, Watch),
DetachTest, DetachAllTest (an administrator's objects survive), DriftRepairTest (someone damages
the host's state) and RestartTest (SIGTERM and start again on the same state directory).

Needs root and the vmnetd binary (<repo>/build/server/vmnetd, or set VMNETD); skips without
root, fails as root when it cannot run (tests/skips.py).
Run with the Debian python (it has python3-grpcio):

    /usr/bin/python3 tests/e2e/test_host_routed.py [-v] [TestClass.test_method]
    /usr/bin/python3 -m unittest discover -s tests/e2e -v
"""

import os
import queue
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import skips  # noqa: E402  (tests/skips.py: no skips as root)
import lab  # noqa: E402  (first: it explains a missing grpc module)
import grpcurl  # noqa: E402
from grpc import StatusCode  # noqa: E402

SERVICE = "vmnet.v1.VmNetwork"
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"

# Objects an administrator made on the host; vmnetd must never touch them.
FOREIGN_ROUTE = "203.0.113.0/24"
FOREIGN_PROXY = "198.51.100.99"
FOREIGN_ADDRESS = "198.51.100.2"

# vmnetd's marker (--route-protocol, 237 by default), as `ip -j` prints it: the number, or
# the name deploy/iproute2/rt_protos.d/vmnet.conf gives it when that file is installed.
AGENT_PROTOCOLS = (lab.AGENT_PROTOCOL, "vmnet")

# net-tools `arp -n` prints proxy entries as "IP  *  <from_interface>  MP  IFACE".
ARP_N_PROXY_HW_ADDRESS = "<from_interface>"

REACH_DEADLINE = 5  # seconds for a ping that must get through (ARP on the way)
PROGRAM_DEADLINE = 10  # seconds for the kernel to show what the agent programs asynchronously


def add_foreign_objects(the_lab):
    """A route, a proxy entry and an uplink address that are not the agent's."""
    the_lab.run(the_lab.host, "ip", "route", "add", FOREIGN_ROUTE, "dev", lab.UPLINK)
    the_lab.run(the_lab.host, "ip", "neigh", "add", "proxy", FOREIGN_PROXY, "dev", lab.UPLINK)
    the_lab.run(the_lab.host, "ip", "addr", "add", f"{FOREIGN_ADDRESS}/24", "dev", lab.UPLINK)


def missing_foreign_objects(the_lab):
    """Descriptions of the foreign objects that are no longer on the host."""
    missing = []
    if not any(r["dst"] == FOREIGN_ROUTE and r.get("dev") == lab.UPLINK for r in the_lab.routes()):
        missing.append(f"route {FOREIGN_ROUTE} dev {lab.UPLINK}")
    if not any(p["dst"] == FOREIGN_PROXY for p in the_lab.proxy_entries()):
        missing.append(f"proxy entry {FOREIGN_PROXY} dev {lab.UPLINK}")
    if not any(a["local"] == FOREIGN_ADDRESS for a in the_lab.addresses(lab.UPLINK)):
        missing.append(f"address {FOREIGN_ADDRESS}/24 on {lab.UPLINK}")
    return missing


def kernel_route(the_lab, address):
    """The host's route to `address`/32 as `ip -j route` shows it, or None."""
    return next((r for r in the_lab.routes() if r["dst"] in (address, f"{address}/32")), None)


def kernel_proxy_entry(the_lab, address):
    """The host's proxy entry for `address` as `ip -j -d neigh show proxy` shows it, or None."""
    return next((p for p in the_lab.proxy_entries() if p["dst"] == address), None)


def has_gateway_address(the_lab, dev):
    return any(a["local"] == lab.GATEWAY and a["prefixlen"] == 32 for a in the_lab.addresses(dev))


class EventCollector:
    """Reads a Watch stream in a background thread so that the test can wait with a deadline."""

    def __init__(self, stream):
        self._stream = stream
        self._events = queue.Queue()
        self.seen = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        try:
            for event in self._stream:
                self._events.put(event)
        except grpcurl.RpcError as e:
            self._events.put(e)

    def next_matching(self, predicate, timeout):
        """The first new event for which `predicate` holds, or None after `timeout` seconds.
        Every event read is also kept in `seen`; an error that ended the stream is raised."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                event = self._events.get(timeout=remaining)
            except queue.Empty:
                break
            if isinstance(event, grpcurl.RpcError):
                raise event
            self.seen.append(event)
            if predicate(event):
                return event
        return None

    def drain(self):
        """Moves every event received so far into `seen`, without waiting; returns `seen`."""
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return self.seen
            if not isinstance(event, grpcurl.RpcError):
                self.seen.append(event)

    def close(self):
        self._stream.cancel()
        self._thread.join(timeout=5)


class LabTestCase(unittest.TestCase):
    """One lab and one vmnetd per test class; subclasses set vm_count and prepare the host."""

    vm_count = 2
    daemon_flags = ()

    @classmethod
    def setUpClass(cls):
        cls.lab = cls.enterClassContext(lab.Lab(vm_count=cls.vm_count))
        cls.prepare_host()
        cls.lab.start_daemon(*cls.daemon_flags)
        cls.client = cls.enterClassContext(grpcurl.Client(cls.lab.daemon.target))

    @classmethod
    def prepare_host(cls):
        """Runs before vmnetd starts."""

    def run(self, result=None):
        """Runs the test; when it fails, prints the end of the daemon's log."""
        result = result if result is not None else self.defaultTestResult()
        problems = len(result.failures) + len(result.errors)
        super().run(result)
        if len(result.failures) + len(result.errors) > problems:
            self._print_daemon_log()
        return result

    def _print_daemon_log(self, lines=80):
        daemon = getattr(getattr(self, "lab", None), "daemon", None)
        if daemon is None:
            return
        tail = "\n".join(daemon.log().splitlines()[-lines:])
        print(f"\n--- {self.id()} failed; last {lines} lines of the vmnetd log ---\n{tail}\n"
              f"--- end of vmnetd log ---", file=sys.stderr)

    # -- API helpers -----------------------------------------------------------------------------

    @classmethod
    def call(cls, method, request=None):
        return cls.client.call(f"{SERVICE}/{method}", request or {})

    @classmethod
    def attach(cls, vm, with_mac=False, **overrides):
        """AttachVm for a lab VM; `overrides` replace request fields."""
        request = {"vm_id": vm.vm_id, "interface": vm.interface, "ip_addresses": [vm.address]}
        if with_mac:
            request["mac_address"] = vm.mac
        request.update(overrides)
        return cls.call("AttachVm", request)

    @classmethod
    def detach(cls, vm_id, allow_missing=False):
        return cls.call("DetachVm", {"vm_id": vm_id, "allow_missing": allow_missing})

    def assertStatus(self, code, method, request, what):
        """Asserts that `method` fails with `code`; returns the RpcError."""
        with self.assertRaises(grpcurl.RpcError, msg=f"{what}: {method} {request} succeeded, "
                                                     f"expected {code.name}") as caught:
            self.call(method, request)
        self.assertEqual(caught.exception.code, code,
                         f"{what}: {method} {request} answered {caught.exception}")
        return caught.exception

    def watch(self, request):
        """A Watch stream read in the background, cancelled when the test ends; returned once
        vmnetd sent its response headers, which it does once the watcher is registered: from
        then on it misses no change."""
        stream = self.client.stream(f"{SERVICE}/Watch", request, each="events")
        collector = EventCollector(stream)
        self.addCleanup(collector.close)
        self.assertTrue(stream.wait_for_headers(5),
                        f"Watch {request} sent no response headers within 5 s")
        return collector

    def watch_after_snapshot(self):
        """A Watch with initial_snapshot, read up to its SNAPSHOT_END (returned too): from
        there on the watcher is registered and sees every change."""
        events = self.watch({"initial_snapshot": True})
        end = events.next_matching(lambda e: e["type"] == "EVENT_TYPE_SNAPSHOT_END", timeout=5)
        self.assertIsNotNone(end, f"Watch initial_snapshot sent no SNAPSHOT_END: {events.seen}")
        return events, end

    # -- network helpers -------------------------------------------------------------------------

    def assertReaches(self, ns, address, who):
        self.assertTrue(self.lab.ping(ns, address, deadline=REACH_DEADLINE),
                        f"{who} cannot ping {address} within {REACH_DEADLINE} s")

    def assertCannotReach(self, ns, address, who):
        self.assertFalse(self.lab.ping(ns, address, count=2, timeout=1),
                         f"{who} can still ping {address}")

    def missing_objects(self, vm):
        """What the host lacks of the VM's network: its /32 route, its proxy entry on the
        uplink, the gateway address on its link, its link up."""
        missing = []
        if kernel_route(self.lab, vm.address) is None:
            missing.append(f"route {vm.address}/32 dev {vm.interface}")
        if kernel_proxy_entry(self.lab, vm.address) is None:
            missing.append(f"proxy entry {vm.address} dev {lab.UPLINK}")
        if not has_gateway_address(self.lab, vm.interface):
            missing.append(f"address {lab.GATEWAY}/32 dev {vm.interface}")
        if "UP" not in self.lab.link(vm.interface)["flags"]:
            missing.append(f"link {vm.interface} up")
        return missing


class ReflectionTest(LabTestCase):
    """What `grpcurl -unix ... list / describe / Health/Check` shows."""

    vm_count = 0

    def test_list_shows_services(self):
        services = self.client.list_services()
        for service in (SERVICE, HEALTH_SERVICE, REFLECTION_SERVICE):
            self.assertIn(service, services, f"`grpcurl list` does not show {service}")

    def test_describe_shows_vmnetwork_methods(self):
        text = self.client.describe(SERVICE)
        for method in ("AttachVm", "DetachVm", "ListArp", "ListRoutes", "Watch"):
            self.assertIn(f"rpc {method} ", text, f"`grpcurl describe {SERVICE}` lacks {method}:\n"
                                                   f"{text}")
        self.assertIn("returns ( stream .vmnet.v1.WatchResponse )", text,
                      f"Watch is not shown as server-streaming:\n{text}")

    def test_describe_message(self):
        text = self.client.describe("vmnet.v1.AttachVmRequest")
        for field in ("vm_id", "interface", "ip_addresses", "mac_address"):
            self.assertIn(f" {field} = ", text, f"AttachVmRequest lacks {field}:\n{text}")

    def test_health_check_serving(self):
        response = self.client.call(f"{HEALTH_SERVICE}/Check", {})
        self.assertEqual(response.get("status"), "SERVING",
                         f"`grpcurl {HEALTH_SERVICE}/Check` answered {response}")


class AttachedTest(LabTestCase):
    """Both VMs attached (VM 1 with its MAC), with an administrator's objects on the host."""

    @classmethod
    def prepare_host(cls):
        add_foreign_objects(cls.lab)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.vm1, cls.vm2 = cls.lab.vms[1], cls.lab.vms[2]
        cls.reachable_before_attach = cls.lab.ping(cls.lab.x, cls.vm1.address, count=2)
        cls.responses = {cls.vm1.vm_id: cls.attach(cls.vm1, with_mac=True),
                         cls.vm2.vm_id: cls.attach(cls.vm2)}

    def tearDown(self):
        # Tests that attach extra VMs detach them again, so the class shares one picture.
        for vm_id in ("vm-3", "vm-4", "vm-invalid"):
            self.detach(vm_id, allow_missing=True)

    def extra_vm(self, index, with_link=True):
        """VM `index` beyond the first two, created once per class."""
        return self.lab.vms.get(index) or self.lab.add_vm(index, with_link=with_link)

    # -- attach and reachability -------------------------------------------------------------

    def test_vm_unreachable_before_attach(self):
        self.assertFalse(self.reachable_before_attach,
                         f"X could ping {self.vm1.address} before AttachVm")

    def test_attach_reports_programmed(self):
        for vm in (self.vm1, self.vm2):
            got = self.responses[vm.vm_id].get("vm", {})
            self.assertEqual(got.get("state"), "VM_STATE_PROGRAMMED",
                             f"AttachVm {vm.vm_id} answered {got}")
            self.assertEqual(got.get("vm_id"), vm.vm_id, f"AttachVm answered {got}")
            self.assertEqual(got.get("interface"), vm.interface, f"AttachVm answered {got}")
            self.assertEqual(got.get("ip_addresses"), [vm.address], f"AttachVm answered {got}")
        self.assertEqual(self.responses["vm-1"]["vm"].get("mac_address"), self.vm1.mac,
                         f"AttachVm vm-1 did not echo its MAC: {self.responses['vm-1']}")

    def test_attach_same_spec_again_is_a_no_op(self):
        before = self.lab.snapshot()
        again = self.attach(self.vm2)
        self.assertEqual(again["vm"].get("state"), "VM_STATE_PROGRAMMED",
                         f"AttachVm vm-2 again answered {again}")
        self.assertEqual(self.lab.snapshot(), before,
                         "AttachVm with the same spec changed the host")

    def test_x_reaches_both_vms(self):
        for vm in (self.vm1, self.vm2):
            self.assertReaches(self.lab.x, vm.address, "X")

    def test_vms_reach_x(self):
        for vm in (self.vm1, self.vm2):
            self.assertReaches(vm.ns, lab.X_ADDRESS, f"VM {vm.index}")

    def test_vm1_reaches_vm2(self):
        self.assertReaches(self.vm1.ns, self.vm2.address, "VM 1")

    # -- what the host shows -------------------------------------------------------------------

    def test_arp_n_shows_published_entries(self):
        text = self.lab.arp_text()
        for vm in (self.vm1, self.vm2):
            lines = [a for a in self.lab.arp() if a.address == vm.address and a.iface == lab.UPLINK]
            self.assertEqual(len(lines), 1, f"`arp -n` on the host has no {vm.address} on "
                                            f"{lab.UPLINK}:\n{text}")
            line = lines[0]
            self.assertEqual((line.hw_type, line.hw_address, line.flags),
                             ("*", ARP_N_PROXY_HW_ADDRESS, "MP"),
                             f"`arp -n` does not show {vm.address} as published:\n{text}")

    def test_list_arp_returns_published_entries(self):
        entries = self.call("ListArp").get("entries", [])
        for vm in (self.vm1, self.vm2):
            mine = [e for e in entries
                    if e["ip_address"] == vm.address and e["interface"] == lab.UPLINK]
            self.assertEqual(len(mine), 1, f"ListArp has no {vm.address} on {lab.UPLINK}: "
                                           f"{entries}")
            entry = mine[0]
            self.assertEqual((entry["hw_type"], entry["hw_address"], entry["flags"],
                              entry["vm_id"]), ("*", "*", "MP", vm.vm_id),
                             f"ListArp shows {vm.address} as {entry}")
        foreign = [e for e in entries if e["ip_address"] == FOREIGN_PROXY]
        self.assertEqual([e["vm_id"] for e in foreign], [""],
                         f"ListArp shows the administrator's proxy entry as {foreign}")

    def test_list_routes_returns_vm_routes(self):
        routes = self.call("ListRoutes").get("routes", [])
        for vm in (self.vm1, self.vm2):
            mine = [r for r in routes if r["destination"] == f"{vm.address}/32"]
            self.assertEqual(len(mine), 1, f"ListRoutes has no {vm.address}/32: {routes}")
            self.assertEqual((mine[0]["interface"], mine[0]["vm_id"], mine[0]["scope"]),
                             (vm.interface, vm.vm_id, "link"),
                             f"ListRoutes shows {vm.address}/32 as {mine[0]}")
        foreign = [r for r in routes if r["destination"] == FOREIGN_ROUTE]
        self.assertEqual([r["vm_id"] for r in foreign], [""],
                         f"ListRoutes shows the administrator's route as {foreign}")
        only_vm1 = self.call("ListRoutes", {"vm_id": "vm-1", "family": "ADDRESS_FAMILY_IPV4"}
                             ).get("routes", [])
        self.assertEqual([r["destination"] for r in only_vm1], [f"{self.vm1.address}/32"],
                         f"ListRoutes vm_id=vm-1 answered {only_vm1}")

    def test_kernel_routes_are_marked_as_the_agents(self):
        listed = {r["destination"]: r for r in self.call("ListRoutes").get("routes", [])}
        for vm in (self.vm1, self.vm2):
            route = kernel_route(self.lab, vm.address)
            self.assertIsNotNone(route, f"`ip route` on the host has no {vm.address}")
            self.assertEqual((route.get("dev"), route.get("scope")), (vm.interface, "link"),
                             f"`ip route` shows {route}")
            protocol = route.get("protocol")
            self.assertIn(protocol, AGENT_PROTOCOLS,
                          f"the route to {vm.address} is not marked as the agent's "
                          f"(proto {lab.AGENT_PROTOCOL}): {route}")
            proxy = kernel_proxy_entry(self.lab, vm.address)
            self.assertIsNotNone(proxy, f"`ip neigh show proxy` has no {vm.address}")
            self.assertEqual(proxy.get("protocol"), protocol,
                             f"proxy entry {proxy} and route {route} carry different markers")
            self.assertIn(listed[f"{vm.address}/32"]["protocol"], (protocol, "vmnet"),
                          f"ListRoutes and `ip route` disagree on the protocol of {vm.address}")

    def test_gateway_address_on_each_vm_link(self):
        for vm in (self.vm1, self.vm2):
            self.assertTrue(has_gateway_address(self.lab, vm.interface),
                            f"`ip addr show dev {vm.interface}` lacks {lab.GATEWAY}/32: "
                            f"{self.lab.addresses(vm.interface)}")

    def test_vm_links_are_up(self):
        for vm in (self.vm1, self.vm2):
            flags = self.lab.link(vm.interface)["flags"]
            self.assertIn("UP", flags, f"`ip link show {vm.interface}` is not UP: {flags}")

    def test_vm_mac_installed_as_permanent_neighbour(self):
        entries = self.lab.neighbours(self.vm1.interface)
        mine = [n for n in entries if n["dst"] == self.vm1.address]
        self.assertTrue(mine and mine[0].get("lladdr") == self.vm1.mac
                        and "PERMANENT" in mine[0].get("state", []),
                        f"`ip neigh show dev {self.vm1.interface}` has no permanent "
                        f"{self.vm1.address} lladdr {self.vm1.mac}: {entries}")

    def test_foreign_objects_untouched(self):
        self.assertEqual(missing_foreign_objects(self.lab), [],
                         "vmnetd removed objects that are not its own")

    # -- errors ----------------------------------------------------------------------------------

    def test_invalid_requests_change_nothing(self):
        valid = {"vm_id": "vm-invalid", "interface": "vme9a", "ip_addresses": ["198.51.100.209"]}
        bad_addresses = ["224.0.0.1", "127.0.0.1", "0.0.0.0", "255.255.255.255", "198.51.100.255",
                         "169.254.1.1", lab.GATEWAY, lab.HOST_ADDRESS, "not-an-ip", "fe80::1",
                         "::ffff:198.51.100.209"]
        cases = [
            ("vm_id", {"vm_id": ""}),
            ("vm_id", {"vm_id": "vm 1"}),
            ("interface", {"interface": lab.UPLINK}),
            ("interface", {"interface": "foo1"}),
            ("interface", {"interface": "vme0123456789abc"}),
            ("ip_addresses", {"ip_addresses": []}),
            *[("ip_addresses", {"ip_addresses": [a]}) for a in bad_addresses],
            ("mac_address", {"mac_address": "01:00:5e:00:00:01"}),
            ("mac_address", {"mac_address": "00:00:00:00:00:00"}),
            ("mac_address", {"mac_address": "zz"}),
        ]
        before = self.lab.snapshot()
        for field, change in cases:
            request = {**valid, **change}
            with self.subTest(change=change):
                error = self.assertStatus(StatusCode.INVALID_ARGUMENT, "AttachVm", request,
                                          f"AttachVm with {change}")
                self.assertIn(field, error.details,
                              f"AttachVm with {change}: the message does not name {field}")
        self.assertEqual(self.lab.snapshot(), before, "a rejected AttachVm changed the host")
        self.assertStatus(StatusCode.NOT_FOUND, "DetachVm", {"vm_id": "vm-invalid"},
                          "a rejected AttachVm left vm-invalid recorded")

    def test_taken_address_or_interface_already_exists(self):
        vm3 = self.extra_vm(3)
        cases = [("address", {"vm_id": "vm-3", "interface": vm3.interface,
                              "ip_addresses": [self.vm1.address]}),
                 ("interface", {"vm_id": "vm-3", "interface": self.vm1.interface,
                                "ip_addresses": [vm3.address]})]
        before = self.lab.snapshot()
        for what, request in cases:
            with self.subTest(taken=what):
                error = self.assertStatus(StatusCode.ALREADY_EXISTS, "AttachVm", request,
                                          f"AttachVm vm-3 with vm-1's {what}")
                self.assertIn("vm-1", error.details,
                              f"ALREADY_EXISTS for vm-1's {what} does not name vm-1")
        self.assertEqual(self.lab.snapshot(), before, "a rejected AttachVm changed the host")

    def test_detach_unknown_vm(self):
        self.assertStatus(StatusCode.NOT_FOUND, "DetachVm", {"vm_id": "vm-unknown"},
                          "DetachVm of a VM never attached")
        self.assertEqual(self.detach("vm-unknown", allow_missing=True), {},
                         "DetachVm with allow_missing of an unknown VM did not answer OK")

    # -- changes over time -----------------------------------------------------------------------

    def test_watch_reports_attach(self):
        vm3 = self.extra_vm(3)
        events = self.watch({})  # registered once it returns: "from now" includes the attach
        self.attach(vm3)
        event = events.next_matching(lambda e: e.get("vm", {}).get("vm_id") == "vm-3", timeout=5)
        self.assertIsNotNone(event, f"Watch showed no event for vm-3 after AttachVm vm-3; "
                                    f"saw {events.seen}")
        self.assertEqual(event["type"], "EVENT_TYPE_VM_ADDED", f"first vm-3 event: {event}")
        self.assertGreater(int(event["revision"]), 0, f"event without a revision: {event}")

    def test_watch_snapshot_then_changes(self):
        vm3 = self.extra_vm(3)
        events, end = self.watch_after_snapshot()
        snapshot = {e["vm"]["vm_id"] for e in events.seen if e["type"] == "EVENT_TYPE_SNAPSHOT"}
        self.assertLessEqual({"vm-1", "vm-2"}, snapshot,
                             f"the initial snapshot lacks vm-1 or vm-2: {events.seen}")
        self.attach(vm3)
        added = events.next_matching(lambda e: e.get("vm", {}).get("vm_id") == "vm-3", timeout=5)
        self.assertIsNotNone(added, f"Watch showed no vm-3 event after the snapshot: {events.seen}")
        self.assertGreater(int(added["revision"]), int(end["revision"]),
                           f"revision did not increase after the snapshot: {end} then {added}")

    def test_foreign_route_in_the_way_fails_the_vm_until_it_goes(self):
        """README "Never someone else's", against the real kernel: an administrator's route
        to a VM's address is never overwritten; the VM is FAILED naming it, and is programmed
        once the route goes."""
        vm6 = self.extra_vm(6)
        self.lab.run(self.lab.host, "ip", "route", "add", f"{vm6.address}/32", "dev",
                     lab.UPLINK, "proto", "static")
        self.addCleanup(self.detach, vm6.vm_id, allow_missing=True)
        self.addCleanup(self.lab.run, self.lab.host, "ip", "route", "del", f"{vm6.address}/32",
                        "proto", "static", check=False)
        vm = self.attach(vm6)["vm"]
        self.assertEqual(vm.get("state"), "VM_STATE_FAILED", vm)
        self.assertIn(f"route {vm6.address}/32", vm.get("message", ""), vm)
        self.assertIn("is not vmnetd's", vm.get("message", ""), vm)
        route = kernel_route(self.lab, vm6.address)
        self.assertEqual((route or {}).get("protocol"), "static",
                         f"the administrator's route was overwritten: {route}")
        self.assertEqual((route or {}).get("dev"), lab.UPLINK, route)
        self.lab.run(self.lab.host, "ip", "route", "del", f"{vm6.address}/32", "proto", "static")
        programmed = lab.wait_until(
            lambda: self.call("GetVm", {"vm_id": vm6.vm_id})["vm"].get("state") ==
            "VM_STATE_PROGRAMMED", PROGRAM_DEADLINE)
        self.assertTrue(programmed, "vm-6 was not programmed once the route in the way went")
        route = kernel_route(self.lab, vm6.address) or {}
        self.assertEqual(route.get("dev"), vm6.interface, route)
        self.assertIn(route.get("protocol"), AGENT_PROTOCOLS, route)

    def test_pending_until_interface_appears(self):
        vm4 = self.extra_vm(4, with_link=False)
        response = self.attach(vm4)
        self.assertEqual(response["vm"].get("state"), "VM_STATE_PENDING",
                         f"AttachVm of a VM whose {vm4.interface} does not exist yet answered "
                         f"{response}")
        self.lab.add_vm_link(4)
        self.assertTrue(lab.wait_until(lambda: kernel_route(self.lab, vm4.address),
                                       PROGRAM_DEADLINE),
                        f"{vm4.interface} appeared but the host has no route to {vm4.address} "
                        f"after {PROGRAM_DEADLINE} s")
        self.assertReaches(self.lab.x, vm4.address, "X")


class DetachTest(LabTestCase):
    """Both VMs attached, then VM 1 detached."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.vm1, cls.vm2 = cls.lab.vms[1], cls.lab.vms[2]
        cls.attach(cls.vm1, with_mac=True)
        cls.attach(cls.vm2)
        cls.reachable_before_detach = cls.lab.ping(cls.lab.x, cls.vm1.address,
                                                   deadline=REACH_DEADLINE)
        cls.detach(cls.vm1.vm_id)

    def test_vm1_was_reachable_before_detach(self):
        self.assertTrue(self.reachable_before_detach,
                        f"X could not ping {self.vm1.address} after AttachVm (precondition)")

    def test_x_can_no_longer_reach_vm1(self):
        self.assertCannotReach(self.lab.x, self.vm1.address, "X")

    def test_vm1_objects_are_gone(self):
        address, dev = self.vm1.address, self.vm1.interface
        self.assertIsNone(kernel_route(self.lab, address),
                          f"`ip route` still has {address} after DetachVm vm-1")
        self.assertIsNone(kernel_proxy_entry(self.lab, address),
                          f"`ip neigh show proxy` still has {address} after DetachVm vm-1")
        published = [a for a in self.lab.arp() if a.address == address and "P" in a.flags]
        self.assertEqual(published, [], f"`arp -n` still publishes {address}")
        self.assertFalse(has_gateway_address(self.lab, dev),
                         f"`ip addr show dev {dev}` still has {lab.GATEWAY}/32 after DetachVm")
        permanent = [n for n in self.lab.neighbours(dev) if "PERMANENT" in n.get("state", [])]
        self.assertEqual(permanent, [], f"`ip neigh show dev {dev}` still has {permanent}")

    def test_api_forgets_vm1(self):
        self.assertEqual(self.call("ListRoutes", {"vm_id": "vm-1"}).get("routes"), [],
                         "ListRoutes vm_id=vm-1 still lists routes after DetachVm")
        self.assertEqual(self.call("ListArp", {"vm_id": "vm-1"}).get("entries"), [],
                         "ListArp vm_id=vm-1 still lists entries after DetachVm")
        self.assertStatus(StatusCode.NOT_FOUND, "DetachVm", {"vm_id": "vm-1"},
                          "DetachVm vm-1 a second time")

    def test_vm1_link_still_exists(self):
        self.assertIsNotNone(self.lab.link(self.vm1.interface),
                             f"DetachVm vm-1 deleted {self.vm1.interface}; the hypervisor owns it")

    def test_vm2_still_works(self):
        self.assertEqual(self.missing_objects(self.vm2), [],
                         "DetachVm vm-1 took away part of vm-2's network")
        self.assertReaches(self.lab.x, self.vm2.address, "X")
        self.assertReaches(self.vm2.ns, lab.X_ADDRESS, "VM 2")


class DetachAllTest(LabTestCase):
    """An administrator's objects, then both VMs attached and detached again."""

    @classmethod
    def prepare_host(cls):
        add_foreign_objects(cls.lab)
        cls.before = cls.lab.snapshot()

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        for vm in cls.lab.vms.values():
            cls.attach(vm, with_mac=True)
        cls.programmed = cls.lab.snapshot()
        for vm in cls.lab.vms.values():
            cls.detach(vm.vm_id)

    def test_attach_changed_the_host(self):
        self.assertNotEqual(self.programmed, self.before, "AttachVm changed nothing on the host")

    def test_foreign_objects_survive(self):
        self.assertEqual(missing_foreign_objects(self.lab), [],
                         "vmnetd removed objects that are not its own")

    def test_host_is_back_to_where_it_started(self):
        self.assertEqual(self.lab.snapshot(), self.before,
                         "after detaching every VM the host's routes, proxy entries or "
                         "addresses differ from before the first attach")



class DriftRepairTest(LabTestCase):
    """VM 1 attached; someone damages what vmnetd installed, and vmnetd repairs it."""

    vm_count = 1

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.vm1 = cls.lab.vms[1]

    def setUp(self):
        # Every test starts from a freshly attached VM 1, whatever the previous test left.
        self.detach(self.vm1.vm_id, allow_missing=True)
        self.attach(self.vm1)

    def assertRepaired(self, *damage):
        """Runs `damage` (an ip command) on the host; vmnetd must restore VM 1's whole network
        within PROGRAM_DEADLINE, so that X reaches it again."""
        self.lab.run(self.lab.host, *damage)
        repaired = lab.wait_until(lambda: not self.missing_objects(self.vm1), PROGRAM_DEADLINE)
        self.assertTrue(repaired, f"after `{' '.join(damage)}` on the host, vmnetd had not "
                                  f"restored {self.missing_objects(self.vm1)} within "
                                  f"{PROGRAM_DEADLINE} s")
        self.assertReaches(self.lab.x, self.vm1.address, "X")

    def test_deleted_route_is_put_back_and_reported(self):
        events, _ = self.watch_after_snapshot()
        self.assertRepaired("ip", "route", "del", f"{self.vm1.address}/32",
                            "dev", self.vm1.interface)
        repaired = events.next_matching(lambda e: e["type"] == "EVENT_TYPE_DRIFT_REPAIRED",
                                        timeout=5)
        self.assertIsNotNone(repaired, f"Watch showed no DRIFT_REPAIRED after the route to "
                                       f"{self.vm1.address} was put back: {events.seen}")

    def test_deleted_proxy_entry_is_put_back(self):
        self.assertRepaired("ip", "neigh", "del", "proxy", self.vm1.address, "dev", lab.UPLINK)

    def test_deleted_gateway_address_is_put_back(self):
        # The gateway is the link's only IPv4 address: deleting it also makes the kernel
        # flush the /32 route through the link, without a netlink notification.
        self.assertRepaired("ip", "addr", "del", f"{lab.GATEWAY}/32", "dev", self.vm1.interface)

    def test_link_set_down_is_put_back(self):
        # A link going down also makes the kernel flush the routes through it.
        self.assertRepaired("ip", "link", "set", self.vm1.interface, "down")


class RestartTest(LabTestCase):
    """Both VMs attached, then vmnetd stopped with SIGTERM and started again on the same state
    directory: VM traffic must not notice, and the agent must remember its VMs."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.vm1, cls.vm2 = cls.lab.vms[1], cls.lab.vms[2]
        cls.attach(cls.vm1, with_mac=True)
        cls.attach(cls.vm2)
        cls.epoch_before = cls.current_epoch()
        cls.programmed = cls.lab.snapshot()
        cls.exit_status = cls.lab.daemon.stop()
        cls.while_stopped = cls.lab.snapshot()
        cls.reachable_while_stopped = cls.lab.ping(cls.lab.x, cls.vm1.address,
                                                   deadline=REACH_DEADLINE)
        cls.lab.daemon.start()
        cls.after_restart = cls.lab.snapshot()
        # A fresh channel: the old one may still be backing off from the refused connections.
        cls.client = cls.enterClassContext(grpcurl.Client(cls.lab.daemon.target))
        cls.epoch_after = cls.current_epoch()

    @classmethod
    def current_epoch(cls):
        with cls.client.stream(f"{SERVICE}/Watch", {"initial_snapshot": True}, timeout=5,
                               each="events") as s:
            return next(iter(s))["epoch"]

    def test_sigterm_exits_cleanly(self):
        self.assertEqual(self.exit_status, 0, "vmnetd did not exit with status 0 on SIGTERM")

    def test_kernel_state_kept_while_stopped(self):
        self.assertEqual(self.while_stopped, self.programmed,
                         "stopping vmnetd changed the host's routes, proxy entries or addresses")
        self.assertTrue(self.reachable_while_stopped,
                        f"X could not ping {self.vm1.address} while vmnetd was stopped")

    def test_restart_changes_nothing(self):
        self.assertEqual(self.after_restart, self.programmed,
                         "starting vmnetd again changed the host's routes, proxy entries or "
                         "addresses")

    def test_epoch_changes(self):
        self.assertNotEqual(self.epoch_after, self.epoch_before,
                            "Watch events carry the same epoch after a restart")

    def test_vms_remembered(self):
        routes = self.call("ListRoutes", {"vm_id": "vm-2", "family": "ADDRESS_FAMILY_IPV4"}
                           ).get("routes", [])
        self.assertEqual([r["destination"] for r in routes], [f"{self.vm2.address}/32"],
                         f"after a restart ListRoutes vm_id=vm-2 answered {routes}")
        self.detach(self.vm1.vm_id)
        self.assertIsNone(kernel_route(self.lab, self.vm1.address),
                          "DetachVm vm-1 after a restart left its route on the host")


if __name__ == "__main__":
    skips.main()
