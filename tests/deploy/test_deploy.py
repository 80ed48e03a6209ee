#!/usr/bin/python3
"""Checks of the deployment files under deploy/ and the Dockerfile, without deploying anything.

    deploy/prometheus   promtool check config, check rules, test rules (alerts_test.yml)
    deploy/grafana      the dashboard parses, and its queries use only vmnetd's metric names
    deploy/kubernetes   the DaemonSet: host network, NET_ADMIN and NET_RAW only, gRPC probes on
                        the numeric health port, node-critical priority, every taint tolerated
    deploy/systemd      the unit: Type=notify, the two capabilities, systemd-analyze verify
    Dockerfile          multi-stage, non-root user, file capabilities, vmnetd entrypoint, the
                        build packages of scripts/install-deps.sh (test_dockerfile_build.py
                        builds its build stage)
    vmnetd --help       names its sources relative to the tree, no path of the build machine

Fast (a second or two) and starts nothing. Tests that need a tool say which package brings it:
promtool (Debian `prometheus`), PyYAML (`python3-yaml`), systemd-analyze (`systemd`); all are in
scripts/install-deps.sh. Without root they skip; as root (as CI runs) they fail (tests/skips.py).
Flags used by the unit's example and the DaemonSet are checked against `vmnetd --helpfull` when
the binary is built (<repo>/build/server/vmnetd, or set VMNETD).

    /usr/bin/python3 tests/deploy/test_deploy.py -v
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import skips  # noqa: E402  (tests/skips.py: no skips as root)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(REPO, "deploy")
PROMETHEUS_DIR = os.path.join(DEPLOY, "prometheus")
VMNETD = os.environ.get("VMNETD") or os.path.join(REPO, "build", "server", "vmnetd")
TOOL_TIMEOUT = 20

# Every metric vmnetd exports (README "Metrics"). Dashboards and alerts may use nothing else.
COUNTERS = {
    "vmnet_vm_receive_bytes_total", "vmnet_vm_transmit_bytes_total",
    "vmnet_vm_receive_packets_total", "vmnet_vm_transmit_packets_total",
    "vmnet_vm_receive_errors_total", "vmnet_vm_transmit_errors_total",
    "vmnet_vm_receive_dropped_total", "vmnet_vm_transmit_dropped_total",
    "vmnet_reconcile_passes_total", "vmnet_kernel_writes_total", "vmnet_drift_repairs_total",
    "vmnet_netlink_overflows_total", "vmnet_full_resyncs_total", "vmnet_grpc_requests_total",
    "vmnet_vm_rate_limited_dropped_packets_total", "vmnet_vm_rate_limited_overlimits_total",
}
GAUGES = {"vmnet_vm_info", "vmnet_vm_state", "vmnet_vms", "vmnet_watchers", "vmnet_build_info"}
HISTOGRAMS = {"vmnet_reconcile_duration_seconds"}
VMNET_METRICS = (COUNTERS | GAUGES
                 | {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")})

PROMQL_FUNCTIONS = {
    "sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile", "count_values", "group",
    "stddev", "stdvar", "rate", "irate", "increase", "delta", "idelta", "deriv", "changes",
    "resets", "histogram_quantile", "abs", "ceil", "floor", "round", "clamp", "clamp_min",
    "clamp_max", "absent", "absent_over_time", "avg_over_time", "max_over_time",
    "min_over_time", "sum_over_time", "count_over_time", "last_over_time", "label_replace",
    "label_join", "sort", "sort_desc", "time", "timestamp", "vector", "scalar",
}
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset"}


def metric_names(expr):
    """The metric names a PromQL expression (or a Grafana label_values() query) selects.

    Raises ValueError for an identifier that is neither a known function nor a metric name.
    """
    e = expr
    m = re.fullmatch(r"\s*label_values\((.*),\s*[a-zA-Z_]\w*\s*\)\s*", e, re.S)
    if m:
        e = m.group(1)
    e = re.sub(r"\{[^{}]*\}", " ", e)                  # label matchers, with their strings
    e = re.sub(r'"(?:[^"\\]|\\.)*"', " ", e)            # other string literals
    e = re.sub(r"\[[^\[\]]*\]", " ", e)                # range and subquery selectors
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", e)
    e = re.sub(r"\$\{[^}]*\}|\$\w+", " ", e)           # Grafana variables
    e = re.sub(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b", " ", e)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        word = m.group(0)
        followed_by_paren = e[m.end():].lstrip().startswith("(")
        if followed_by_paren:
            if word not in PROMQL_FUNCTIONS:
                raise ValueError(f"unknown function {word!r} in {expr!r}")
        elif word not in PROMQL_KEYWORDS:
            names.add(word)
    return names


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def run_tool(args, cwd=None):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT)


def require_yaml():
    try:
        import yaml
    except ImportError:
        skips.skip("PyYAML is missing: apt-get install python3-yaml "
                   "(scripts/install-deps.sh installs it), and run with /usr/bin/python3")
    return yaml


def vmnetd_flags():
    """Flag names vmnetd accepts (underscore spelling), or None when it is not built."""
    if not os.access(VMNETD, os.X_OK):
        return None
    out = run_tool([VMNETD, "--helpfull"])
    return set(re.findall(r"^\s+--([a-z0-9_]+) \(", out.stdout + out.stderr, re.M))


def flag_names(args):
    """['--metrics-listen=1:2', '--log-level=info'] -> {'metrics_listen', 'log_level'}."""
    return {a[2:].split("=", 1)[0].replace("-", "_") for a in args if a.startswith("--")}


class MetricNamesTest(unittest.TestCase):
    """The extractor the other tests rely on."""

    def test_extracts_metrics_not_labels_functions_or_variables(self):
        self.assertEqual(
            metric_names('histogram_quantile(0.99, sum by (le, instance) '
                         '(rate(vmnet_reconcile_duration_seconds_bucket{instance=~"$instance"}'
                         '[$__rate_interval])))'),
            {"vmnet_reconcile_duration_seconds_bucket"})
        self.assertEqual(metric_names('label_values(vmnet_vm_info{instance=~"$i"}, vm_id)'),
                         {"vmnet_vm_info"})
        self.assertEqual(metric_names("up{job=\"vmnetd\"} == 0 and on (instance) vmnet_vms"),
                         {"up", "vmnet_vms"})
        with self.assertRaises(ValueError):
            metric_names("made_up_function(vmnet_vms)")


@skips.require(shutil.which("promtool"),
                     "promtool is missing: apt-get install prometheus "
                     "(scripts/install-deps.sh installs it)")
class PrometheusTest(unittest.TestCase):
    def promtool(self, *args):
        out = run_tool(["promtool", *args], cwd=PROMETHEUS_DIR)
        self.assertEqual(out.returncode, 0,
                         f"promtool {' '.join(args)} failed:\n{out.stdout}{out.stderr}")
        return out.stdout + out.stderr

    def test_check_config(self):
        self.assertIn("SUCCESS", self.promtool("check", "config", "prometheus.yml"))

    def test_check_rules(self):
        self.assertIn("SUCCESS", self.promtool("check", "rules", "alerts.yml"))

    def test_rule_unit_tests(self):
        self.assertIn("SUCCESS", self.promtool("test", "rules", "alerts_test.yml"))


class AlertRulesTest(unittest.TestCase):
    def setUp(self):
        self.rules = require_yaml().safe_load(read(os.path.join(PROMETHEUS_DIR, "alerts.yml")))

    def all_rules(self):
        return [r for g in self.rules["groups"] for r in g["rules"]]

    def test_the_required_alerts_exist(self):
        alerts = {r["alert"]: r for r in self.all_rules()}
        for name in ("VmnetdDown", "VmnetVmFailed", "VmnetDriftRepairsRising",
                     "VmnetNetlinkOverflows"):
            self.assertIn(name, alerts)
        self.assertEqual(alerts["VmnetVmFailed"]["for"], "5m")
        self.assertIn('state="failed"', alerts["VmnetVmFailed"]["expr"])

    def test_alerts_use_only_vmnetd_metrics_and_up(self):
        for rule in self.all_rules():
            with self.subTest(alert=rule["alert"]):
                names = metric_names(rule["expr"])
                self.assertTrue(names, rule["expr"])
                self.assertLessEqual(names, VMNET_METRICS | {"up"})
                self.assertIn("severity", rule.get("labels", {}))
                self.assertIn("summary", rule.get("annotations", {}))

    def test_every_alert_has_a_unit_test(self):
        tests = require_yaml().safe_load(read(os.path.join(PROMETHEUS_DIR, "alerts_test.yml")))
        tested = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"]
                  if any(t.get("exp_alerts") or [])}
        self.assertEqual({r["alert"] for r in self.all_rules()}, tested)


class GrafanaDashboardTest(unittest.TestCase):
    def setUp(self):
        self.dashboard = json.loads(read(os.path.join(DEPLOY, "grafana", "vmnet-dashboard.json")))
        self.panels = [p for p in self.dashboard["panels"] if p.get("type") != "row"]
        self.exprs = [t["expr"] for p in self.panels for t in p.get("targets", [])]

    def variable(self, name):
        for v in self.dashboard["templating"]["list"]:
            if v["name"] == name:
                return v
        self.fail(f"no dashboard variable ${name}")

    def test_every_query_uses_only_vmnetd_metrics(self):
        queries = list(self.exprs)
        for v in self.dashboard["templating"]["list"]:
            if v["type"] == "query":
                q = v["query"]
                queries.append(q["query"] if isinstance(q, dict) else q)
        self.assertTrue(queries)
        for q in queries:
            with self.subTest(query=q):
                names = metric_names(q)
                self.assertTrue(names, f"no metric in {q!r}")
                self.assertLessEqual(names, VMNET_METRICS)

    def test_per_vm_traffic_by_vm_id_with_a_vm_selector(self):
        vm = self.variable("vm")
        self.assertTrue(vm["multi"] and vm["includeAll"])
        self.assertIn("vm_id", vm["query"]["query"])
        for metric in ("vmnet_vm_receive_bytes_total", "vmnet_vm_transmit_bytes_total",
                       "vmnet_vm_receive_packets_total", "vmnet_vm_transmit_packets_total"):
            with self.subTest(metric=metric):
                uses = [e for e in self.exprs if metric in e]
                self.assertTrue(uses, f"no panel shows {metric}")
                for e in uses:
                    self.assertRegex(e, r"rate\(" + metric)
                    self.assertRegex(e, r"by \(vm_id\)")
                    self.assertIn('vm_id=~"$vm"', e)

    def test_agent_health_panels(self):
        joined = "\n".join(self.exprs)
        for needle in ("vmnet_vms", "vmnet_kernel_writes_total", "vmnet_drift_repairs_total",
                       "vmnet_netlink_overflows_total", "by (code) (rate(vmnet_grpc_requests_total",
                       "histogram_quantile(0.99", "vmnet_reconcile_duration_seconds_bucket"):
            self.assertIn(needle, joined)

    def test_panels_are_well_formed(self):
        ids = [p["id"] for p in self.dashboard["panels"]]
        self.assertEqual(len(ids), len(set(ids)), "duplicate panel ids")
        self.assertTrue(self.dashboard.get("uid"))
        self.variable("datasource")
        for p in self.panels:
            with self.subTest(panel=p["title"]):
                self.assertEqual(p["datasource"]["uid"], "${datasource}")
                self.assertEqual(set(p["gridPos"]), {"h", "w", "x", "y"})
                self.assertTrue(p["targets"])


class KubernetesDaemonSetTest(unittest.TestCase):
    def setUp(self):
        yaml = require_yaml()
        docs = [d for d in yaml.safe_load_all(read(os.path.join(DEPLOY, "kubernetes",
                                                                "daemonset.yaml"))) if d]
        self.kinds = {d["kind"]: d for d in docs}
        self.ds = self.kinds["DaemonSet"]
        self.pod = self.ds["spec"]["template"]["spec"]
        self.agent = next(c for c in self.pod["containers"] if c["name"] == "vmnetd")

    def arg(self, name):
        for a in self.agent.get("args", []):
            if a.startswith(f"--{name}="):
                return a.split("=", 1)[1]
        self.fail(f"the vmnetd container has no --{name}")

    def test_namespace_and_service_account(self):
        namespace = self.kinds["Namespace"]["metadata"]["name"]
        self.assertEqual(self.kinds["ServiceAccount"]["metadata"]["namespace"], namespace)
        self.assertEqual(self.ds["metadata"]["namespace"], namespace)
        self.assertEqual(self.pod["serviceAccountName"],
                         self.kinds["ServiceAccount"]["metadata"]["name"])

    def test_host_network_priority_and_tolerations(self):
        self.assertIs(self.pod["hostNetwork"], True)
        self.assertEqual(self.pod["priorityClassName"], "system-node-critical")
        self.assertIn({"operator": "Exists"}, self.pod["tolerations"])
        strategy = self.ds["spec"]["updateStrategy"]
        self.assertEqual(strategy["type"], "RollingUpdate")
        self.assertEqual(strategy["rollingUpdate"]["maxUnavailable"], 1)

    def test_only_net_admin_and_net_raw_as_non_root(self):
        sc = self.agent["securityContext"]
        self.assertEqual(sorted(sc["capabilities"]["add"]), ["NET_ADMIN", "NET_RAW"])
        self.assertEqual(sc["capabilities"]["drop"], ["ALL"])
        self.assertIs(sc["runAsNonRoot"], True)
        self.assertNotEqual(sc["runAsUser"], 0)
        self.assertFalse(sc.get("privileged", False))
        # File capabilities are ignored under no_new_privs.
        self.assertIsNot(sc.get("allowPrivilegeEscalation"), False)

    def test_grpc_probes_on_the_numeric_health_port(self):
        health_port = int(self.arg("health-listen").rsplit(":", 1)[1])
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            with self.subTest(probe=probe):
                port = self.agent[probe]["grpc"]["port"]
                self.assertIsInstance(port, int)
                self.assertEqual(port, health_port)

    def test_metrics_port_is_announced(self):
        metrics_port = self.arg("metrics-listen").rsplit(":", 1)[1]
        annotations = self.ds["spec"]["template"]["metadata"]["annotations"]
        self.assertEqual(annotations["prometheus.io/scrape"], "true")
        self.assertEqual(annotations["prometheus.io/port"], metrics_port)
        self.assertIn(int(metrics_port), [p["containerPort"] for p in self.agent["ports"]])

    def test_state_and_socket_on_host_paths(self):
        host_paths = {v["name"]: v["hostPath"]["path"] for v in self.pod["volumes"]
                      if "hostPath" in v}
        mounts = {m["mountPath"]: m["name"] for m in self.agent["volumeMounts"]}
        for path in ("/var/lib/vmnetd", "/run/vmnetd"):
            with self.subTest(path=path):
                self.assertEqual(host_paths[mounts[path]], path)
        self.assertEqual(self.arg("state-dir"), "/var/lib/vmnetd")
        self.assertEqual(self.arg("listen"), "unix:///run/vmnetd/vmnetd.sock")

    def test_resources(self):
        for container in self.pod["containers"] + self.pod.get("initContainers", []):
            with self.subTest(container=container["name"]):
                self.assertTrue(container["resources"]["requests"])
                self.assertIn("memory", container["resources"]["limits"])

    def test_flags_exist(self):
        flags = vmnetd_flags()
        if flags is None:
            skips.skip(f"{VMNETD} is not built")
        self.assertLessEqual(flag_names(self.agent["args"]), flags)


def unit_settings(text):
    """The key=value settings of a systemd unit, a list per key (keys may repeat)."""
    settings = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


class SystemdUnitTest(unittest.TestCase):
    UNIT = os.path.join(DEPLOY, "systemd", "vmnetd.service")

    def setUp(self):
        self.text = read(self.UNIT)
        self.s = unit_settings(self.text)

    def one(self, key):
        self.assertIn(key, self.s, f"vmnetd.service has no {key}=")
        return self.s[key][-1]

    def test_notify_and_restart(self):
        self.assertEqual(self.one("Type"), "notify")
        self.assertEqual(self.one("NotifyAccess"), "main")
        self.assertEqual(self.one("Restart"), "on-failure")
        self.assertEqual(self.one("KillSignal"), "SIGTERM")
        self.assertIn("TimeoutStopSec", self.s)
        self.assertEqual(self.one("ExecStart"), "/usr/sbin/vmnetd $VMNETD_ARGS")
        self.assertIn("EnvironmentFile", self.s)

    def test_two_capabilities_as_a_dedicated_user(self):
        for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
            with self.subTest(key=key):
                self.assertEqual(sorted(self.one(key).split()), ["CAP_NET_ADMIN", "CAP_NET_RAW"])
        self.assertEqual(self.one("User"), "vmnetd")
        self.assertEqual(self.one("NoNewPrivileges"), "yes")
        sysusers = read(os.path.join(DEPLOY, "systemd", "vmnetd.sysusers"))
        self.assertRegex(sysusers, r"(?m)^u vmnetd ")

    def test_directories_and_hardening(self):
        self.assertEqual(self.one("RuntimeDirectory"), "vmnetd")
        self.assertEqual(self.one("StateDirectory"), "vmnetd")
        self.assertEqual(self.one("ProtectSystem"), "strict")
        self.assertEqual(self.one("ProtectHome"), "yes")
        self.assertEqual(self.one("PrivateTmp"), "yes")
        self.assertEqual(set(self.one("RestrictAddressFamilies").split()),
                         {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET"})
        self.assertNotIn("PrivateNetwork", self.s)

    def test_environment_file_example(self):
        env = unit_settings(read(os.path.join(DEPLOY, "systemd", "vmnetd.env")))
        self.assertIn("VMNETD_ARGS", env)
        args = env["VMNETD_ARGS"][-1].strip('"').split()
        self.assertTrue(args)
        flags = vmnetd_flags()
        if flags is None:
            skips.skip(f"{VMNETD} is not built")
        self.assertLessEqual(flag_names(args), flags)

    @skips.require(shutil.which("systemd-analyze"),
                   "systemd-analyze is missing: apt-get install systemd "
                   "(scripts/install-deps.sh installs it)")
    def test_systemd_analyze_verify(self):
        # verify insists that ExecStart's program exists: point it at one that does.
        program = VMNETD if os.access(VMNETD, os.X_OK) else shutil.which("true")
        with tempfile.TemporaryDirectory() as tmp:
            unit = os.path.join(tmp, "vmnetd.service")
            with open(unit, "w", encoding="utf-8") as f:
                f.write(self.text.replace("ExecStart=/usr/sbin/vmnetd",
                                          f"ExecStart={program}"))
            out = run_tool(["systemd-analyze", "verify", unit])
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertNotIn("vmnetd.service", out.stderr, out.stderr)


class DockerfileTest(unittest.TestCase):
    def setUp(self):
        self.text = read(os.path.join(REPO, "Dockerfile"))

    def test_multi_stage_non_root_with_file_capabilities(self):
        stages = re.findall(r"(?m)^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", self.text)
        self.assertEqual([name for _, name in stages], ["build", "runtime"])
        self.assertRegex(self.text, r"(?m)^ARG BASE_IMAGE=debian:bookworm$")
        self.assertIn("setcap cap_net_admin,cap_net_raw+ep /out/usr/sbin/vmnetd", self.text)
        runtime = self.text.split(" AS runtime", 1)[1]
        self.assertRegex(runtime, r"(?m)^USER vmnetd")
        self.assertRegex(runtime, r'(?m)^ENTRYPOINT \["/usr/sbin/vmnetd"\]$')
        self.assertNotRegex(runtime, r"\b(g\+\+|cmake|ninja-build|-dev)\b")

    def test_build_packages_are_install_deps_build_packages(self):
        """The build stage installs what scripts/install-deps.sh lists under "# build"."""
        script = read(os.path.join(REPO, "scripts", "install-deps.sh"))
        block = re.search(r"packages=\(\s*# build\n(.*?)\n\s*#", script, re.S)
        self.assertTrue(block, "install-deps.sh has no '# build' group")
        wanted = set(block.group(1).split())
        build = self.text.split(" AS build", 1)[1].split("\nFROM ", 1)[0]
        install = re.search(r"apt-get install -y --no-install-recommends\s*\\\n(.*?)\n \&\&",
                            build, re.S)
        self.assertTrue(install, "the build stage has no apt-get install")
        packages = set(install.group(1).replace("\\", " ").split())
        self.assertEqual(packages - {"libcap2-bin"}, wanted)

    def test_build_stage_builds_only_the_image_targets(self):
        self.assertRegex(self.text, r"-DVMNET_BUILD_TESTS=OFF")
        self.assertRegex(self.text, r"-DVMNET_BUILD_BENCH=OFF")
        self.assertRegex(self.text, r"--target vmnetd vmnetctl\b")

    def test_build_image_script_is_executable(self):
        script = os.path.join(REPO, "scripts", "build-image.sh")
        self.assertTrue(os.access(script, os.X_OK))
        self.assertEqual(run_tool(["bash", "-n", script]).returncode, 0)


class ReproducibleBuildTest(unittest.TestCase):
    """The binaries name their sources relative to the tree (-ffile-prefix-map), never by a path
    of the machine that built them."""

    def test_help_names_main_cc_relative_to_the_tree(self):
        if not os.access(VMNETD, os.X_OK):
            skips.skip(f"{VMNETD} is not built")
        out = run_tool([VMNETD, "--help"])
        text = out.stdout + out.stderr
        self.assertIn("Flags from server/vmnetd/main.cc:", text)
        self.assertNotIn(REPO, text)
        self.assertNotRegex(text, r"Flags from (/|\.\./)", "a flag's file is not tree-relative")

    def test_no_build_machine_path_in_the_binary(self):
        if not os.access(VMNETD, os.X_OK):
            skips.skip(f"{VMNETD} is not built")
        with open(VMNETD, "rb") as f:
            data = f.read()
        # The source tree that built it, wherever it was, and the build tree it lies in.
        sources = re.search(rb"(?:/[\w.+-]+)+/server/vmnetd/main\.cc", data)
        self.assertIsNone(sources, f"{VMNETD} names {sources and sources.group().decode()}")
        build_dir = os.path.dirname(os.path.dirname(os.path.realpath(VMNETD)))
        for path in {REPO, build_dir}:
            with self.subTest(path=path):
                self.assertFalse(path.encode() in data,
                                 f"{VMNETD} (debug info included) names {path}")


if __name__ == "__main__":
    skips.main()
