#!/usr/bin/python3
"""End-to-end proof of the reconciler (issue 3) against the real kernel, in a namespace lab.

    Computer X ── LAN ── eth0 (uplink) [ HOST ] vme1a ══ eth0 [ VM 1 ]  198.51.100.201/32
    198.51.100.10        198.51.100.1              vme2a ══ eth0 [ VM 2 ]  198.51.100.202/32

One lab and one vmnetd per test class (the lab and LabTestCase come from lab.py and
test_host_routed.py):

  DriftRepairTest          each kind of object of an attached VM deleted by hand: put back,
                           reported as EVENT_TYPE_DRIFT_REPAIRED, repair latency measured
  PendingInterfaceTest     a VM attached before its interface exists; the interface appears,
                           disappears and reappears with a new ifindex
  KillDuringStormTest      kill -9 during concurrent attaches and detaches; after the restart the
                           kernel holds exactly the acknowledged state
  QuietRestartTest         kill -9 and restart with nothing drifted: no route, neighbour, address
                           or link change in `ip monitor`, no ping lost
  NetlinkOverflowTest      a tiny netlink receive buffer overflows; the agent re-reads the kernel
  WatchTest                snapshot and end marker, resume, 100 watchers
  WatchHistoryTest         a from_revision older than the retained history is OUT_OF_RANGE
  SlowWatcherTest          a watcher that does not read is cut off; the others see everything
  WatchAcrossRestartTest   revisions keep increasing across a kill -9 and restart

Measurements (repair latencies, storm counts, pings, overflows) are printed to stderr. Some
classes read vmnetd's own counters from its Prometheus endpoint (curl in the host namespace).
Only 198.51.100.0/24, 203.0.113.0/24, 169.255.30.1 and, for VMs that carry no traffic,
198.18.0.0/15 are used; nothing touches the root namespace.

Needs root and the vmnetd binary (<repo>/build/server/vmnetd, or set VMNETD); skips without
root, fails as root when it cannot run (tests/skips.py):

    /usr/bin/python3 tests/e2e/test_reconciler.py [-v] [TestClass.test_method]
"""

import dataclasses
import ipaddress
import os
import random
import re
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import skips  # noqa: E402  (tests/skips.py: no skips as root)
import lab  # noqa: E402  (first: it explains a missing grpc module)
import grpcurl  # noqa: E402
import test_host_routed as host_routed  # noqa: E402  (LabTestCase and the kernel helpers)
from grpc import StatusCode  # noqa: E402

SERVICE = host_routed.SERVICE
PROTOCOL = "237"  # vmnetd's default --route-protocol: the mark on everything it installs

ADDED = "EVENT_TYPE_VM_ADDED"
CHANGED = "EVENT_TYPE_VM_CHANGED"
REMOVED = "EVENT_TYPE_VM_REMOVED"
DRIFT_REPAIRED = "EVENT_TYPE_DRIFT_REPAIRED"
SNAPSHOT = "EVENT_TYPE_SNAPSHOT"
SNAPSHOT_END = "EVENT_TYPE_SNAPSHOT_END"
PENDING = "VM_STATE_PENDING"
PROGRAMMED = "VM_STATE_PROGRAMMED"

REPAIR_DEADLINE = 5  # seconds before a repair that has not happened is a failure
EVENT_DEADLINE = 5  # seconds for a Watch event that must come
# IPv6 autoconfiguration of new links takes 2-3 s; while other processes create or delete many
# links on the machine, the kernel's linkwatch can delay it by tens of seconds (Lab.ipv6_settled).
IPV6_SETTLE_DEADLINE = 60
# Issue 3: drift seen through a netlink event is repaired "within milliseconds"; a proxy entry
# (no netlink event; found by the dump every --proxy-check-interval-ms, 500 by default) is back
# "within a second". The first bound leaves room for a loaded test machine.
MAX_EVENT_DRIVEN_REPAIR = 0.5
MAX_PROXY_REPAIR = 1.0

# Bulk VMs (no traffic) take their addresses from 198.18.0.0/15, 64 per VM index: VM i owns
# 198.18.0.0 + 64 i + 1 ... + 62, so no address ends in .0 or .255.
BULK_NETWORK = ipaddress.IPv4Address("198.18.0.0")
BULK_MAX_ADDRESSES = 62

# Prometheus metrics, served inside the lab's host namespace (its own loopback).
METRICS_FLAG = "--metrics-listen=127.0.0.1:9447"


def measured(text):
    """Prints a measurement so that it shows in the test output."""
    print(f"\n  [measured] {text}", file=sys.stderr, flush=True)


def bulk_addresses(index, count=1):
    """The `count` first addresses of bulk VM `index`."""
    assert count <= BULK_MAX_ADDRESSES, count
    return [str(BULK_NETWORK + 64 * index + k + 1) for k in range(count)]


def describe(events):
    """Watch events, one short line each, for assertion messages."""
    return "\n".join(f"  rev {e.get('revision')} {e.get('type')} "
                     f"{e.get('vm', {}).get('vm_id', '-')} {e.get('vm', {}).get('state', '')} "
                     f"{e.get('detail', '')}"[:200] for e in events) or "  (none)"


def replay(events):
    """{vm_id: revision of its last event} after the Watch events `events`, in order."""
    state = {}
    for e in events:
        if e["type"] == SNAPSHOT_END:
            continue
        if e["type"] == REMOVED:
            state.pop(e["vm"]["vm_id"], None)
        else:
            state[e["vm"]["vm_id"]] = int(e["revision"])
    return state


def identity(event):
    """What must be equal when two watchers report the same event."""
    return (event["revision"], event["type"], event.get("vm", {}).get("vm_id"),
            event.get("detail"))


class ReconcilerTestCase(host_routed.LabTestCase):
    """LabTestCase plus what these tests share: Watch streams that are known to be in place,
    bulk VMs whose interface does not exist, and kill -9 with restart."""

    _bulk_next = 0

    @classmethod
    def restart_daemon(cls):
        """kill -9 vmnetd, then start it again on the same state directory; returns the kill's
        exit status (-9)."""
        status = cls.lab.daemon.kill()
        cls.start_again()
        return status

    @classmethod
    def start_again(cls):
        """Starts the stopped vmnetd on the same state directory (start() waits for health
        SERVING) and connects a new client."""
        cls.lab.daemon.start()
        # A fresh channel: the old one may still be backing off from the refused connections.
        cls.client = cls.enterClassContext(grpcurl.Client(cls.lab.daemon.target))

    @classmethod
    def attach_bulk(cls, addresses=1, client=None):
        """Attaches a new VM whose interface does not exist (through `client`, the class's by
        default): it stays pending, owns no kernel object, and makes exactly one Watch event.
        Returns the AttachVm response's vm."""
        index = cls._bulk_next
        cls._bulk_next += 1
        request = {"vm_id": f"bulk-{index}", "interface": f"vme{0x10000 + index:x}",
                   "ip_addresses": bulk_addresses(index, addresses)}
        return (client or cls.client).call(f"{SERVICE}/AttachVm", request)["vm"]

    def watch_now(self, request=None, client=None):
        """A Watch stream read in the background, returned once vmnetd sent its response
        headers: from then on the watch is in place and misses no change."""
        stream = (client or self.client).stream(f"{SERVICE}/Watch", request or {},
                                               each="events")
        self.assertTrue(stream.wait_for_headers(EVENT_DEADLINE),
                        f"Watch {request or {}} sent no response headers within "
                        f"{EVENT_DEADLINE} s")
        events = host_routed.EventCollector(stream)
        self.addCleanup(events.close)
        return events

    def collect(self, events, count, what, timeout=EVENT_DEADLINE):
        """The first `count` events of a watcher, waiting up to `timeout` for them."""
        if len(events.seen) < count:
            events.next_matching(lambda e: len(events.seen) >= count, timeout)
        self.assertGreaterEqual(len(events.seen), count,
                                f"{what}: {len(events.seen)} events within {timeout} s, expected "
                                f"{count}; got:\n{describe(events.seen)}")
        return events.seen[:count]

    def wait_for_revision(self, events, revision, what):
        """Waits until watcher `events` saw `revision`; returns everything it saw."""
        if not any(int(e["revision"]) >= revision for e in events.seen):
            events.next_matching(lambda e: int(e["revision"]) >= revision, EVENT_DEADLINE)
        self.assertTrue(any(int(e["revision"]) >= revision for e in events.seen),
                        f"{what}: no event with revision {revision} within {EVENT_DEADLINE} s; "
                        f"got:\n{describe(events.seen)}")
        return list(events.seen)

    def assertStrictlyIncreasing(self, events, what):
        revisions = [int(e["revision"]) for e in events]
        self.assertEqual(revisions, sorted(set(revisions)),
                         f"{what}: revisions are not strictly increasing:\n{describe(events)}")


