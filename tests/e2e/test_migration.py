#!/usr/bin/python3
"""End-to-end test of a VM moving between two hosts (issue #5): traffic must resume within 1 s
of the AttachVm on the destination, for IPv4 and IPv6.

    Computer X eth0 ─┐              ┌─ eth0 [ HOST A, vmnetd ] vme1a ══ eth0 [ VM, on A ]
    198.51.100.10    ├─ br0 (lan) ──┤   198.51.100.1, 2001:db8:1::1
    2001:db8:1::10   │              └─ eth0 [ HOST B, vmnetd ] vme1b ══ eth0 [ VM, on B ]
                                        198.51.100.2, 2001:db8:1::2

The VM (vm-1: 198.51.100.201/32, 2001:db8:1::201/128, MAC 52:54:00:00:00:01, default routes
via 169.255.30.1 and fe80::ffff:1:1) first runs behind A, attached there. The move is modelled
as a live migration (lab.MigrationLab): the destination's adapter is prepared beforehand (a
second VM namespace with the same addresses and MAC, linked to B's vme1b, which B's hypervisor
has brought up); at the switch-over the adapter on A goes down (the source stops) and the guest
runs on behind B, with the neighbour entries it had for its gateways (A's MAC, REACHABLE: guest
memory moves with the VM). Then, as an orchestrator would: AttachVm on B (with the MAC), then
DetachVm on A. A second namespace rather than moving the VM's link: moving a link between
namespaces flushes the guest's neighbour entries and addresses and carries A's gateway MAC
along, so neither the guest's stale gateway entry nor B's gateway announcement would be tested.

What has to happen for traffic to resume: X's neighbour entries for the VM's addresses must
move from A's uplink MAC to B's (gratuitous ARP and unsolicited NA from B; without them X keeps
sending to A, which after the DetachVm only hairpins through its LAN route), and the guest's
entries for its gateways must move to B's vme1b MAC (GARP for 169.255.30.1 and an NA with the
router flag for fe80::ffff:1:1 on vme1b; without them the guest's replies go to A's MAC and are
dropped until its entries expire, 15 to 45 s).

X pings both addresses at 20/s (`ping -D -i 0.05`) across the move. MigrationTest asserts that
replies of both families resume within 1 s of the start of AttachVm on B and prints the gap;
NoAnnouncementTest runs the same move with --announce-count=0 on both hosts and shows that
without announcements replies do not come back within 5 s (it fails when the agent refuses a
count of 0, which the README documents as "never").

Needs root and the vmnetd binary (<repo>/build/server/vmnetd, or set VMNETD); skips without
root, fails as root when it cannot run (tests/skips.py):

    /usr/bin/python3 tests/e2e/test_migration.py [-v]
"""

import os
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import skips  # noqa: E402  (tests/skips.py: no skips as root)
import lab  # noqa: E402  (first: it explains a missing grpc module)
import grpcurl  # noqa: E402

SERVICE = "vmnet.v1.VmNetwork"
INTERVAL = 0.05  # 20 echo requests a second
REQUIREMENT = 1.0  # seconds from the AttachVm on B to the first reply (issue #5)
REACH_DEADLINE = 5
SETTLE_TIMEOUT = 15


def describe(family, gap, pings_ended, attach_started):
    """One line for the report: when replies resumed, and how many echo requests were lost;
    `pings_ended` is how many seconds after the AttachVm on B the pings stopped."""
    if gap["first"] is None:
        return (f"{family}: replies did not resume within {pings_ended:.1f} s of AttachVm on B "
                f"(pings stopped then; last reply, before the switch-over: seq {gap['last'][1]})")
    # A request leaves about INTERVAL after the one before; the last answered one left at its
    # reply's time (the round trip takes well under a millisecond here).
    last_time, last_seq = gap["last"]
    since_attach = sum(1 for seq in range(last_seq + 1, gap["first"][1])
                       if last_time + (seq - last_seq) * INTERVAL >= attach_started)
    return (f"{family}: replies resumed {gap['resumed_after'] * 1000:.0f} ms after AttachVm on B "
            f"began; {gap['lost']} echo requests lost ({since_attach} of them sent after the "
            f"attach began), {gap['first'][0] - last_time:.3f} s without replies in all")


