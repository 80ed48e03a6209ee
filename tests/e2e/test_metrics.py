#!/usr/bin/python3
"""Prometheus metrics end to end: vmnetd's /metrics in the namespace lab, checked against the
kernel's link statistics, a known transfer, and a real Prometheus server scraping it.

Run as root: /usr/bin/python3 tests/e2e/test_metrics.py -v
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import skips  # noqa: E402  (tests/skips.py: no skips as root)
import lab  # noqa: E402
from test_host_routed import LabTestCase  # noqa: E402

METRICS_ADDRESS = "127.0.0.1:9447"  # loopback of the lab's host namespace
PROMETHEUS_ADDRESS = "127.0.0.1:9090"

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text):
    """{(name, frozenset(labels.items())): value} from Prometheus text format."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        if m is None:
            raise AssertionError(f"not a sample line: {line!r}")
        labels = frozenset(LABEL.findall(m.group(2) or ""))
        samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def vm_series(samples, name, vm_id):
    """The value of `name` for `vm_id`, or None."""
    for (n, labels), value in samples.items():
        if n == name and ("vm_id", vm_id) in labels:
            return value
    return None


class MetricsTest(LabTestCase):
    vm_count = 1
    daemon_flags = (f"--metrics-listen={METRICS_ADDRESS}",)

    def setUp(self):
        vm = self.lab.vms[1]
        self.client.call("vmnet.v1.VmNetwork/AttachVm", {
            "vm_id": "vm-1", "interface": vm.interface, "ip_addresses": [vm.address]})
        self.vm = vm

    def scrape(self):
        out = self.lab.run(self.lab.host, "curl", "-sf", f"http://{METRICS_ADDRESS}/metrics")
        return parse_exposition(out.stdout)

    def host_link_stats(self):
        """The host-side link's 64-bit counters, as the kernel reports them."""
        link = self.lab.ip_json(self.lab.host, "-s", "link", "show", "dev", self.vm.interface)[0]
        return link["stats64"]

    def test_counters_are_the_kernels_with_direction_reversed(self):
        before = self.host_link_stats()
        samples = self.scrape()
        after = self.host_link_stats()
        # What the VM received is what its host-side link transmitted.
        pairs = [("vmnet_vm_receive_bytes_total", "tx", "bytes"),
                 ("vmnet_vm_transmit_bytes_total", "rx", "bytes"),
                 ("vmnet_vm_receive_packets_total", "tx", "packets"),
                 ("vmnet_vm_transmit_packets_total", "rx", "packets"),
                 ("vmnet_vm_receive_dropped_total", "tx", "dropped"),
                 ("vmnet_vm_transmit_dropped_total", "rx", "dropped")]
        for metric, direction, field in pairs:
            value = vm_series(samples, metric, "vm-1")
            self.assertIsNotNone(value, f"/metrics has no {metric} for vm-1")
            low, high = before[direction][field], after[direction][field]
            self.assertTrue(low <= value <= high,
                            f"{metric} is {value}; the kernel's {direction} {field} of "
                            f"{self.vm.interface} was {low} before the scrape, {high} after")

    def test_known_transfer_moves_the_vms_counters(self):
        start = self.scrape()
        count, size = 20, 1000
        self.lab.run(self.lab.x, "ping", "-q", "-c", str(count), "-i", "0.01", "-s", str(size),
                     "-W", "1", self.vm.address, timeout=30)
        end = self.scrape()
        received = (vm_series(end, "vmnet_vm_receive_bytes_total", "vm-1") -
                    vm_series(start, "vmnet_vm_receive_bytes_total", "vm-1"))
        sent = (vm_series(end, "vmnet_vm_transmit_bytes_total", "vm-1") -
                vm_series(start, "vmnet_vm_transmit_bytes_total", "vm-1"))
        self.assertGreaterEqual(received, count * size,
                                f"X sent {count} pings of {size} bytes to the VM, but its "
                                f"receive counter moved by {received}")
        self.assertGreaterEqual(sent, count * size, f"the VM's replies moved transmit by {sent}")

    def test_info_state_and_agent_metrics(self):
        samples = self.scrape()
        self.assertEqual(vm_series(samples, "vmnet_vm_info", "vm-1"), 1)
        state = {dict(labels)["state"]: v for (n, labels), v in samples.items()
                 if n == "vmnet_vm_state" and ("vm_id", "vm-1") in labels}
        self.assertEqual(state, {"pending": 0, "programmed": 1, "failed": 0})
        names = {n for n, _ in samples}
        for name in ("vmnet_vms", "vmnet_reconcile_passes_total",
                     "vmnet_reconcile_duration_seconds_bucket", "vmnet_kernel_writes_total",
                     "vmnet_drift_repairs_total", "vmnet_netlink_overflows_total",
                     "vmnet_full_resyncs_total", "vmnet_grpc_requests_total", "vmnet_watchers",
                     "vmnet_build_info"):
            self.assertIn(name, names)
        attaches = [v for (n, labels), v in samples.items()
                    if n == "vmnet_grpc_requests_total" and ("method", "AttachVm") in labels
                    and ("code", "OK") in labels]
        self.assertTrue(attaches and attaches[0] >= 1, "AttachVm calls are not counted")

    def test_detached_vm_series_disappear(self):
        self.assertIsNotNone(vm_series(self.scrape(), "vmnet_vm_info", "vm-1"),
                             "the attached VM has no series to begin with")
        self.client.call("vmnet.v1.VmNetwork/DetachVm", {"vm_id": "vm-1"})
        samples = self.scrape()
        leftovers = [n for (n, labels) in samples if ("vm_id", "vm-1") in labels]
        self.assertEqual(leftovers, [], "a detached VM's series are still exported")