# -- 1. drift -------------------------------------------------------------------------------------

class DriftRepairTest(ReconcilerTestCase):
    """VM 1 attached with its MAC. Each kind of object it owns is deleted (or its link set down)
    by hand; vmnetd must put it back, fast, and report EVENT_TYPE_DRIFT_REPAIRED naming it.

    Repair latency is measured twice:
      poll:   from the return of the `ip` command that did the damage to the first poll of
              `ip -j ...` that shows the object back (each poll runs a process: ~10-30 ms,
              which is then the resolution);
      kernel: between the kernel's notifications of the damage and of the repair, as
              `ip -ts monitor` stamps them when it reads them (microseconds, give or take the
              scheduling of `ip`). Proxy entries raise no notification, so they only have the
              poll figure."""

    vm_count = 1

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.vm = cls.lab.vms[1]
        cls.attach(cls.vm, with_mac=True)
        cls.monitor = cls.enterClassContext(cls.lab.monitor())
        cls.latencies = {}

    @classmethod
    def tearDownClass(cls):
        if cls.latencies:
            measured("repair latency per kind: " + "; ".join(
                f"{kind}: kernel {f'{kernel * 1000:.2f} ms' if kernel is not None else 'n/a'}, "
                f"poll {poll * 1000:.0f} ms ({polls} polls)"
                for kind, (poll, polls, kernel) in sorted(cls.latencies.items())))
        super().tearDownClass()

    def setUp(self):
        self.assertTrue(lab.wait_until(lambda: not self.missing(), REPAIR_DEADLINE),
                        f"precondition: VM 1's network is incomplete: {self.missing()}")

    # -- what the host holds for VM 1 ------------------------------------------------------

    def route_present(self):
        route = host_routed.kernel_route(self.lab, self.vm.address)
        return route is not None and route.get("dev") == self.vm.interface

    def proxy_present(self):
        return host_routed.kernel_proxy_entry(self.lab, self.vm.address) is not None

    def gateway_present(self):
        return host_routed.has_gateway_address(self.lab, self.vm.interface)

    def neighbour_present(self):
        return any(n["dst"] == self.vm.address and n.get("lladdr") == self.vm.mac
                   and "PERMANENT" in n.get("state", [])
                   for n in self.lab.neighbours(self.vm.interface))

    def link_up(self):
        return "UP" in self.lab.link(self.vm.interface)["flags"]

    def missing(self):
        """What VM 1's network lacks: LabTestCase's list plus the permanent neighbour entry."""
        missing = self.missing_objects(self.vm)
        if not self.neighbour_present():
            missing.append(f"neighbour {self.vm.address} lladdr {self.vm.mac} permanent dev "
                           f"{self.vm.interface}")
        return missing

    # -- the check ---------------------------------------------------------------------------

    def assertRepairedAndReported(self, kind, damage, present, detail, max_latency,
                                  notified=None):
        """Runs `ip -n HOST damage...`, polls `present` until the object is back, then expects
        the whole network of VM 1 back and a DRIFT_REPAIRED event whose detail matches
        `detail` (a regular expression naming the object). `notified`: regular expressions of
        the `ip monitor` lines of the damage and of the repair, for the kernel latency."""
        events, _ = self.watch_after_snapshot()
        command = f"ip {' '.join(damage)}"
        first_line = len(self.monitor.lines)
        lab.run_command("ip", "-n", self.lab.host, *damage)
        start = time.monotonic()
        polls = 0

        def back():
            nonlocal polls
            polls += 1
            return present()

        repaired = lab.wait_until(back, REPAIR_DEADLINE, interval=0)
        latency = time.monotonic() - start
        self.assertTrue(repaired, f"after `{command}` on the host, vmnetd had not put the {kind} "
                                  f"back within {REPAIR_DEADLINE} s")
        kernel_latency = None
        if notified:
            damaged = self.monitor.wait_for_line(notified[0], first_line)
            restored = damaged is not None and self.monitor.wait_for_line(notified[1], damaged)
            self.assertTrue(restored, f"`ip monitor` did not show /{notified[0]}/ then "
                                      f"/{notified[1]}/; it showed "
                                      f"{self.monitor.lines[first_line:]}")
            kernel_latency = self.monitor.times[restored] - self.monitor.times[damaged]
        self.latencies[kind] = (latency, polls, kernel_latency)
        bound = lab.time_bound(max_latency)
        self.assertLessEqual(latency, bound,
                             f"after `{command}` the {kind} took {latency * 1000:.0f} ms to come "
                             f"back, more than {bound * 1000:.0f} ms")
        self.assertTrue(lab.wait_until(lambda: not self.missing(), REPAIR_DEADLINE),
                        f"after `{command}`, VM 1 still lacks {self.missing()}")
        event = events.next_matching(
            lambda e: (e["type"] == DRIFT_REPAIRED
                       and e.get("vm", {}).get("vm_id") == self.vm.vm_id
                       and re.search(detail, e["detail"])), EVENT_DEADLINE)
        self.assertIsNotNone(event, f"after `{command}`, Watch showed no {DRIFT_REPAIRED} for "
                                    f"vm-1 whose detail names the {kind} (/{detail}/); it "
                                    f"showed:\n{describe(events.seen)}")
        self.assertEqual(event["vm"]["state"], PROGRAMMED,
                         f"the drift event does not show vm-1 programmed: {event}")

    def test_route_deleted(self):
        address, dev = re.escape(self.vm.address), self.vm.interface
        self.assertRepairedAndReported(
            "route", ["route", "del", f"{self.vm.address}/32", "dev", dev],
            self.route_present, rf"add route {address}/32 ", MAX_EVENT_DRIVEN_REPAIR,
            notified=(rf"^Deleted {address} dev {dev} ", rf"^{address} dev {dev} .*proto"))

    def test_proxy_entry_deleted(self):
        # No netlink event: found by the periodic proxy dump.
        self.assertRepairedAndReported(
            "proxy entry", ["neigh", "del", "proxy", self.vm.address, "dev", lab.UPLINK],
            self.proxy_present, rf"set proxy neighbour {re.escape(self.vm.address)} ",
            MAX_PROXY_REPAIR)

    def test_gateway_address_deleted(self):
        # The link's only IPv4 address: the kernel also flushes the route and the neighbour
        # entries of the link with it, and vmnetd must put back all three.
        gateway, dev = re.escape(lab.GATEWAY), self.vm.interface
        self.assertRepairedAndReported(
            "gateway address", ["addr", "del", f"{lab.GATEWAY}/32", "dev", dev],
            self.gateway_present, rf"add address {gateway}/32 ", MAX_EVENT_DRIVEN_REPAIR,
            notified=(rf"^Deleted \d+: {dev}\s+inet {gateway}/32 ",
                      rf"^\d+: {dev}\s+inet {gateway}/32 "))

    def test_permanent_neighbour_deleted(self):
        address, dev, mac = re.escape(self.vm.address), self.vm.interface, self.vm.mac
        self.assertRepairedAndReported(
            "permanent neighbour", ["neigh", "del", self.vm.address, "dev", dev],
            self.neighbour_present, rf"set neighbour {address} .*lladdr {mac} permanent",
            MAX_EVENT_DRIVEN_REPAIR,
            notified=(rf"^Deleted {address} dev {dev} ",
                      rf"^{address} dev {dev} lladdr {mac} .*PERMANENT"))

    def test_link_set_down(self):
        # Down also flushes the link's routes and neighbour entries.
        dev = self.vm.interface
        self.assertRepairedAndReported(
            "link up", ["link", "set", dev, "down"], self.link_up,
            rf"set link {dev} \(#\d+\) up", MAX_EVENT_DRIVEN_REPAIR,
            notified=(rf"^\d+: {dev}@\S+: <(?!([^>]*,)?UP[,>])",  # flags without UP
                      rf"^\d+: {dev}@\S+: <([^>]*,)?UP[,>]"))