class MigrationTestCase(unittest.TestCase):
    """The move, done once per class in setUpClass; subclasses set the daemon flags and how
    long the pings run after the AttachVm on B."""

    daemon_flags = ()
    # Seconds of pings after the AttachVm on B: past the requirement's bound (lab.time_bound).
    after_attach = max(3.0, lab.time_bound(REQUIREMENT) + 2.0)

    @classmethod
    def setUpClass(cls):
        cls.lab = cls.enterClassContext(lab.MigrationLab())
        for which in ("a", "b"):
            cls.start_daemon(which)
        cls.clients = {which: cls.enterClassContext(grpcurl.Client(daemon.target))
                       for which, daemon in cls.lab.daemons.items()}
        cls.vm_a, cls.vm_b = cls.lab.vm_on_a, cls.lab.vm_on_b
        cls.attached_on_a = cls.attach("a", cls.vm_a)
        cls.reached_on_a = {address: cls.lab.ping(cls.lab.x, address, deadline=REACH_DEADLINE)
                            for address in cls.vm_a.addresses}
        cls.reached_on_a.update({f"VM to {address}": cls.lab.ping(cls.vm_a.ns, address,
                                                                  deadline=REACH_DEADLINE)
                                 for address in (lab.X_ADDRESS, lab.X_ADDRESS6)})
        if not all(cls.reached_on_a.values()):
            raise lab.LabError(f"precondition: before the move, over A: {cls.reached_on_a}; "
                               f"AttachVm on A answered {cls.attached_on_a}")
        hosts_b = cls.lab.hosts["b"]
        cls.lab.run(hosts_b, "ip", "link", "set", cls.vm_b.interface, "up")  # B's hypervisor
        lab.wait_until(lambda: cls.lab.ipv6_settled(hosts_b) and
                       cls.lab.ipv6_settled(cls.vm_b.ns), SETTLE_TIMEOUT)
        cls.move()

    @classmethod
    def start_daemon(cls, which):
        cls.lab.start_daemon(which, *cls.daemon_flags)

    @classmethod
    def attach(cls, which, vm):
        return cls.clients[which].call(f"{SERVICE}/AttachVm", {
            "vm_id": vm.vm_id, "interface": vm.interface, "ip_addresses": vm.addresses,
            "mac_address": vm.mac})

    @classmethod
    def move(cls):
        """Pings running, the switch-over, AttachVm on B, DetachVm on A; keeps the times."""
        count = int((2.0 + cls.after_attach) / INTERVAL)
        pingers = {address: cls.lab.start_ping(cls.lab.x, address, count, INTERVAL,
                                               ["-D", "-W", "1"])
                   for address in cls.vm_a.addresses}
        try:
            lab.wait_until(lambda: all(p.replies >= 20 for p in pingers.values()), 5)
            cls.replies_before = {a: p.replies for a, p in pingers.items()}
            cls.carried = cls.lab.switch_over()
            cls.stopped = time.time()
            cls.attach_started = time.time()
            cls.attached_on_b = cls.attach("b", cls.vm_b)
            cls.attach_took = time.time() - cls.attach_started
            cls.clients["a"].call(f"{SERVICE}/DetachVm", {"vm_id": cls.vm_a.vm_id})
            cls.results = {a: p.wait() for a, p in pingers.items()}
            cls.pings_ended = time.time() - cls.attach_started
        finally:
            for pinger in pingers.values():
                pinger.close()
        cls.outputs = {a: p.output for a, p in pingers.items()}
        cls.gaps = {a: lab.reply_gap(p.output, cls.stopped, cls.attach_started)
                    for a, p in pingers.items()}
        cls.report = [describe(f"{cls.__name__} IPv{6 if ':' in a else 4} {a}", gap,
                               cls.pings_ended, cls.attach_started)
                      for a, gap in cls.gaps.items()]
        print("\n" + "\n".join(cls.report) + f"\n(AttachVm on B took "
              f"{cls.attach_took * 1000:.0f} ms)", file=sys.stderr)

    def run(self, result=None):
        """Runs the test; when it fails, prints the end of both daemons' logs."""
        result = result if result is not None else self.defaultTestResult()
        problems = len(result.failures) + len(result.errors)
        super().run(result)
        if len(result.failures) + len(result.errors) > problems:
            for which, daemon in getattr(self.lab, "daemons", {}).items():
                tail = "\n".join(daemon.log().splitlines()[-40:])
                print(f"\n--- vmnetd on host {which.upper()}, last 40 lines ---\n{tail}",
                      file=sys.stderr)
        return result

    def test_reachable_on_a(self):
        self.assertEqual(self.attached_on_a["vm"].get("state"), "VM_STATE_PROGRAMMED",
                         f"AttachVm on A answered {self.attached_on_a}")
        self.assertTrue(all(self.reached_on_a.values()),
                        f"before the move, over A: {self.reached_on_a} (precondition)")
        self.assertEqual({n["dst"] for n in self.carried}, {lab.GATEWAY, lab.GATEWAY6},
                         f"the guest had no neighbour entry with a MAC for one of its gateways "
                         f"to carry to B: {self.carried} (precondition)")
        for address, before in self.replies_before.items():
            self.assertGreaterEqual(before, 20, f"X's ping of {address} had {before} replies "
                                                f"before the switch-over (precondition)")


