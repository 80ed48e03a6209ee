#!/usr/bin/python3
"""mTLS and authorization end to end: vmnetd serves the lab's LAN address with TLS, client
certificates required and verified, callers authorized by their certificate identity.

The clients run in computer X's namespace (the only place that reaches the host's LAN
address); certificates come from the test's own CA, made with openssl in a temp directory.

Run as root: /usr/bin/python3 tests/e2e/test_tls.py -v
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import skips  # noqa: E402  (tests/skips.py: no skips as root)
import lab  # noqa: E402

VMNETCTL = os.environ.get("VMNETCTL") or os.path.join(lab.REPO, "build", "client", "vmnetctl")
EXIT_OK, EXIT_USAGE, EXIT_SERVER_ERROR, EXIT_UNREACHABLE = 0, 2, 3, 4
PORT = 7443
ADDRESS = f"{lab.HOST_ADDRESS}:{PORT}"
CONTROL_PLANE = "spiffe://cloud.example/control-plane"
READER_DNS = "prom1.monitoring.example"

POLICY = {
    "name": "vmnet",
    "allow_rules": [
        {"name": "control-plane", "source": {"principals": [CONTROL_PLANE]}},
        {"name": "readers", "source": {"principals": ["*.monitoring.example"]},
         "request": {"paths": ["/vmnet.v1.VmNetwork/List*"]}},
    ],
}

# Runs inside X's namespace: one call, prints {"code": ..., "details": ...}.
CLIENT = textwrap.dedent("""
    import json, sys, grpc
    from google.protobuf import empty_pb2
    target, ca, cert, key, method = sys.argv[1:6]
    read = lambda p: open(p, "rb").read() if p != "-" else None
    creds = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
    channel = grpc.secure_channel(target, creds,
                                  options=[("grpc.ssl_target_name_override", "vmnetd.test")])
    call = channel.unary_unary(method, request_serializer=lambda m: b"",
                               response_deserializer=lambda b: b)
    try:
        call(None, timeout=5)
        print(json.dumps({"code": "OK", "details": ""}))
    except grpc.RpcError as e:
        print(json.dumps({"code": e.code().name, "details": e.details() or ""}))