# -- 2. pending until the interface exists --------------------------------------------------------

class PendingInterfaceTest(ReconcilerTestCase):
    """VM 1 attached before the hypervisor created its veth; the veth then comes, goes (the VM
    stops) and comes back with a new ifindex (the VM starts again)."""

    vm_count = 0

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.vm = cls.lab.add_vm(1, with_link=False)

    def wait_for_state(self, events, state, why):
        event = events.next_matching(
            lambda e: e.get("vm", {}).get("vm_id") == self.vm.vm_id and e["vm"]["state"] == state,
            EVENT_DEADLINE)
        self.assertIsNotNone(event, f"{why}: Watch showed no event with vm-1 {state} within "
                                    f"{EVENT_DEADLINE} s; it showed:\n{describe(events.seen)}")
        self.assertEqual(event["type"], CHANGED, f"{why}: vm-1's state change came as {event}")
        return event

    def assertProgrammedAndReachable(self, why):
        self.assertEqual(self.missing_objects(self.vm), [],
                         f"{why}: vm-1 reported programmed but the host lacks objects")
        self.assertReaches(self.lab.x, self.vm.address, "X")
        self.assertReaches(self.vm.ns, lab.X_ADDRESS, "VM 1")

    def test_interface_appears_goes_and_comes_back(self):
        events, _ = self.watch_after_snapshot()
        response = self.attach(self.vm, with_mac=True)
        self.assertEqual(response["vm"]["state"], PENDING,
                         f"AttachVm before {self.vm.interface} exists answered {response}")

        # The VM boots: its veth appears.
        creating = time.monotonic()
        self.lab.add_vm_link(1)
        self.wait_for_state(events, PROGRAMMED, f"{self.vm.interface} was created")
        measured(f"pending -> programmed: Watch event received "
                 f"{(time.monotonic() - creating) * 1000:.0f} ms after the veth creation began "
                 f"(6 ip commands: the veth, then the VM side's MAC, address, link and routes)")
        self.assertProgrammedAndReachable(f"{self.vm.interface} was created")
        first_ifindex = self.lab.link(self.vm.interface)["ifindex"]

        # The VM stops: its veth goes away.
        self.lab.run(self.lab.host, "ip", "link", "del", self.vm.interface)
        self.wait_for_state(events, PENDING, f"{self.vm.interface} was deleted")
        again = self.attach(self.vm, with_mac=True)
        self.assertEqual(again["vm"]["state"], PENDING,
                         f"AttachVm (same spec) after {self.vm.interface} was deleted answered "
                         f"{again}")
        self.assertIsNone(host_routed.kernel_route(self.lab, self.vm.address),
                          f"a route to {self.vm.address} is left after its link was deleted")

        # The VM starts again: a new veth with the same name and a new ifindex.
        self.lab.add_vm_link(1)
        second_ifindex = self.lab.link(self.vm.interface)["ifindex"]
        self.assertNotEqual(second_ifindex, first_ifindex,
                            "precondition: the recreated veth has the same ifindex")
        self.wait_for_state(events, PROGRAMMED,
                            f"{self.vm.interface} was created again (ifindex {first_ifindex} -> "
                            f"{second_ifindex})")
        route = host_routed.kernel_route(self.lab, self.vm.address)
        self.assertEqual(route and route.get("dev"), self.vm.interface,
                         f"the route to {self.vm.address} is {route}")
        self.assertProgrammedAndReachable(f"{self.vm.interface} was created again")


# -- 3. kill -9 during a storm --------------------------------------------------------------------

@dataclasses.dataclass
class StormVm:
    index: int
    vm_id: str
    interface: str
    peer: str
    address: str
    mac: str


@dataclasses.dataclass
class StormOp:
    vm: StormVm
    action: str  # "attach" or "detach"
    with_mac: bool
    outcome: str = ""  # "OK", the gRPC code name of a failure, or "" when never sent

    def state_after(self):
        """The VM's state once this op is done: None (detached), its MAC, or "" (no MAC)."""
        if self.action == "detach":
            return None
        return self.vm.mac if self.with_mac else ""


def show_state(state):
    """A VM state as kernel_state() and StormOp.state_after() give it, for messages."""
    if state is None:
        return "detached"
    if state.startswith("partial"):
        return state
    return f"attached with MAC {state}" if state else "attached without MAC"


