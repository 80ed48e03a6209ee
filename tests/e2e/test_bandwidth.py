#!/usr/bin/python3
"""End-to-end proof of per-VM bandwidth limits (issue 15), with iperf3, in a namespace lab.

    Computer X ── LAN ── eth0 (uplink) [ HOST ] vme1a ══ eth0 [ VM 1 ]  198.51.100.201/32
    198.51.100.10        198.51.100.1              vme2a ══ eth0 [ VM 2 ]  198.51.100.202/32
                                                   vme3a ══ eth0 [ VM 3 ]  198.51.100.203/32

  ShapingTest     20 Mbit/s each way measured with iperf3 TCP between X and VM 1 within 10%;
                  VM 2 (no limit) transfers well above it at the same time; an upsert to
                  8 Mbit/s moves a running transfer's rate within a second, in place (the
                  qdisc's counters keep counting), without dropping the connection; the kernel
                  objects are the ones README describes (tc qdisc/filter, ip link)
  DriftTest       `tc qdisc del dev vme1a root`, the ifb's tbf, the filter, the ingress qdisc
                  and the ifb device deleted by hand: each back within 1 s (polled)
  OwnershipTest   a foreign ingress filter on VM 2's link survives its limit coming and
                  going; a foreign root qdisc on VM 3's link fails VM 3 naming it, untouched
  RestartTest     SIGTERM and start again with nothing drifted: `tc monitor` sees nothing
  DetachTest      DetachVm removes exactly the VM's tc objects and its ifb
  PacketRateTest  egress_packets_per_second 200 on VM 1: a ping flood from it is answered at
                  about 200/s, from VM 2 (unlimited) far above; an upsert to 1000 moves it;
                  removed, the full rate is back; the nft objects, /metrics, vmnetctl get;
                  its map elements deleted by hand come back within 1 s
  PacketRateWithoutPortSecurityTest  --port-security=false: refused (FAILED_PRECONDITION)
                  naming the field and why

Throughputs are printed to stderr. Only 198.51.100.0/24 is used; nothing touches the root
namespace.

Needs root, iperf3 and tc, and the vmnetd binary (<repo>/build/server/vmnetd, or set VMNETD):

    /usr/bin/python3 tests/e2e/test_bandwidth.py [-v] [TestClass.test_method]
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lab  # noqa: E402  (first: it explains a missing grpc module)
import grpcurl  # noqa: E402
import test_host_routed as host_routed  # noqa: E402
from grpc import StatusCode  # noqa: E402

LIMIT = 20_000_000  # bit/s
LOWER = 8_000_000
TOLERANCE = 0.10
IPERF_SECONDS = 4
IPERF_OMIT = 1  # seconds of slow start and initial burst left out of the measurement
REPAIR_DEADLINE = 1.0  # issue 15: "back within 1 s"
QDISC_HANDLE = "ed:"
FILTER_PRIO = 237


def measured(text):
    print(f"\n  [measured] {text}", file=sys.stderr, flush=True)


def ifb_of(interface):
    """The ifb device vmnetd gives a VM link (kernel::IfbName): vme1a -> vmb1a."""
    return "vmb" + interface[3:]


class BandwidthTestCase(host_routed.LabTestCase):
    vm_count = 2
    daemon_flags = ("--metrics-listen=127.0.0.1:9447",)

    @classmethod
    def setUpClass(cls):
        for tool in ("iperf3", "tc"):
            if shutil.which(tool) is None:
                raise unittest.SkipTest(f"{tool} is not installed (apt-get install {tool})")
        super().setUpClass()

    # -- kernel queries ---------------------------------------------------------------------------

    def tc_json(self, *args):
        out = lab.run_command("tc", "-j", "-s", "-n", self.lab.host, *args).stdout.strip()
        return json.loads(out) if out else []

    def root_qdisc(self, dev):
        qdiscs = [q for q in self.tc_json("qdisc", "show", "dev", dev) if q.get("root")]
        return qdiscs[0] if qdiscs else None

    def ingress_qdisc(self, dev):
        qdiscs = [q for q in self.tc_json("qdisc", "show", "dev", dev)
                  if q.get("kind") == "ingress"]
        return qdiscs[0] if qdiscs else None

    def filters(self, dev):
        """`tc filter show dev DEV ingress`, as text (tc's JSON for u32 is incomplete)."""
        result = lab.run_command("tc", "-n", self.lab.host, "filter", "show", "dev", dev,
                                 "ingress", check=False)
        return result.stdout if result.returncode == 0 else ""

    def is_shaped(self, dev, bits):
        q = self.root_qdisc(dev)
        return (q is not None and q["kind"] == "tbf" and q["handle"] == QDISC_HANDLE
                and q["options"]["rate"] == bits // 8)

    def redirects(self, dev, ifb):
        text = self.filters(dev)
        return (f"pref {FILTER_PRIO} u32" in text and f"Redirect to device {ifb}" in text
                and "match 00000000/00000000 at 0" in text)

    def fully_limited(self, vm, ingress, egress):
        ifb = ifb_of(vm.interface)
        link = self.lab.link(ifb)
        return (self.is_shaped(vm.interface, ingress) and link is not None
                and "UP" in link["flags"] and self.is_shaped(ifb, egress)
                and self.ingress_qdisc(vm.interface) is not None
                and self.redirects(vm.interface, ifb))

    def wait_limited(self, vm, ingress=LIMIT, egress=LIMIT, timeout=5):
        if not lab.wait_until(lambda: self.fully_limited(vm, ingress, egress), timeout):
            self.fail(f"{vm.interface}: not limited to {ingress}/{egress} bit/s within "
                      f"{timeout} s: qdiscs {self.tc_json('qdisc', 'show')}\n"
                      f"filters:\n{self.filters(vm.interface)}")

    # -- traffic ------------------------------------------------------------------------------------

    def start_server(self, vm, port):
        """iperf3 -s in VM `vm`'s namespace, for one test; waits until it listens."""
        server = subprocess.Popen(["ip", "netns", "exec", vm.ns, "iperf3", "-s", "-1", "-p",
                                   str(port)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (server.kill(), server.wait()))

        def listening():
            out = lab.run_command("ip", "netns", "exec", vm.ns, "ss", "-Hltn",
                                  f"sport = :{port}").stdout
            return str(port) in out
        self.assertTrue(lab.wait_until(listening, 5), f"iperf3 -s in {vm.ns} is not listening")
        return server

    def iperf(self, vm, port, reverse=False, seconds=IPERF_SECONDS, interval=1):
        """iperf3 TCP from X to `vm` (towards the VM), or with `reverse` from the VM to X;
        returns iperf3's JSON result."""
        self.start_server(vm, port)
        cmd = ["iperf3", "-c", vm.address, "-p", str(port), "-t", str(seconds), "-O",
               str(IPERF_OMIT), "-i", str(interval), "-J"]
        if reverse:
            cmd.append("-R")
        result = lab.run_command("ip", "netns", "exec", self.lab.x, *cmd, check=False,
                                 timeout=seconds + 20)
        self.assertEqual(result.returncode, 0,
                         f"iperf3 {cmd} failed: {result.stdout[-2000:]} {result.stderr}")
        return json.loads(result.stdout)

    @staticmethod
    def received_bps(report):
        return report["end"]["sum_received"]["bits_per_second"]

    def assertNear(self, bps, limit, what):
        measured(f"{what}: {bps / 1e6:.2f} Mbit/s (limit {limit / 1e6:.0f} Mbit/s)")
        self.assertLess(abs(bps - limit), TOLERANCE * limit,
                        f"{what}: {bps / 1e6:.2f} Mbit/s is not within 10% of "
                        f"{limit / 1e6:.0f} Mbit/s")


class ShapingTest(BandwidthTestCase):
    """VM 1 limited to 20 Mbit/s each way; VM 2 unlimited."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.vm1, cls.vm2 = cls.lab.vms[1], cls.lab.vms[2]
        cls.response = cls.attach(cls.vm1, bandwidth={"ingress_bits_per_second": LIMIT,
                                                      "egress_bits_per_second": LIMIT})
        cls.attach(cls.vm2)

    def setUp(self):
        self.attach(self.vm1, bandwidth={"ingress_bits_per_second": LIMIT,
                                         "egress_bits_per_second": LIMIT})
        self.wait_limited(self.vm1)

    def test_1_kernel_objects(self):
        ifb = ifb_of(self.vm1.interface)
        root = self.root_qdisc(self.vm1.interface)
        self.assertEqual((root["kind"], root["handle"], root["options"]["rate"]),
                         ("tbf", QDISC_HANDLE, LIMIT // 8), root)
        self.assertEqual(self.lab.link(ifb)["link_type"], "ether")
        details = lab.run_command("ip", "-d", "-n", self.lab.host, "link", "show", ifb).stdout
        self.assertIn("ifb", details)
        self.assertTrue(self.redirects(self.vm1.interface, ifb), self.filters(self.vm1.interface))
        # VM 2 has no limit: no qdisc of ours, no ifb.
        root2 = self.root_qdisc(self.vm2.interface)
        self.assertTrue(root2 is None or root2["handle"] != QDISC_HANDLE, root2)
        self.assertIsNone(self.lab.link(ifb_of(self.vm2.interface)))
        self.assertIsNone(self.ingress_qdisc(self.vm2.interface))
        # The API reports the limits.
        self.assertEqual(self.response["vm"]["bandwidth"],
                         {"ingress_bits_per_second": str(LIMIT),
                          "egress_bits_per_second": str(LIMIT), "burst_bytes": "0",
                          "egress_packets_per_second": "0"})
        # Installing is no drift repair (the ifb is created in one pass, used in the next).
        self.assertNotIn("event=drift_repaired", self.lab.daemon.log())
        got = self.call("GetVm", {"vm_id": "vm-1"})["vm"]
        self.assertEqual(got["bandwidth"]["ingress_bits_per_second"], str(LIMIT), got)
        out = lab.run_command(os.path.join(lab.REPO, "build", "client", "vmnetctl"),
                              f"--server={self.lab.daemon.target}", "get", "vm-1").stdout
        self.assertIn("bandwidth", out)
        self.assertIn("20 Mbit/s", out)

    def test_2_towards_vm(self):
        self.assertNear(self.received_bps(self.iperf(self.vm1, 5201)), LIMIT,
                        "X -> VM 1 (VM ingress)")

    def test_3_from_vm(self):
        self.assertNear(self.received_bps(self.iperf(self.vm1, 5202, reverse=True)), LIMIT,
                        "VM 1 -> X (VM egress)")
        # The shaper held the VM's packets back: /metrics says so, read at scrape time.
        metrics = self.lab.daemon.metrics()
        key = ('vmnet_vm_rate_limited_overlimits_total{vm_id="vm-1",interface="vme1a",'
               'direction="transmit"}')
        self.assertGreater(metrics.get(key, 0), 0,
                           {k: v for k, v in metrics.items() if "rate_limited" in k})
        self.assertIn('vmnet_vm_rate_limited_dropped_packets_total{vm_id="vm-1",'
                      'interface="vme1a",direction="receive"}', metrics)
        self.assertFalse(any('vm_id="vm-2"' in k for k in metrics if "rate_limited" in k))

    def test_4_other_vm_not_slowed(self):
        """VM 1 transfers at its limit while VM 2, unlimited, transfers well above it."""
        reports = {}

        def limited():
            reports["vm1"] = self.iperf(self.vm1, 5203)
        thread = threading.Thread(target=limited)
        thread.start()
        try:
            reports["vm2"] = self.iperf(self.vm2, 5204)
        finally:
            thread.join()
        vm2 = self.received_bps(reports["vm2"])
        measured(f"X -> VM 2 (unlimited) beside VM 1's limited transfer: {vm2 / 1e6:.0f} Mbit/s")
        self.assertGreater(vm2, 10 * LIMIT, "VM 2, unlimited, is not well above VM 1's limit")
        self.assertNear(self.received_bps(reports["vm1"]), LIMIT, "X -> VM 1 beside VM 2")
        vm2_back = self.received_bps(self.iperf(self.vm2, 5205, reverse=True))
        measured(f"VM 2 (unlimited) -> X: {vm2_back / 1e6:.0f} Mbit/s")
        self.assertGreater(vm2_back, 10 * LIMIT)

    def test_5_upsert_moves_the_rate_in_place(self):
        """A running transfer at 20 Mbit/s; AttachVm with 8 Mbit/s: the same connection
        continues at 8 within a second, and the tbf is changed, not replaced."""
        vm = self.vm1
        before = self.root_qdisc(vm.interface)["bytes"]
        self.start_server(vm, 5206)
        seconds, change_at = 8, 3.0
        cmd = ["iperf3", "-c", vm.address, "-p", "5206", "-t", str(seconds), "-i", "0.5", "-J"]
        client = subprocess.Popen(["ip", "netns", "exec", self.lab.x, *cmd],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: client.poll() is None and client.kill())
        started = time.monotonic()
        lab.wait_until(lambda: time.monotonic() - started >= change_at, change_at + 1)
        changed = time.monotonic() - started
        self.attach(vm, bandwidth={"ingress_bits_per_second": LOWER,
                                   "egress_bits_per_second": LIMIT})
        self.assertTrue(self.is_shaped(vm.interface, LOWER), self.root_qdisc(vm.interface))
        out, err = client.communicate(timeout=seconds + 20)
        self.assertEqual(client.returncode, 0, f"iperf3 failed across the upsert: {err} "
                                               f"{out[-1000:]}")
        report = json.loads(out)
        intervals = [i["sum"] for i in report["intervals"]]
        def rate_from(offset):
            window = [i for i in intervals if i["start"] >= changed + offset]
            return sum(i["bytes"] for i in window) * 8 / sum(i["seconds"] for i in window)
        # Moved within a second: from 1 s after the upsert nothing above the new limit...
        moved = rate_from(1.0)
        self.assertLess(moved, LOWER * (1 + TOLERANCE),
                        f"X -> VM 1 from 1 s after the upsert to 8 Mbit/s: "
                        f"{moved / 1e6:.2f} Mbit/s")
        # ...and, once TCP has recovered from the drops of the sudden change (which can take
        # it below the rate for a moment: 7.0 Mbit/s was seen in the first second), at it.
        self.assertNear(rate_from(2.0), LOWER, "X -> VM 1 from 2 s after the upsert to 8 Mbit/s")
        # In place: the qdisc kept its counters (a new one would start from zero).
        self.assertGreater(self.root_qdisc(vm.interface)["bytes"], before)
        self.assertEqual(self.root_qdisc(vm.interface)["handle"], QDISC_HANDLE)


class DriftTest(BandwidthTestCase):
    """Each of VM 1's traffic-control objects deleted by hand comes back within 1 s."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.vm1 = cls.lab.vms[1]
        cls.attach(cls.vm1, bandwidth={"ingress_bits_per_second": LIMIT,
                                       "egress_bits_per_second": LIMIT})

    def setUp(self):
        self.wait_limited(self.vm1)

    def repaired_after(self, *cmd):
        lab.run_command(*cmd)
        start = time.monotonic()
        ok = lab.wait_until(lambda: self.fully_limited(self.vm1, LIMIT, LIMIT), REPAIR_DEADLINE,
                            interval=0.02)
        took = time.monotonic() - start
        measured(f"`{' '.join(cmd[3:])}` repaired in {took * 1000:.0f} ms")
        self.assertTrue(ok, f"`{' '.join(cmd)}` not repaired within {REPAIR_DEADLINE} s: "
                            f"{self.tc_json('qdisc', 'show')}\n{self.filters(self.vm1.interface)}")

    def test_root_qdisc(self):
        self.repaired_after("tc", "-n", self.lab.host, "qdisc", "del", "dev",
                            self.vm1.interface, "root")

    def test_ifb_qdisc(self):
        self.repaired_after("tc", "-n", self.lab.host, "qdisc", "del", "dev",
                            ifb_of(self.vm1.interface), "root")

    def test_filter(self):
        self.repaired_after("tc", "-n", self.lab.host, "filter", "del", "dev",
                            self.vm1.interface, "ingress", "prio", str(FILTER_PRIO))

    def test_ingress_qdisc(self):
        self.repaired_after("tc", "-n", self.lab.host, "qdisc", "del", "dev",
                            self.vm1.interface, "ingress")

    def test_ifb_link(self):
        self.repaired_after("ip", "-n", self.lab.host, "link", "del",
                            ifb_of(self.vm1.interface))

    def test_ifb_down(self):
        self.repaired_after("ip", "-n", self.lab.host, "link", "set",
                            ifb_of(self.vm1.interface), "down")


class OwnershipTest(BandwidthTestCase):
    """What is not vmnetd's stays as it is."""

    vm_count = 3

    @classmethod
    def prepare_host(cls):
        host = cls.lab.host
        vm2, vm3 = cls.lab.vms[2], cls.lab.vms[3]
        lab.run_command("tc", "-n", host, "qdisc", "add", "dev", vm2.interface, "ingress")
        lab.run_command("tc", "-n", host, "filter", "add", "dev", vm2.interface, "ingress",
                        "prio", "1", "protocol", "ip", "u32", "match", "ip", "dst",
                        "203.0.113.1/32", "flowid", "ffff:1")
        lab.run_command("tc", "-n", host, "qdisc", "add", "dev", vm3.interface, "root",
                        "handle", "1:", "htb")

    def test_foreign_filter_kept(self):
        vm2 = self.lab.vms[2]
        self.attach(vm2, bandwidth={"egress_bits_per_second": LIMIT})
        self.assertTrue(lab.wait_until(
            lambda: self.redirects(vm2.interface, ifb_of(vm2.interface)), 5),
            self.filters(vm2.interface))
        self.assertIn("pref 1 u32", self.filters(vm2.interface))
        self.attach(vm2)  # the limit goes
        self.assertTrue(lab.wait_until(
            lambda: f"pref {FILTER_PRIO}" not in self.filters(vm2.interface), 5),
            self.filters(vm2.interface))
        self.assertIn("pref 1 u32", self.filters(vm2.interface))
        self.assertIsNotNone(self.ingress_qdisc(vm2.interface))
        self.assertIsNone(self.lab.link(ifb_of(vm2.interface)))

    def test_foreign_root_fails_the_vm(self):
        vm3 = self.lab.vms[3]
        response = self.attach(vm3, bandwidth={"ingress_bits_per_second": LIMIT})
        self.assertEqual(response["vm"]["state"], "VM_STATE_FAILED", response)
        self.assertIn("htb 1:", response["vm"]["message"])
        self.assertIn("not vmnetd's", response["vm"]["message"])
        root = self.root_qdisc(vm3.interface)
        self.assertEqual((root["kind"], root["handle"]), ("htb", "1:"))
        # The foreign qdisc removed: the VM recovers by itself.
        lab.run_command("tc", "-n", self.lab.host, "qdisc", "del", "dev", vm3.interface, "root")
        self.assertTrue(lab.wait_until(lambda: self.is_shaped(vm3.interface, LIMIT), 10),
                        self.root_qdisc(vm3.interface))


class RestartTest(BandwidthTestCase):
    """A restart with nothing drifted writes no traffic-control object."""

    def test_restart_writes_nothing(self):
        vm1 = self.lab.vms[1]
        self.attach(vm1, bandwidth={"ingress_bits_per_second": LIMIT,
                                    "egress_bits_per_second": LIMIT, "burst_bytes": 30000})
        self.wait_limited(vm1)
        self.lab.daemon.stop()
        monitor = subprocess.Popen(["ip", "netns", "exec", self.lab.host, "tc", "monitor"],
                                   stdout=subprocess.PIPE, text=True)
        self.addCleanup(lambda: (monitor.kill(), monitor.wait()))
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(monitor.stdout), daemon=True)
        reader.start()
        # A marker of our own, on a link of the test's: everything before it in the monitor's
        # output happened before it.
        lab.run_command("ip", "-n", self.lab.host, "link", "add", "mark0", "type", "veth",
                        "peer", "name", "mark1")
        self.lab.daemon.start()
        lab.run_command("tc", "-n", self.lab.host, "qdisc", "add", "dev", "mark0", "root",
                        "handle", "5:", "pfifo")
        self.assertTrue(lab.wait_until(lambda: any("mark0" in l for l in lines), 5), lines)
        before_marker = lines[:next(i for i, l in enumerate(lines) if "mark0" in l)]
        self.assertEqual(before_marker, [], "vmnetd changed traffic control at its restart")
        self.assertTrue(self.fully_limited(vm1, LIMIT, LIMIT))


class DetachTest(BandwidthTestCase):
    """DetachVm removes exactly the VM's traffic-control objects."""

    def test_detach(self):
        vm1, vm2 = self.lab.vms[1], self.lab.vms[2]
        for vm in (vm1, vm2):
            self.attach(vm, bandwidth={"ingress_bits_per_second": LIMIT,
                                       "egress_bits_per_second": LIMIT})
            self.wait_limited(vm)
        self.detach("vm-1")
        root = self.root_qdisc(vm1.interface)
        self.assertTrue(root is None or root["handle"] != QDISC_HANDLE, root)
        self.assertIsNone(self.ingress_qdisc(vm1.interface))
        self.assertIsNone(self.lab.link(ifb_of(vm1.interface)))
        self.assertTrue(self.fully_limited(vm2, LIMIT, LIMIT), "VM 2 lost its limits")


PPS = 200  # packets/s
PPS_HIGHER = 1000
FLOOD_SECONDS = 3
# A policer measured with ping -f (which waits 10 ms after each unanswered request): the
# delivered rate is near the limit; generous bounds, as the lab runs on shared cores.
PPS_LOW, PPS_HIGH = 0.5, 1.5


class PacketRateTest(BandwidthTestCase):
    """egress_packets_per_second: VM 1 limited to 200 packets/s from the VM, VM 2 unlimited.
    A flood from each (ping -f, 16-byte payloads, for 3 s, to X) is answered at about the
    limit from VM 1 and far above it from VM 2; an upsert to 1000 moves the rate; removing
    the limit restores the full rate; the kernel objects, /metrics and `vmnetctl get`."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.vm1, cls.vm2 = cls.lab.vms[1], cls.lab.vms[2]
        cls.attach(cls.vm2)

    def setUp(self):
        self.attach(self.vm1, bandwidth={"egress_packets_per_second": PPS})
        self.wait_pps(PPS)

    def nft(self, *args):
        return lab.run_command("ip", "netns", "exec", self.lab.host, "nft", *args,
                               check=False).stdout

    def pps_limit(self):
        """The rate of vme1a's limit object as `nft` lists it, or None."""
        text = self.nft("list", "limits", "table", "inet", "vmnet")
        for block in text.split("limit ")[1:]:
            if block.startswith(f"egress_pps.{self.vm1.interface} "):
                rate = block.split("rate over ", 1)[1].split("/second", 1)[0]
                element = f'"{self.vm1.interface}" : "egress_pps.{self.vm1.interface}"'
                if element in self.nft("list", "map", "inet", "vmnet", "egress_pps"):
                    return int(rate)
        return None

    def wait_pps(self, pps, timeout=5):
        self.assertTrue(lab.wait_until(lambda: self.pps_limit() == pps, timeout),
                        f"no limit of {pps}/s: {self.nft('list', 'ruleset')}")

    def flood(self, vm):
        """ping -f from `vm` to X for FLOOD_SECONDS; the answered requests per second."""
        out = lab.run_command("ip", "netns", "exec", vm.ns, "ping", "-q", "-f", "-s", "16",
                              "-w", str(FLOOD_SECONDS), lab.X_ADDRESS, check=False,
                              timeout=FLOOD_SECONDS + 10).stdout
        match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        self.assertIsNotNone(match, out)
        sent, received = int(match.group(1)), int(match.group(2))
        return sent / FLOOD_SECONDS, received / FLOOD_SECONDS

    def assertPps(self, vm, limit, what):
        sent, got = self.flood(vm)
        measured(f"{what}: {got:.0f} packets/s answered of {sent:.0f} sent (limit {limit}/s)")
        self.assertGreater(got, PPS_LOW * limit, what)
        self.assertLess(got, PPS_HIGH * limit, what)
        return got

    def test_1_limited_and_unlimited(self):
        self.assertPps(self.vm1, PPS, "VM 1 -> X, ping -f")
        _, free = self.flood(self.vm2)
        measured(f"VM 2 (unlimited) -> X, ping -f: {free:.0f} packets/s answered")
        self.assertGreater(free, 5 * PPS, "VM 2, unlimited, is limited")
        # The kernel objects: VM 1's limit and counter, none for VM 2.
        ruleset = self.nft("list", "ruleset")
        self.assertIn(f"rate over {PPS}/second burst {PPS // 10} packets", ruleset)
        self.assertIn(f"counter egress_pps_dropped.{self.vm1.interface}", ruleset)
        self.assertNotIn(f"egress_pps.{self.vm2.interface}", ruleset)
        self.assertIn("limit name iifname map @egress_pps goto drop_egress_pps", ruleset)
        # /metrics: the limit's drops, read at scrape time; no series for VM 2.
        metrics = self.lab.daemon.metrics()
        key = ('vmnet_vm_packet_rate_limited_dropped_packets_total{vm_id="vm-1",'
               'interface="vme1a"}')
        self.assertGreater(metrics.get(key, 0), 0,
                           {k: v for k, v in metrics.items() if "packet_rate" in k})
        self.assertFalse(any('vm_id="vm-2"' in k for k in metrics if "packet_rate" in k))
        # The API and vmnetctl report the limit.
        got = self.call("GetVm", {"vm_id": "vm-1"})["vm"]
        self.assertEqual(got["bandwidth"]["egress_packets_per_second"], str(PPS), got)
        out = lab.run_command(os.path.join(lab.REPO, "build", "client", "vmnetctl"),
                              f"--server={self.lab.daemon.target}", "get", "vm-1").stdout
        self.assertIn(f"egress {PPS} packets/s", out)

    def test_2_upsert_changes_the_rate(self):
        self.attach(self.vm1, bandwidth={"egress_packets_per_second": PPS_HIGHER})
        # The AttachVm reply comes after the write: the new rate is in place already.
        self.assertEqual(self.pps_limit(), PPS_HIGHER)
        self.assertPps(self.vm1, PPS_HIGHER, "VM 1 -> X after the upsert to 1000/s")

    def test_3_removed_restores_the_full_rate(self):
        self.attach(self.vm1)
        self.assertIsNone(self.pps_limit())
        self.assertNotIn(f"egress_pps.{self.vm1.interface}", self.nft("list", "ruleset"))
        _, free = self.flood(self.vm1)
        measured(f"VM 1 -> X with its limit removed: {free:.0f} packets/s answered")
        self.assertGreater(free, 5 * PPS)

    def test_4_drift_repaired(self):
        for cmd in (("delete", "element", "inet", "vmnet", "egress_pps",
                     f'{{ "{self.vm1.interface}" }}'),
                    ("delete", "element", "inet", "vmnet", "egress_pps_dropped",
                     f'{{ "{self.vm1.interface}" }}')):
            lab.run_command("ip", "netns", "exec", self.lab.host, "nft", *cmd)
            start = time.monotonic()
            ok = lab.wait_until(
                lambda: self.pps_limit() == PPS and f'"{self.vm1.interface}" : '
                in self.nft("list", "map", "inet", "vmnet", "egress_pps_dropped"),
                REPAIR_DEADLINE, interval=0.02)
            measured(f"`nft {' '.join(cmd)}` repaired in {(time.monotonic() - start) * 1000:.0f}"
                     f" ms")
            self.assertTrue(ok, self.nft("list", "ruleset"))


    def test_5_vmnetctl_sets_it(self):
        """`vmnetctl attach --egress-pps N` (its bandwidth options were once ignored)."""
        lab.run_command(os.path.join(lab.REPO, "build", "client", "vmnetctl"),
                        f"--server={self.lab.daemon.target}", "attach", self.vm1.vm_id,
                        "--interface", self.vm1.interface, "--ip", self.vm1.address,
                        "--egress-pps", "300", "--ingress-bps", str(LIMIT))
        self.assertEqual(self.pps_limit(), 300)
        got = self.call("GetVm", {"vm_id": self.vm1.vm_id})["vm"]["bandwidth"]
        self.assertEqual((got["egress_packets_per_second"], got["ingress_bits_per_second"]),
                         ("300", str(LIMIT)), got)


class PacketRateWithoutPortSecurityTest(BandwidthTestCase):
    """--port-security=false: no ruleset to hold a packet-rate limit; refused, naming it."""

    daemon_flags = ("--port-security=false",)

    def test_packet_rate_refused(self):
        vm1 = self.lab.vms[1]
        error = self.assertStatus(
            StatusCode.FAILED_PRECONDITION, "AttachVm",
            {"vm_id": vm1.vm_id, "interface": vm1.interface, "ip_addresses": [vm1.address],
             "bandwidth": {"egress_packets_per_second": 1000}}, "a packet-rate limit")
        self.assertIn("bandwidth.egress_packets_per_second", error.details)
        self.assertIn("--port-security=false", error.details)
        self.assertEqual(self.call("ListVms").get("vms", []), [])
        self.assertIn("packet_rate_limits=unavailable(port_security_off)",
                      self.lab.daemon.log())


if __name__ == "__main__":
    unittest.main()