""")


class Pki:
    """A CA and certificates made with openssl in `directory`."""

    def __init__(self, directory, name="ca"):
        self.dir = directory
        self.name = name
        self.ca_key = self.path(f"{name}.key")
        self.ca_cert = self.path(f"{name}.pem")
        self._openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                      "-nodes", "-keyout", self.ca_key, "-out", self.ca_cert, "-days", "2",
                      "-subj", f"/CN=vmnet test {name}")

    def path(self, file):
        return os.path.join(self.dir, file)

    def _openssl(self, *args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)

    def issue(self, name, san, serial):
        """A certificate for `san` (e.g. "DNS:x", "URI:spiffe://..", "IP:198.51.100.1")."""
        key, csr, cert = self.path(f"{name}.key"), self.path(f"{name}.csr"), self.path(f"{name}.pem")
        ext = self.path(f"{name}.ext")
        with open(ext, "w") as f:
            f.write(f"subjectAltName={san}\n")
        self._openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                      "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
        self._openssl("x509", "-req", "-in", csr, "-CA", self.ca_cert, "-CAkey", self.ca_key,
                      "-set_serial", str(serial), "-days", "2", "-out", cert, "-extfile", ext)
        return cert, key


class TlsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not shutil.which("openssl"):
            skips.skip("openssl is not installed (scripts/install-deps.sh installs it)")
        cls.tmp = tempfile.mkdtemp(prefix="vmnt-tls-")
        cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)
        cls.pki = Pki(cls.tmp)
        cls.other = Pki(cls.tmp, "other-ca")
        names = "DNS:vmnetd.test,IP:" + lab.HOST_ADDRESS
        cls.server_cert, cls.server_key = cls.pki.issue("server", names, 1001)
        cls.clients = {
            "control-plane": cls.pki.issue("control-plane", f"URI:{CONTROL_PLANE}", 2),
            "reader": cls.pki.issue("reader", f"DNS:{READER_DNS}", 3),
            "stranger": cls.pki.issue("stranger", "DNS:stranger.example", 4),
            "other-ca": cls.other.issue("other", f"URI:{CONTROL_PLANE}", 5),
        }
        cls.policy = os.path.join(cls.tmp, "policy.json")
        with open(cls.policy, "w") as f:
            json.dump(POLICY, f)
        cls.client_script = os.path.join(cls.tmp, "client.py")
        with open(cls.client_script, "w") as f:
            f.write(CLIENT)
        cls.lab = cls.enterClassContext(lab.Lab(vm_count=0))
        # The lab's daemon listens on its unix socket; this one listens on the LAN too.
        daemon = lab.Daemon(cls.lab.host, lab.VMNETD)
        daemon.workdir = tempfile.mkdtemp(prefix=f"{lab.NAMESPACE_PREFIX}{os.getpid()}-")
        daemon.extra_flags = [f"--listen={daemon.target},{ADDRESS}",
                              f"--tls-cert={cls.server_cert}", f"--tls-key={cls.server_key}",
                              f"--tls-client-ca={cls.pki.ca_cert}",
                              f"--authz-policy={cls.policy}", "--tls-refresh-s=1"]
        cls.lab.daemon = daemon
        daemon.start()

    def call(self, client, method="/vmnet.v1.VmNetwork/ListRoutes"):
        """The gRPC code a client from X's namespace gets for `method`."""
        cert, key = self.clients[client] if client else ("-", "-")
        out = self.lab.run(self.lab.x, "/usr/bin/python3", self.client_script, ADDRESS,
                           self.pki.ca_cert, cert, key, method, timeout=20)
        return json.loads(out.stdout)

    def test_authorized_control_plane_may_do_everything(self):
        self.assertEqual(self.call("control-plane")["code"], "OK")
        result = self.call("control-plane", "/vmnet.v1.VmNetwork/DetachVm")
        # An empty request is invalid, but it got past authorization:
        self.assertEqual(result["code"], "INVALID_ARGUMENT", result)

    def test_reader_may_list_but_not_mutate(self):
        self.assertEqual(self.call("reader")["code"], "OK")
        result = self.call("reader", "/vmnet.v1.VmNetwork/AttachVm")
        self.assertEqual(result["code"], "PERMISSION_DENIED", result)
        self.assertIn(READER_DNS, result["details"])

    def test_unauthorized_identity_is_denied(self):
        result = self.call("stranger")
        self.assertEqual(result["code"], "PERMISSION_DENIED", result)

    def test_client_without_certificate_is_refused(self):
        self.assertEqual(self.call(None)["code"], "UNAVAILABLE",
                         "a client without a certificate must not get through the handshake")

    def test_certificate_from_another_ca_is_refused(self):
        self.assertEqual(self.call("other-ca")["code"], "UNAVAILABLE")

    def test_rotated_server_certificate_is_used_by_new_connections(self):
        def served_serial():
            out = self.lab.run(self.lab.x, "sh", "-c",
                               f"openssl s_client -connect {ADDRESS} -servername vmnetd.test "
                               f"-cert {self.clients['control-plane'][0]} "
                               f"-key {self.clients['control-plane'][1]} </dev/null 2>/dev/null"
                               " | openssl x509 -noout -serial", check=False)
            return out.stdout.strip()
        self.assertEqual(served_serial(), "serial=03E9")  # 1001
        cert, key = self.pki.issue("server2", "DNS:vmnetd.test,IP:" + lab.HOST_ADDRESS, 1002)
        # Replace key and certificate as a rotation tool does: new files moved in place.
        for src, dst in ((key, self.server_key), (cert, self.server_cert)):
            shutil.copy(src, dst + ".new")
            os.rename(dst + ".new", dst)
        rotated = lab.wait_until(lambda: served_serial() == "serial=03EA", timeout=15)
        self.assertTrue(rotated, f"still serving {served_serial()} after rotation")
        self.assertEqual(self.call("control-plane")["code"], "OK")

    def test_local_socket_stays_plaintext_and_trusted(self):
        out = subprocess.run([VMNETCTL, f"--server={self.lab.daemon.target}", "routes"],
                             capture_output=True, text=True, timeout=20)
        self.assertEqual(out.returncode, 0, out.stderr)

    # vmnetctl, the real binary, from X's namespace against the host's mTLS listener.

    def require_vmnetctl(self):
        if not os.access(VMNETCTL, os.X_OK):
            skips.skip(f"vmnetctl not built at {VMNETCTL}")

    def ctl(self, *args, client="control-plane", ca=True):
        """vmnetctl run in X's namespace with `client`'s certificate (None: without one)."""
        self.require_vmnetctl()
        flags = [f"--server={ADDRESS}", "--timeout=10"]
        if ca:
            flags.append(f"--ca={self.pki.ca_cert}")
        if client:
            cert, key = self.clients[client]
            flags += [f"--cert={cert}", f"--key={key}"]
        out = self.lab.run(self.lab.x, VMNETCTL, *flags, *args, check=False, timeout=30)
        return out.returncode, out.stdout, out.stderr

    def test_vmnetctl_with_a_client_certificate_attaches_lists_and_gets(self):
        # An interface that does not exist: the VM stays pending and touches nothing.
        code, out, err = self.ctl("attach", "vm-tls", "--interface", "vme99",
                                  "--ip", "198.51.100.250")
        self.addCleanup(self.ctl, "detach", "vm-tls", "--allow-missing")
        self.assertEqual(code, EXIT_OK, err)
        self.assertIn("vm-tls pending", out)
        code, out, err = self.ctl("list")
        self.assertEqual(code, EXIT_OK, err)
        rows = [line.split() for line in out.splitlines()]
        self.assertEqual(rows[0][:2], ["VM", "STATE"])
        self.assertIn(["vm-tls", "pending", "vme99", "198.51.100.250"], [r[:4] for r in rows])
        code, out, err = self.ctl("get", "vm-tls")
        self.assertEqual(code, EXIT_OK, err)
        self.assertIn("state:       pending", out)
        self.assertIn("addresses:   198.51.100.250", out)
        # The reader may list, but not mutate.
        code, out, err = self.ctl("--output=json", "list", client="reader")
        self.assertEqual(code, EXIT_OK, err)
        self.assertIn("vm-tls", [json.loads(line)["vm_id"] for line in out.splitlines()])

    def test_vmnetctl_without_a_client_certificate_cannot_reach(self):
        code, out, err = self.ctl("list", client=None)
        self.assertEqual(code, EXIT_UNREACHABLE, out + err)
        self.assertIn("cannot reach the server", err)
        self.assertIn("TLS without a client certificate", err, "the likely reason is printed")
        self.assertNotIn("VM", out, "nothing was listed")
        # Nor with no TLS flags at all: a non-loopback host:port speaks TLS, and the system's
        # CAs do not know the test's CA.
        code, out, err = self.ctl("list", client=None, ca=False)
        self.assertEqual(code, EXIT_UNREACHABLE, out + err)

    def test_vmnetctl_with_a_certificate_of_another_ca_cannot_reach(self):
        code, out, err = self.ctl("routes", client="other-ca")
        self.assertEqual(code, EXIT_UNREACHABLE, out + err)
        self.assertIn("cannot reach the server", err)
        self.assertIn("refused the handshake", err)

    def test_vmnetctl_plaintext_to_the_tls_listener_cannot_reach(self):
        out = self.lab.run(self.lab.x, VMNETCTL, f"--server={ADDRESS}", "--timeout=10",
                           "--plaintext", "list", check=False, timeout=30)
        self.assertEqual(out.returncode, EXIT_UNREACHABLE, out.stdout + out.stderr)

    def test_vmnetctl_identity_the_policy_denies(self):
        code, out, err = self.ctl("list", client="stranger")
        self.assertEqual(code, EXIT_SERVER_ERROR, out + err)
        self.assertIn("PERMISSION_DENIED", err)
        code, out, err = self.ctl("attach", "vm-denied", "--interface", "vme98",
                                  "--ip", "198.51.100.251", client="reader")
        self.assertEqual(code, EXIT_SERVER_ERROR, out + err)
        self.assertIn("PERMISSION_DENIED", err)
        self.assertIn(READER_DNS, err)
        self.assertEqual(self.ctl("get", "vm-denied")[0], EXIT_SERVER_ERROR, "never attached")

    def test_vmnetctl_tls_usage_errors(self):
        self.require_vmnetctl()
        cert, key = self.clients["control-plane"]
        missing = os.path.join(self.tmp, "no-such.pem")
        cases = [
            ([f"--cert={cert}"], "--cert needs --key"),
            ([f"--key={key}"], "--key needs --cert"),
            ([f"--ca={missing}"], f"--ca: cannot read {missing}: No such file or directory"),
            ([f"--cert={cert}", f"--key={missing}"], f"--key: cannot read {missing}"),
            ([f"--ca={self.policy}"], f"--ca: {self.policy} is not a PEM file"),
            ([f"--ca={self.pki.ca_cert}", "--plaintext"], "--plaintext contradicts"),
        ]
        for flags, message in cases:
            with self.subTest(flags=flags):
                out = subprocess.run([VMNETCTL, f"--server={ADDRESS}", *flags, "list"],
                                     capture_output=True, text=True, timeout=20)
                self.assertEqual(out.returncode, EXIT_USAGE, out.stderr)
                self.assertIn(message, out.stderr)
        out = subprocess.run([VMNETCTL, f"--server={self.lab.daemon.target}",
                              f"--ca={self.pki.ca_cert}", "list"],
                             capture_output=True, text=True, timeout=20)
        self.assertEqual(out.returncode, EXIT_USAGE, out.stderr)
        self.assertIn("unix:// sockets are plaintext", out.stderr)


if __name__ == "__main__":
    skips.main()