@skips.require(shutil.which("prometheus"), "the Debian package prometheus is not installed "
               "(scripts/install-deps.sh installs it)")
class PrometheusScrapeTest(LabTestCase):
    """A real Prometheus server, inside the lab's host namespace, scrapes vmnetd."""

    vm_count = 1
    daemon_flags = (f"--metrics-listen={METRICS_ADDRESS}",)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        vm = cls.lab.vms[1]
        cls.client.call("vmnet.v1.VmNetwork/AttachVm", {
            "vm_id": "vm-1", "interface": vm.interface, "ip_addresses": [vm.address]})
        cls.workdir = tempfile.mkdtemp(prefix="vmnt-prometheus-")
        config = os.path.join(cls.workdir, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n"
                    "scrape_configs:\n  - job_name: vmnetd\n"
                    f"    static_configs:\n      - targets: ['{METRICS_ADDRESS}']\n")
        cls.log = open(os.path.join(cls.workdir, "prometheus.log"), "w")
        cls.prometheus = subprocess.Popen(
            ["ip", "netns", "exec", cls.lab.host, "prometheus", f"--config.file={config}",
             f"--storage.tsdb.path={cls.workdir}/data", f"--web.listen-address={PROMETHEUS_ADDRESS}"],
            stdout=cls.log, stderr=subprocess.STDOUT)

    @classmethod
    def tearDownClass(cls):
        cls.prometheus.terminate()
        try:
            cls.prometheus.wait(timeout=10)
        except subprocess.TimeoutExpired:
            cls.prometheus.kill()
            cls.prometheus.wait()
        cls.log.close()
        shutil.rmtree(cls.workdir, ignore_errors=True)
        super().tearDownClass()

    def query(self, expr):
        url = (f"http://{PROMETHEUS_ADDRESS}/api/v1/query?" +
               urllib.parse.urlencode({"query": expr}))
        out = self.lab.run(self.lab.host, "curl", "-s", url, check=False)
        if out.returncode != 0 or not out.stdout:
            return []
        return json.loads(out.stdout).get("data", {}).get("result", [])

    def test_prometheus_has_the_vms_series(self):
        expr = 'vmnet_vm_receive_bytes_total{vm_id="vm-1"}'
        found = lab.wait_until(lambda: self.query(expr), timeout=60, interval=0.5)
        self.assertTrue(found, f"Prometheus never returned {expr}")
        series = self.query(expr)[0]
        self.assertEqual(series["metric"]["interface"], self.lab.vms[1].interface)
        self.assertEqual(series["metric"]["job"], "vmnetd")
        up = self.query('up{job="vmnetd"}')
        self.assertEqual(up[0]["value"][1], "1", "Prometheus sees the agent down")


class SlowClientsTest(LabTestCase):
    """Idle and slow clients must not keep a scrape waiting (issue 13, item 6): 2 connections
    that send nothing and 300 that send a byte every 0.5 s, and every scrape taken while they
    hang on is answered within 1 s; when they are gone, the agent holds no more descriptors
    than before."""

    vm_count = 1
    daemon_flags = (f"--metrics-listen={METRICS_ADDRESS}",)
    HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow_clients.py")

    def open_fds(self):
        return len(os.listdir(f"/proc/{self.lab.daemon.process.pid}/fd"))

    def test_scrapes_answered_within_a_second_under_300_slow_clients(self):
        before = self.open_fds()
        out = self.lab.run(self.lab.host, sys.executable, self.HELPER, METRICS_ADDRESS,
                           "--idle=2", "--slow=300", "--interval=0.5", "--duration=4",
                           "--scrape-timeout=3", timeout=60)
        result = json.loads(out.stdout)
        self.assertEqual(result["connected"], 302, result)
        scrapes = result["scrapes"]
        latencies = [s["latency"] for s in scrapes if s["latency"] is not None]
        print(f"\n{len(scrapes)} scrapes under 300 slow + 2 idle clients, answered: "
              f"{len(latencies)}, slowest {max(latencies, default=float('nan')):.3f} s",
              file=sys.stderr)
        self.assertGreaterEqual(len(scrapes), 2, result)
        for s in scrapes:
            self.assertIsNotNone(s["latency"], f"a scrape was not answered within 3 s: {s}")
            self.assertLess(s["latency"], 1.0, f"a scrape took over 1 s: {s}")
            self.assertIn(" 200 ", s["status"] + " ", s)
            self.assertTrue(s["expected"], f"the scrape has no vmnet_ series: {s}")
        # The clients are gone: so are their descriptors.
        settled = lab.wait_until(lambda: self.open_fds() <= before + 2, timeout=5)
        self.assertTrue(settled, f"{self.open_fds()} descriptors open, {before} before the load")


if __name__ == "__main__":
    skips.main()