class KillDuringStormTest(ReconcilerTestCase):
    """4 clients attach and detach 60 VMs concurrently (300 operations planned); vmnetd is
    killed with SIGKILL when half of them are acknowledged, then started again on the same
    state directory. The kernel must then hold exactly what was acknowledged.

    Each client owns 15 VMs, so the order of the operations on one VM is the order its client
    sent them. A client stops at its first failed call: that call was in flight at the kill,
    and may or may not have landed. The VMs' links are veth pairs with both ends in the host
    namespace; the VMs' addresses are in 198.18.50.0/24 and carry no traffic."""

    vm_count = 0
    VMS = 60
    CLIENTS = 4
    OPERATIONS = 300
    KILL_AFTER = 150  # acknowledged operations
    SEED = 3

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.vms = [StormVm(i, f"storm-{i}", f"vme5{i:03x}", f"stp{i}", f"198.18.50.{i + 1}",
                           f"52:54:00:18:50:{i:02x}") for i in range(cls.VMS)]
        cls.lab.ip_batch(cls.lab.host, [line for vm in cls.vms for line in (
            f"link add {vm.interface} type veth peer name {vm.peer}", f"link set {vm.peer} up")])
        cls.plans = cls.make_plans()
        cls.run_storm()
        cls.start_again()
        cls.kernel = cls.read_kernel()

    @classmethod
    def make_plans(cls):
        rng = random.Random(cls.SEED)
        plans = []
        for client in range(cls.CLIENTS):
            owned = cls.vms[client::cls.CLIENTS]
            plans.append([StormOp(rng.choice(owned), rng.choice(("attach", "attach", "detach")),
                                  rng.random() < 0.5)
                          for _ in range(cls.OPERATIONS // cls.CLIENTS)])
        return plans

    @classmethod
    def run_storm(cls):
        ready = threading.Barrier(cls.CLIENTS + 1)
        threads = [threading.Thread(target=cls.storm_client, args=(plan, ready), daemon=True)
                   for plan in cls.plans]
        for thread in threads:
            thread.start()
        ready.wait(timeout=30)
        start = time.monotonic()

        def acknowledged():
            return sum(op.outcome == "OK" for plan in cls.plans for op in plan)

        lab.wait_until(lambda: acknowledged() >= cls.KILL_AFTER, 60, interval=0.001)
        cls.kill_time = time.monotonic() - start
        cls.kill_status = cls.lab.daemon.kill()
        for thread in threads:
            thread.join(timeout=30)
        cls.storm_clients_ended = not any(thread.is_alive() for thread in threads)

    @classmethod
    def storm_client(cls, plan, ready):
        with grpcurl.Client(cls.lab.daemon.target) as client:
            # Loads the descriptors before the storm.
            client.call(f"{SERVICE}/DetachVm", {"vm_id": "warm-up", "allow_missing": True})
            ready.wait(timeout=30)
            for op in plan:
                if op.action == "attach":
                    method, request = "AttachVm", {"vm_id": op.vm.vm_id,
                                                   "interface": op.vm.interface,
                                                   "ip_addresses": [op.vm.address]}
                    if op.with_mac:
                        request["mac_address"] = op.vm.mac
                else:
                    method, request = "DetachVm", {"vm_id": op.vm.vm_id, "allow_missing": True}
                try:
                    client.call(f"{SERVICE}/{method}", request)
                    op.outcome = "OK"
                except grpcurl.RpcError as e:
                    op.outcome = e.code.name
                    return
                except Exception as e:  # noqa: BLE001  (recorded, and the test fails on it)
                    op.outcome = f"{type(e).__name__}: {e}"
                    return

    @classmethod
    def read_kernel(cls):
        """What the host holds that vmnetd could have made, read once after the restart."""
        host = cls.lab.host
        return {
            "routes": cls.lab.ip_json(host, "route", "show", "proto", PROTOCOL),
            "proxies": [p for p in cls.lab.proxy_entries() if p.get("protocol") == PROTOCOL],
            "neighbours": cls.lab.ip_json(host, "neigh", "show", "proto", PROTOCOL),
            "gateways": [link["ifname"] for link in cls.lab.ip_json(host, "-4", "addr", "show")
                         if any(a["local"] == lab.GATEWAY for a in link.get("addr_info", []))],
            "up": {link["ifname"] for link in cls.lab.ip_json(host, "link", "show")
                   if "UP" in link["flags"]},
        }

    def kernel_state(self, vm):
        """The VM as the kernel shows it: None, its MAC or "" (see StormOp.state_after), or a
        description of a partial state."""
        k = self.kernel
        has = {
            "route": any(r["dst"] == vm.address and r["dev"] == vm.interface for r in k["routes"]),
            "proxy": any(p["dst"] == vm.address and p["dev"] == lab.UPLINK for p in k["proxies"]),
            "gateway": vm.interface in k["gateways"],
            "neighbour": any(n["dst"] == vm.address and n["dev"] == vm.interface
                             and n.get("lladdr") == vm.mac for n in k["neighbours"]),
        }
        if not any(has.values()):
            return None
        if has["route"] and has["proxy"] and has["gateway"] and vm.interface in k["up"]:
            return vm.mac if has["neighbour"] else ""
        return "partial: " + ", ".join(f"{name} {'present' if v else 'missing'}"
                                       for name, v in has.items())

    def api_state(self):
        """{vm_id: MAC or ""} of the VMs vmnetd reports after the restart (Watch snapshot)."""
        events, _ = self.watch_after_snapshot()
        snapshot = [e for e in events.seen if e["type"] == SNAPSHOT]
        not_programmed = [e["vm"] for e in snapshot if e["vm"]["state"] != PROGRAMMED]
        self.assertEqual(not_programmed, [], "VMs not programmed after the restart")
        return {e["vm"]["vm_id"]: e["vm"]["mac_address"] for e in snapshot}

    def test_storm_was_cut_by_the_kill(self):
        ops = [op for plan in self.plans for op in plan]
        acknowledged = [op for op in ops if op.outcome == "OK"]
        failed = [op for op in ops if op.outcome not in ("OK", "")]
        measured(f"storm: {len(acknowledged)} of {self.OPERATIONS} operations acknowledged "
                 f"({sum(op.action == 'attach' for op in acknowledged)} attaches, "
                 f"{sum(op.action == 'detach' for op in acknowledged)} detaches) in "
                 f"{self.kill_time:.2f} s before kill -9; in flight at the kill: "
                 f"{[f'{op.action} {op.vm.vm_id}: {op.outcome}' for op in failed]}")
        self.assertEqual(self.kill_status, -9, "precondition: vmnetd was killed by SIGKILL")
        self.assertTrue(self.storm_clients_ended, "storm clients still running 30 s after the kill")
        self.assertGreaterEqual(len(acknowledged), self.KILL_AFTER)
        self.assertLess(len(acknowledged), self.OPERATIONS,
                        "the storm ended before the kill; nothing was in flight")
        self.assertLessEqual(len(failed), self.CLIENTS, "more than one failure per client")
        unexpected = [f"{op.action} {op.vm.vm_id}: {op.outcome}" for op in failed
                      if op.outcome != StatusCode.UNAVAILABLE.name]
        self.assertEqual(unexpected, [], "calls in flight at the kill failed with something "
                                         "other than UNAVAILABLE")

    def test_kernel_holds_exactly_the_acknowledged_state(self):
        api = self.api_state()
        problems = []
        landed = []
        for vm in self.vms:
            ops = [op for plan in self.plans for op in plan if op.vm is vm and op.outcome]
            acknowledged = [op for op in ops if op.outcome == "OK"]
            expected = acknowledged[-1].state_after() if acknowledged else None
            allowed = {expected}
            in_flight = ops[-1] if ops and ops[-1].outcome != "OK" else None
            if in_flight:  # it may or may not have landed
                allowed.add(in_flight.state_after())
            kernel = self.kernel_state(vm)
            history = " ".join(f"{op.action}{'+mac' if op.with_mac else ''}={op.outcome}"
                               for op in ops) or "no operation"
            if kernel not in allowed:
                problems.append(f"{vm.vm_id} ({vm.address} on {vm.interface}): the kernel shows "
                                f"{show_state(kernel)}, expected "
                                f"{' or '.join(show_state(s) for s in allowed)} ({history})")
            if api.get(vm.vm_id) != kernel:
                problems.append(f"{vm.vm_id}: the API (Watch snapshot) shows "
                                f"{show_state(api.get(vm.vm_id))}, the kernel "
                                f"{show_state(kernel)} ({history})")
            if in_flight and len(allowed) == 2:
                landed.append(kernel == in_flight.state_after())
        attached = sum(self.kernel_state(vm) is not None for vm in self.vms)
        measured(f"after the restart: {attached} of {self.VMS} storm VMs attached in the kernel; "
                 f"of the in-flight operations that would change something, "
                 f"{sum(landed)} landed and {len(landed) - sum(landed)} did not")
        self.assertEqual(problems, [], "after kill -9 and restart, the kernel does not hold the "
                                       "acknowledged state:\n" + "\n".join(problems))

    def test_no_object_without_a_desired_vm(self):
        api = self.api_state()
        desired = {vm.address: vm for vm in self.vms if vm.vm_id in api}
        interfaces = {vm.interface for vm in desired.values()}
        k = self.kernel
        orphans = [f"route {r['dst']} dev {r['dev']} proto {PROTOCOL}" for r in k["routes"]
                   if r["dst"] not in desired]
        orphans += [f"proxy entry {p['dst']} dev {p['dev']}" for p in k["proxies"]
                    if p["dst"] not in desired]
        orphans += [f"neighbour {n['dst']} dev {n['dev']} proto {PROTOCOL}"
                    for n in k["neighbours"] if n["dst"] not in desired]
        orphans += [f"address {lab.GATEWAY}/32 dev {name}" for name in k["gateways"]
                    if name not in interfaces]
        self.assertEqual(orphans, [], "objects marked as vmnetd's that belong to no VM it "
                                      "reports after the restart")


# -- 4. restart with nothing drifted --------------------------------------------------------------

class QuietRestartTest(ReconcilerTestCase):
    """Both VMs attached (VM 1 with its MAC). X pings VM 1 ten times a second while vmnetd is
    killed with SIGKILL and started again; `ip monitor route neigh address link` runs in the
    host namespace throughout. The window checked runs from the start of the ping, half a
    second before the kill, to its end, a few seconds after the new vmnetd reported SERVING."""

    daemon_flags = (METRICS_FLAG,)
    PINGS = 50  # 5 s at 10/s, around a restart that takes well under a second

    # The only lines the kernel prints in the window on its own: X's pings make the host
    # resolve X (198.51.100.10) on eth0, and the kernel's ARP cache moves that ordinary
    # entry through REACHABLE, STALE, DELAY and PROBE as it ages and is confirmed again.
    # (VM 1's neighbour entry on vme1a is vmnetd's permanent one and never changes. IPv6
    # autoconfiguration, which announces each link-local address and its route again when
    # duplicate address detection ends, seconds after a link gets its carrier, is waited out
    # before the window opens: Lab.ipv6_settled.) Any other line is a change to routes,
    # neighbours, addresses or links, and vmnetd must make none when nothing drifted.
    X_ARP_AGING = re.compile(rf"^{re.escape(lab.X_ADDRESS)} dev {lab.UPLINK} lladdr "
                             r"[0-9a-f:]{17} (REACHABLE|STALE|DELAY|PROBE)\s*$")
    # The kernel's own multicast entries (ff02::..., NOARP), which its neighbour garbage
    # collector deletes when the machine-wide table is over gc_thresh1 (other namespaces on a
    # busy machine fill it); vmnetd never makes such entries.
    MULTICAST_GC = re.compile(r"^Deleted ff02::\S+ dev \S+ lladdr 33:33:[0-9a-f:]{11} NOARP\s*$")

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.vm1, cls.vm2 = cls.lab.vms[1], cls.lab.vms[2]
        cls.attach(cls.vm1, with_mac=True)
        cls.attach(cls.vm2)
        cls.reached_before = cls.lab.ping(cls.lab.x, cls.vm1.address, deadline=5)
        cls.ipv6_settled = lab.wait_until(cls.lab.ipv6_settled, IPV6_SETTLE_DEADLINE,
                                          interval=0.05)
        cls.before = cls.lab.snapshot()
        with cls.lab.monitor() as monitor:
            start = monitor.mark()
            with cls.lab.start_ping(cls.lab.x, cls.vm1.address, cls.PINGS, 0.1) as ping:
                lab.wait_until(lambda: ping.replies >= 5, 5, interval=0.01)
                killed_at = time.time()  # wall clock, as ip's timestamps
                cls.restart_daemon()
                cls.restart_seconds = time.time() - killed_at
                cls.ping_running_after_restart = ping.running()
                cls.transmitted, cls.received = ping.wait()
                cls.ping_summary = ping.summary()
            end = monitor.mark()
            cls.window = monitor.lines_between(start, end)
            cls.window_stamped = monitor.lines_between(start, end, since=killed_at)
        cls.after = cls.lab.snapshot()
        cls.metrics = cls.lab.daemon.metrics()  # of the second vmnetd

    def test_preconditions(self):
        self.assertTrue(self.reached_before, f"X could not ping {self.vm1.address} after attach")
        self.assertTrue(self.ipv6_settled,
                        f"IPv6 autoconfiguration in the host not over after "
                        f"{IPV6_SETTLE_DEADLINE} s (is something else on the machine creating or "
                        f"deleting many links?); now: {self.lab.ipv6_unsettled()}")
        self.assertTrue(self.ping_running_after_restart,
                        f"the ping ended before vmnetd was SERVING again (restart took "
                        f"{self.restart_seconds:.2f} s); it did not cover the restart")

    def test_no_kernel_change_in_ip_monitor(self):
        changes = [line for line in self.window
                   if not self.X_ARP_AGING.match(line) and not self.MULTICAST_GC.match(line)]
        measured(f"kill -9 + restart to SERVING: {self.restart_seconds * 1000:.0f} ms; "
                 f"`ip monitor` lines in the window: {len(self.window)} "
                 f"({len(self.window) - len(changes)} of them X's ARP aging)")
        self.assertEqual(changes, [], "`ip monitor route neigh address link` in the host showed "
                                      "changes while vmnetd was killed and restarted; the "
                                      "window, timed from the kill (SERVING at "
                                      f"+{self.restart_seconds:.3f}s):\n"
                                      + "\n".join(self.window_stamped))
        self.assertEqual(self.after, self.before,
                         "the host's routes, proxy entries or addresses differ after the restart")

    def test_no_kernel_write_after_restart(self):
        # ip monitor cannot see every write (a proxy entry set again raises no notification),
        # the agent's own counter can.
        writes = {series: value for series, value in self.metrics.items()
                  if series.startswith("vmnet_kernel_writes_total") and value}
        self.assertEqual(writes, {}, "the restarted vmnetd wrote to the kernel although "
                                     "nothing had drifted (vmnet_kernel_writes_total)")

    def test_no_ping_lost(self):
        measured(f"ping X -> VM 1 across the restart: {self.ping_summary}")
        self.assertEqual(self.transmitted, self.PINGS, f"ping summary: {self.ping_summary}")
        self.assertEqual(self.received, self.transmitted,
                         f"X lost pings to VM 1 across the restart: {self.ping_summary}")

    def test_second_start_synced(self):
        log = self.lab.daemon.log(this_start_only=True)
        self.assertRegex(log, r"event=synced vms=2\b",
                         f"the log of the second start does not show the sync of 2 VMs:\n{log}")


# -- 5. netlink overflow --------------------------------------------------------------------------

class NetlinkOverflowTest(ReconcilerTestCase):
    """vmnetd with a tiny netlink receive buffer (--netlink-rcvbuf=2048). A burst of 500 route
    additions on another link, with VM 1's route deleted in the middle of it, overflows the
    buffer: the event of the deletion is lost, and only a re-dump after the overflow can find
    that the route is gone.

    The agent is frozen (SIGSTOP) during the burst, so that the overflow does not depend on how
    fast it happens to read: the kernel queues events until the buffer is full and drops the
    rest, the deletion among them. When it runs again it reads ENOBUFS."""

    vm_count = 1
    daemon_flags = ("--netlink-rcvbuf=2048", METRICS_FLAG)
    BURST = 500
    OTHER_LINK, OTHER_PEER = "ovf0", "ovf1"  # not VM links: they do not match vme[0-9a-f]+

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.vm = cls.lab.vms[1]
        cls.attach(cls.vm)
        cls.lab.ip_batch(cls.lab.host, [
            f"link add {cls.OTHER_LINK} type veth peer name {cls.OTHER_PEER}",
            f"link set {cls.OTHER_LINK} up", f"link set {cls.OTHER_PEER} up"])

    def overflows(self):
        return self.lab.daemon.log().count("event=netlink_overflow")

    def test_overflow_triggers_resync(self):
        route = f"{self.vm.address}/32"
        # Even the attach's own events may have overflowed so small a buffer: count from here.
        self.assertTrue(lab.wait_until(lambda: not self.missing_objects(self.vm), REPAIR_DEADLINE),
                        f"precondition: VM 1 lacks {self.missing_objects(self.vm)}")
        before = self.overflows()
        burst = [f"198.19.{k // 250}.{k % 250 + 1}/32" for k in range(self.BURST)]
        lines = [f"route add {dst} dev {self.OTHER_LINK}" for dst in burst]
        half = len(lines) // 2
        with self.lab.daemon.paused():
            self.lab.ip_batch(self.lab.host, lines[:half] + [
                f"route del {route} dev {self.vm.interface}"] + lines[half:])
            self.assertIsNone(host_routed.kernel_route(self.lab, self.vm.address),
                              "precondition: the route was deleted during the burst")
        resumed = time.monotonic()
        came_back = lab.wait_until(
            lambda: host_routed.kernel_route(self.lab, self.vm.address), REPAIR_DEADLINE,
            interval=0.01)
        latency = time.monotonic() - resumed
        self.assertTrue(came_back, f"the route {route}, deleted during a burst of {self.BURST} "
                                   f"route changes that overflowed the netlink buffer, was not "
                                   f"put back within {REPAIR_DEADLINE} s")
        lab.wait_until(lambda: self.overflows() > before, EVENT_DEADLINE)
        measured(f"netlink overflow: {self.overflows() - before} logged for a burst of "
                 f"{self.BURST} routes (--netlink-rcvbuf=2048; {before} before the burst); the "
                 f"route lost in it was back {latency * 1000:.0f} ms after the agent ran again")
        log = self.lab.daemon.log(this_start_only=True)
        self.assertGreater(self.overflows(), before,
                           f"a burst of {self.BURST} route changes did not make the vmnetd log "
                           f"show event=netlink_overflow")
        self.assertRegex(log, r"event=netlink_overflow[^\n]*action=full_resync",
                         "the overflow is not followed by a full resync")
        metrics = self.lab.daemon.metrics()
        self.assertEqual(lab.metric_total(metrics, "vmnet_netlink_overflows_total"),
                         self.overflows(), "vmnet_netlink_overflows_total does not count the "
                                           "overflows the log shows")
        self.assertGreaterEqual(lab.metric_total(metrics, "vmnet_full_resyncs_total"), 1,
                                "vmnet_full_resyncs_total counts no resync after the overflow")
        kept = {r["dst"] for r in self.lab.ip_json(self.lab.host, "route", "show", "dev",
                                                   self.OTHER_LINK)}
        lost = [dst for dst in burst if dst.removesuffix("/32") not in kept]
        self.assertEqual(lost, [], f"routes that are not vmnetd's were removed from "
                                   f"{self.OTHER_LINK} during the resync")
        self.assertEqual(self.missing_objects(self.vm), [],
                         "VM 1's network is incomplete after the overflow")


# -- 6. Watch -------------------------------------------------------------------------------------

class WatchTest(ReconcilerTestCase):
    """Watch against a reference watcher that follows everything from the start.

    Bulk VMs (interfaces that do not exist) make one event per AttachVm and no kernel object."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.reference_stream = cls.client.stream(f"{SERVICE}/Watch", {}, each="events")
        if not cls.reference_stream.wait_for_headers(EVENT_DEADLINE):
            raise AssertionError("the reference Watch sent no response headers")
        cls.reference = host_routed.EventCollector(cls.reference_stream)
        cls.addClassCleanup(cls.reference.close)
        cls.attach(cls.lab.vms[1], with_mac=True)
        cls.attach(cls.lab.vms[2])

    def reference_until(self, revision):
        return self.wait_for_revision(self.reference, revision, "the reference watcher")

    def settle(self):
        """Attaches one more bulk VM and waits until the reference watcher saw it: then it has
        seen every event so far. Returns the current revision."""
        revision = int(self.attach_bulk()["revision"])
        self.reference_until(revision)
        return revision

    def test_snapshot_then_end_then_changes(self):
        current = self.settle()
        expected = replay(self.reference.seen)
        events, end = self.watch_after_snapshot()
        snapshot = events.seen[:-1]
        self.assertEqual([e["type"] for e in snapshot], [SNAPSHOT] * len(snapshot),
                         f"events before SNAPSHOT_END:\n{describe(snapshot)}")
        self.assertEqual(sorted(e["vm"]["vm_id"] for e in snapshot), sorted(expected),
                         f"the snapshot does not list every VM once:\n{describe(snapshot)}")
        for e in snapshot:
            vm = e["vm"]
            self.assertEqual((int(e["revision"]), int(vm["revision"])),
                             (expected[vm["vm_id"]],) * 2,
                             f"the SNAPSHOT event of {vm['vm_id']} does not carry the revision "
                             f"of its last change: {e}")
        self.assertEqual(int(end["revision"]), current,
                         f"SNAPSHOT_END does not carry the current revision {current}: {end}")
        self.assertNotIn("vm", end, f"SNAPSHOT_END carries a vm: {end}")
        self.assertEqual(end["epoch"], self.reference.seen[-1]["epoch"], f"epoch of {end}")

        added = self.attach_bulk()
        live = events.next_matching(lambda e: True, EVENT_DEADLINE)
        self.assertIsNotNone(live, "no live event after the snapshot")
        self.assertEqual((live["type"], live["vm"]["vm_id"], live["revision"]),
                         (ADDED, added["vm_id"], added["revision"]),
                         f"the first event after the snapshot is not the new VM: {live}")
        self.assertGreater(int(live["revision"]), int(end["revision"]))

    CHURN = 100  # attaches by the churning client (and a detach every third)

    def test_snapshot_during_changes_loses_nothing(self):
        # A client attaches and detaches bulk VMs while the snapshot is taken: snapshot plus the
        # changes after it must add up to what the reference watcher saw, event for event.
        churn_done = threading.Event()
        acknowledged = []
        errors = []

        def churn():
            try:
                with grpcurl.Client(self.lab.daemon.target) as client:
                    for i in range(self.CHURN):
                        acknowledged.append(self.attach_bulk(client=client))
                        if i % 3 == 2:
                            client.call(f"{SERVICE}/DetachVm",
                                        {"vm_id": acknowledged[-2]["vm_id"]})
            except Exception as e:  # noqa: BLE001  (reported below)
                errors.append(e)
            finally:
                churn_done.set()

        thread = threading.Thread(target=churn, daemon=True)
        thread.start()
        lab.wait_until(lambda: len(acknowledged) >= 10 or churn_done.is_set(), 10, interval=0.001)
        events, end = self.watch_after_snapshot()
        during = not churn_done.is_set()
        thread.join(timeout=30)
        self.assertEqual(errors, [], "the churning client failed")
        sentinel = self.attach_bulk()
        revision = int(sentinel["revision"])
        reference = self.reference_until(revision)
        self.wait_for_revision(events, revision, "the snapshot watcher")

        end_revision = int(end["revision"])
        snapshot = [e for e in events.seen if e["type"] == SNAPSHOT]
        live = events.seen[len(snapshot) + 1:]
        before_end = [e for e in reference if int(e["revision"]) <= end_revision]
        after_end = [e for e in reference if int(e["revision"]) > end_revision]
        self.assertEqual({e["vm"]["vm_id"]: int(e["revision"]) for e in snapshot},
                         replay(before_end),
                         "the snapshot is not the state as of its SNAPSHOT_END revision "
                         f"{end_revision}:\n{describe(snapshot)}")
        self.assertEqual([identity(e) for e in live], [identity(e) for e in after_end],
                         f"after SNAPSHOT_END {end_revision} the watcher did not get exactly the "
                         f"later events:\ngot:\n{describe(live)}\nreference:\n"
                         f"{describe(after_end)}")
        measured(f"snapshot during churn: {len(snapshot)} VMs in the snapshot, "
                 f"{len(after_end) - 1} churn events after SNAPSHOT_END")
        self.assertTrue(during and len(after_end) > 1,
                        "precondition: the snapshot was not taken while the other client was "
                        "still attaching and detaching")

    def test_resume_replays_every_later_event_in_order(self):
        last = max(int(self.attach_bulk()["revision"]) for _ in range(10))
        reference = self.reference_until(last)
        resume_from = reference[-8]
        expected = reference[-7:]
        events = self.watch_now({"from_revision": resume_from["revision"]})
        replayed = self.collect(events, len(expected),
                                f"Watch from_revision={resume_from['revision']}")
        self.assertEqual([identity(e) for e in replayed], [identity(e) for e in expected],
                         f"resuming from revision {resume_from['revision']} did not replay the "
                         f"later events in order:\ngot:\n{describe(replayed)}\nexpected:\n"
                         f"{describe(expected)}")
        self.assertStrictlyIncreasing(replayed, "replayed events")
        added = self.attach_bulk()
        live = self.collect(events, len(expected) + 1, "the resumed watch after a new attach")
        self.assertEqual(live[-1]["revision"], added["revision"],
                         f"the resumed watch did not follow with the new event: {live[-1]}")

    def raw_watch(self, request):
        """A Watch stream of whole WatchResponse messages (not flattened into events), read in
        the background, returned once vmnetd sent its response headers."""
        stream = self.client.stream(f"{SERVICE}/Watch", request)
        self.assertTrue(stream.wait_for_headers(EVENT_DEADLINE),
                        f"Watch {request} sent no response headers within {EVENT_DEADLINE} s")
        messages = host_routed.EventCollector(stream)
        self.addCleanup(messages.close)
        return messages

    def test_snapshot_comes_in_one_message_of_many_events(self):
        self.settle()
        vms = len(self.call("ListVms", {"page_size": 1000})["vms"])
        messages = self.raw_watch({"initial_snapshot": True})
        end = messages.next_matching(
            lambda m: any(e["type"] == SNAPSHOT_END for e in m["events"]), EVENT_DEADLINE)
        self.assertIsNotNone(end, f"no SNAPSHOT_END within {EVENT_DEADLINE} s: {messages.seen}")
        events = [e for m in messages.seen for e in m["events"]]
        measured(f"snapshot of {vms} VMs: {len(events)} events in {len(messages.seen)} "
                 "message(s)")
        self.assertEqual(len(events), vms + 1, f"the snapshot:\n{describe(events)}")
        self.assertEqual(events[-1]["type"], SNAPSHOT_END, "SNAPSHOT_END is not the last event")
        # A snapshot of a few VMs (far under 256 KiB) is queued whole before the first write:
        # one message.
        self.assertEqual(len(messages.seen), 1,
                         f"the snapshot of {vms} VMs came in {len(messages.seen)} messages")
        self.assertNotIn("progress", messages.seen[0], "the snapshot message carries progress")

    def test_progress_when_idle(self):
        current = self.settle()
        epoch = self.reference.seen[-1]["epoch"]
        messages = self.raw_watch({"progress_interval": "0.3s"})
        first = messages.next_matching(lambda m: True, EVENT_DEADLINE)
        self.assertIsNotNone(first, f"an idle Watch with progress_interval 0.3 s sent nothing "
                                    f"within {EVENT_DEADLINE} s")
        self.assertEqual(first.get("events"), [], f"a progress message carries events: {first}")
        self.assertEqual(first.get("progress"), {"revision": str(current), "epoch": epoch},
                         "the progress message does not carry the current revision and epoch")
        # A change goes out as an event; the next progress carries its revision.
        added = self.attach_bulk()
        live = messages.next_matching(lambda m: m["events"], EVENT_DEADLINE)
        self.assertIsNotNone(live, "no event after the attach")
        self.assertNotIn("progress", live, f"an event message carries progress: {live}")
        self.assertEqual([e["revision"] for e in live["events"]], [added["revision"]])
        after = messages.next_matching(lambda m: "progress" in m, EVENT_DEADLINE)
        self.assertIsNotNone(after, "no progress after the event")
        self.assertEqual(after["progress"]["revision"], added["revision"])

    def test_hundred_watchers_see_every_event_in_order(self):
        # 10 connections of 10 watchers (vmnetd allows 100 calls per connection by default;
        # channels to one target share one connection unless told otherwise).
        clients = [self.enterContext(grpcurl.Client(
            self.lab.daemon.target, options=[("grpc.use_local_subchannel_pool", 1)]))
            for _ in range(10)]
        watchers = [self.watch_now(client=clients[i % len(clients)]) for i in range(100)]
        added = [self.attach_bulk() for _ in range(20)]
        expected = [(vm["revision"], ADDED, vm["vm_id"]) for vm in added]
        incomplete = []
        deadline = time.monotonic() + 20
        for i, events in enumerate(watchers):
            events.next_matching(lambda e: len(events.seen) >= len(expected),
                                 max(0.1, deadline - time.monotonic()))
            got = [(e["revision"], e["type"], e["vm"]["vm_id"]) for e in events.seen]
            if got != expected:
                incomplete.append(f"watcher {i} got {len(got)} events: {got}")
        self.assertEqual(incomplete, [], f"of 100 watchers, {len(incomplete)} did not receive "
                                         f"the 20 events in order")


class WatchHistoryTest(ReconcilerTestCase):
    """vmnetd keeps the last 5 events for resume (--watch-history=5); 8 events happen."""

    vm_count = 0
    daemon_flags = ("--watch-history=5",)

    def test_from_revision_older_than_history(self):
        reference = self.watch_now()
        last = max(int(self.attach_bulk()["revision"]) for _ in range(8))
        events = self.wait_for_revision(reference, last, "the reference watcher")
        self.assertEqual(len(events), 8, f"8 attaches made:\n{describe(events)}")

        # The 5 retained events: resuming from the one just before them replays all 5.
        oldest_resumable = events[-6]["revision"]
        resumed = self.watch_now({"from_revision": oldest_resumable})
        replayed = self.collect(resumed, 5, f"Watch from_revision={oldest_resumable}")
        self.assertEqual([identity(e) for e in replayed], [identity(e) for e in events[-5:]],
                         f"resuming from {oldest_resumable} with 5 events retained")

        for too_old in (events[-7]["revision"], events[0]["revision"]):
            with self.subTest(from_revision=too_old):
                with self.assertRaises(grpcurl.RpcError,
                                       msg=f"Watch from_revision={too_old} (older than the 5 "
                                           f"retained events) was accepted") as caught:
                    with self.client.stream(f"{SERVICE}/Watch", {"from_revision": too_old},
                                            timeout=EVENT_DEADLINE) as stream:
                        list(stream)
                self.assertEqual(caught.exception.code, StatusCode.OUT_OF_RANGE,
                                 f"Watch from_revision={too_old} answered {caught.exception}")
                # The end status says the history is compacted and where it starts now.
                oldest = events[-5]["revision"]
                self.assertIn(f"is compacted: the history before revision {oldest} is gone",
                              caught.exception.details)


class SlowWatcherTest(ReconcilerTestCase):
    """Watch queues of 4 events (--watch-queue=4); one watcher never reads while 150 VMs with
    60 addresses each (big events) are attached.

    The slow watcher's channel has HTTP/2 BDP probing off: its flow-control window stays at
    64 KiB, so events pile up in vmnetd's queue for it rather than in the client's buffers."""

    vm_count = 0
    daemon_flags = ("--watch-queue=4", METRICS_FLAG)
    EVENTS = 150

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # Its own connection, so that its full window does not hold up the reading watcher.
        slow_client = cls.enterClassContext(grpcurl.Client(
            cls.lab.daemon.target, options=[("grpc.http2.bdp_probe", 0),
                                            ("grpc.use_local_subchannel_pool", 1)]))
        cls.slow_stream = slow_client.stream(f"{SERVICE}/Watch", {}, each="events")
        cls.addClassCleanup(cls.slow_stream.cancel)
        if not cls.slow_stream.wait_for_headers(EVENT_DEADLINE):
            raise AssertionError("the slow Watch sent no response headers")
        cls.reader_stream = cls.client.stream(f"{SERVICE}/Watch", {}, each="events")
        if not cls.reader_stream.wait_for_headers(EVENT_DEADLINE):
            raise AssertionError("the reading Watch sent no response headers")
        cls.reader = host_routed.EventCollector(cls.reader_stream)
        cls.addClassCleanup(cls.reader.close)
        # Each attach waits until the reading watcher has its event, so that the reader
        # keeps up by construction however loaded the machine (a queue of 4 would otherwise
        # cut off a reader whose thread is starved) while the other queue only fills.
        cls.added = []
        for _ in range(cls.EVENTS):
            vm = cls.attach_bulk(addresses=60)
            cls.added.append(vm)
            revision = int(vm["revision"])
            if not any(int(e["revision"]) >= revision for e in cls.reader.seen):
                cls.reader.next_matching(lambda e: int(e["revision"]) >= revision,
                                         EVENT_DEADLINE)
        cls.watchers_before_reading = lab.metric_total(cls.lab.daemon.metrics(), "vmnet_watchers")
        # Only now the slow watcher reads: what it got, and the error that ended it (None if
        # nothing ended it within EVENT_DEADLINE).
        slow = host_routed.EventCollector(cls.slow_stream)
        cls.addClassCleanup(slow.close)
        cls.slow_error = None
        try:
            slow.next_matching(lambda e: False, EVENT_DEADLINE)
        except grpcurl.RpcError as e:
            cls.slow_error = e
        cls.slow_seen = slow.seen

    def test_reading_watcher_got_every_event(self):
        expected = [(vm["revision"], vm["vm_id"]) for vm in self.added]
        got = self.collect(self.reader, len(expected), "the reading watcher")
        self.assertEqual([(e["revision"], e["vm"]["vm_id"]) for e in got], expected,
                         "the reading watcher did not get every event in order")

    def test_slow_watcher_cut_off(self):
        seen, error = self.slow_seen, self.slow_error
        measured(f"slow watcher (queue 4): cut off after {len(seen)} of {self.EVENTS} events: "
                 f"{error}")
        self.assertIsNotNone(error, f"the watcher that did not read was not ended; it got "
                                    f"{len(seen)} of {self.EVENTS} events")
        self.assertEqual(self.watchers_before_reading, 1,
                         "vmnet_watchers did not drop to the one reading watcher while the slow "
                         "one had not read yet: vmnetd still holds a queue for it")
        self.assertEqual(error.code, StatusCode.RESOURCE_EXHAUSTED, f"it ended with {error}")
        self.assertLess(len(seen), self.EVENTS)
        expected = [vm["revision"] for vm in self.added[:len(seen)]]
        self.assertEqual([e["revision"] for e in seen], expected,
                         "what the slow watcher got before the cut is not the first events in "
                         "order")

    def test_cut_off_watcher_can_resume(self):
        # The RESOURCE_EXHAUSTED contract: "resume from the last revision seen".
        seen, error = self.slow_seen, self.slow_error
        self.assertIsNotNone(error, "precondition: the slow watcher was cut off")
        last = seen[-1]["revision"] if seen else str(int(self.added[0]["revision"]) - 1)
        rest = [vm["revision"] for vm in self.added if int(vm["revision"]) > int(last)]
        resumed = self.watch_now({"from_revision": last})
        try:
            got, error = self.collect(resumed, len(rest), f"Watch from_revision={last}"), None
        except grpcurl.RpcError as e:
            got, error = [], e
        self.assertIsNone(error, f"resuming the cut-off watcher from revision {last} "
                                 f"({len(rest)} events behind), as its RESOURCE_EXHAUSTED "
                                 f"message says, failed after {len(resumed.seen)} events")
        self.assertEqual([e["revision"] for e in got], rest,
                         f"resuming from {last} did not replay the {len(rest)} later events")


class WatchAcrossRestartTest(ReconcilerTestCase):
    """VM 1 attached; vmnetd killed with SIGKILL and started again."""

    vm_count = 1

    def test_revisions_keep_increasing(self):
        before = self.watch_now()
        attached = self.attach(self.lab.vms[1])["vm"]
        old = self.collect(before, 1, "Watch before the restart")[0]
        self.assertEqual(old["revision"], attached["revision"], f"event of the attach: {old}")
        old_revision = int(old["revision"])

        self.restart_daemon()
        events, end = self.watch_after_snapshot()
        measured(f"revision before kill -9: {old_revision}, epoch {old['epoch']}; after restart: "
                 f"SNAPSHOT_END revision {end['revision']}, epoch {end['epoch']}")
        self.assertNotEqual(end["epoch"], old["epoch"], "the epoch did not change on restart")
        self.assertGreater(int(end["revision"]), old_revision,
                           f"the current revision after the restart ({end['revision']}) is not "
                           f"above the last one before it ({old_revision})")
        snapshot = [e for e in events.seen if e["type"] == SNAPSHOT]
        self.assertEqual([e["vm"]["vm_id"] for e in snapshot], ["vm-1"],
                         f"snapshot after the restart:\n{describe(snapshot)}")
        # vm-1 did not change across the restart: its snapshot carries the revision of its
        # last change, from before the restart.
        self.assertEqual(int(snapshot[0]["revision"]), old_revision,
                         f"vm-1's revision after the restart: {snapshot[0]}")

        added = self.attach_bulk()
        live = events.next_matching(lambda e: e.get("vm", {}).get("vm_id") == added["vm_id"],
                                    EVENT_DEADLINE)
        self.assertIsNotNone(live, "no event for an attach after the restart")
        self.assertGreater(int(live["revision"]), int(end["revision"]))
        self.assertEqual(live["epoch"], end["epoch"])

        # A revision from before the restart is never taken for a new one.
        with self.assertRaises(grpcurl.RpcError) as caught:
            with self.client.stream(f"{SERVICE}/Watch", {"from_revision": old_revision},
                                    timeout=EVENT_DEADLINE) as stream:
                list(stream)
        self.assertEqual(caught.exception.code, StatusCode.OUT_OF_RANGE,
                         f"Watch from_revision={old_revision} (before the restart) answered "
                         f"{caught.exception}")


if __name__ == "__main__":
    skips.main()