class MigrationTest(MigrationTestCase):
    """The move with the agent's default announcements (--announce-count 3, every 1 s)."""

    def test_attached_on_b(self):
        self.assertEqual(self.attached_on_b["vm"].get("state"), "VM_STATE_PROGRAMMED",
                         f"AttachVm on B answered {self.attached_on_b}")

    def test_ipv4_resumes_within_1s_of_attach_on_b(self):
        self.check_resumed(self.vm_a.address)

    def test_ipv6_resumes_within_1s_of_attach_on_b(self):
        self.check_resumed(self.vm_a.address6)

    def check_resumed(self, address):
        gap = self.gaps[address]
        self.assertIsNotNone(gap["first"], f"X's pings of {address} never got a reply after the "
                                           f"move: {self.results[address]}")
        # The requirement holds for a normal build; under a sanitizer vmnetd is slower.
        self.assertLess(gap["resumed_after"], lab.time_bound(REQUIREMENT),
                        f"{describe(address, gap, self.pings_ended, self.attach_started)}; "
                        f"the requirement is {REQUIREMENT} s")
        sent, received = self.results[address]
        replies_after = len([r for r in lab.ping_replies(self.outputs[address])
                             if r[0] > gap["first"][0]])
        self.assertGreaterEqual(replies_after, 10, f"replies of {address} resumed but did not "
                                                   f"continue: {sent} sent, {received} received")

    def test_x_sends_to_b(self):
        """X's neighbour entries for the VM carry B's uplink MAC (not A's, through which the
        traffic would only hairpin)."""
        b_mac = self.lab.mac(lab.UPLINK, ns=self.lab.hosts["b"])
        entries = {n["dst"]: n.get("lladdr") for n in self.lab.ip_json(
            self.lab.x, "neigh", "show", "dev", "eth0") if n["dst"] in self.vm_a.addresses}
        self.assertEqual(entries, {a: b_mac for a in self.vm_a.addresses},
                         f"X's neighbour entries for the VM after the move (B's uplink is "
                         f"{b_mac}, A's {self.lab.mac(lab.UPLINK, ns=self.lab.hosts['a'])})")

    def test_guest_sends_to_b(self):
        """The guest's entries for its gateways carry B's vme1b MAC."""
        b_mac = self.lab.mac(self.vm_b.interface, ns=self.lab.hosts["b"])
        entries = {n["dst"]: n.get("lladdr") for n in self.lab.gateway_neighbours(self.vm_b)}
        self.assertEqual(entries, {lab.GATEWAY: b_mac, lab.GATEWAY6: b_mac},
                         f"the guest's entries for its gateways after the move (carried over "
                         f"from A: {self.carried})")

    def test_a_holds_nothing_of_the_vm(self):
        a = self.lab.hosts["a"]
        proxies = self.lab.ip_json(a, "neigh", "show", "proxy")
        self.assertEqual([p for p in proxies if p["dst"] in self.vm_a.addresses], [],
                         "host A still publishes the VM's addresses after DetachVm")


class NoAnnouncementTest(MigrationTestCase):
    """The control: the same move with --announce-count=0 on both hosts. Replies stay away
    for much longer than the requirement; the pings run 5 s after the attach."""

    daemon_flags = ("--announce-count=0",)
    after_attach = 5.0

    @classmethod
    def start_daemon(cls, which):
        try:
            super().start_daemon(which)
        except lab.DaemonError as e:
            # README: 0 means never; a vmnetd that refuses it broke a documented flag.
            raise AssertionError(f"vmnetd refuses --announce-count=0 (README: 0: never): "
                                 f"{e}") from e

    def test_without_announcements_replies_stay_away(self):
        for address, gap in self.gaps.items():
            with self.subTest(address=address):
                if gap["first"] is not None:
                    line = describe(address, gap, self.pings_ended, self.attach_started)
                    self.assertGreater(gap["resumed_after"], REQUIREMENT,
                                       f"without announcements {line}: the lab does not need "
                                       f"announcements, so MigrationTest proves nothing")


def load_tests(loader, tests, pattern):
    """MigrationTestCase only holds the move: run its two subclasses, not it."""
    suite = unittest.TestSuite()
    for case in (MigrationTest, NoAnnouncementTest):
        suite.addTests(loader.loadTestsFromTestCase(case))
    return suite


if __name__ == "__main__":
    skips.main()
