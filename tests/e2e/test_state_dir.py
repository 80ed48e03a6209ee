#!/usr/bin/python3
"""End-to-end proof of issue 13, item 7: the state directory removed under a running agent.

    Computer X ── LAN ── eth0 (uplink) [ HOST ] vme1a ══ eth0 [ VM 1 ]  198.51.100.201/32
                                                 vme2a ══ eth0 [ VM 2 ]  198.51.100.202/32

vmnetd A runs on --state-dir D (a temp directory under /tmp) and acknowledges VM 1. Then
`rm -rf D && mkdir D`, as an operator or a clean-up script might. From then on A must
acknowledge nothing: no change it accepts could survive a restart, because the directory it
locked and writes to is gone. So:

  - AttachVm and DetachVm to A are refused FAILED_PRECONDITION, the message naming D and saying
    it was removed; A logs event=state_dir_lost at error level; nothing is written into the new D;
  - a second vmnetd B starts on the new D (its lock is free: A's lock was on the removed
    directory) and is the only one that acknowledges: VM 2 attached through B;
  - restarts lose nothing acknowledged after the removal: A stopped, B killed with SIGKILL,
    A started again on D knows exactly what B acknowledged, and so does B after a restart.

(VM 1, acknowledged by A before the removal, went with the directory the operator removed: that
is the operator's doing, and A's refusals say so.)

Needs root and the vmnetd binary (<repo>/build/server/vmnetd, or set VMNETD); skips without
root, fails as root when it cannot run (tests/skips.py):

    /usr/bin/python3 tests/e2e/test_state_dir.py [-v]
"""

import os
import shutil
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import skips  # noqa: E402  (tests/skips.py: no skips as root)
import lab  # noqa: E402  (first: it explains a missing grpc module)
import grpcurl  # noqa: E402
import test_host_routed as host_routed  # noqa: E402  (LabTestCase)
from grpc import StatusCode  # noqa: E402

SERVICE = host_routed.SERVICE
LOG_DEADLINE = 5  # seconds for a log line that must come


class DaemonOnStateDir(lab.Daemon):
    """lab.Daemon (its own socket, log and temp directory) on a given --state-dir."""

    def __init__(self, ns, binary, state_dir, extra_flags=()):
        super().__init__(ns, binary, extra_flags)
        self.state_dir = state_dir

    @property
    def command(self):
        return [f"--state_dir={self.state_dir}" if arg.startswith("--state_dir=") else arg
                for arg in super().command]


class StateDirRemovedTest(host_routed.LabTestCase):
    """See the module docstring."""

    def call_on(self, client, method, request):
        return client.call(f"{SERVICE}/{method}", request)

    def assertRefused(self, client, method, request, what):
        """`method` answered FAILED_PRECONDITION naming the state directory and its removal."""
        with self.assertRaises(grpcurl.RpcError,
                               msg=f"{what}: {method} {request} was acknowledged although the "
                                   f"state directory {self.state_dir} had been removed") as caught:
            self.call_on(client, method, request)
        error = caught.exception
        self.assertEqual(error.code, StatusCode.FAILED_PRECONDITION, f"{what}: {error}")
        self.assertIn(self.state_dir, error.details, f"{what}: the message does not name it")
        self.assertIn("was removed", error.details, f"{what}: the message does not say what "
                                                    f"happened")
        return error

    def vm_ids(self, client):
        return sorted(vm["vm_id"] for vm in
                      self.call_on(client, "ListVms", {}).get("vms", []))

    def test_removed_state_dir_refuses_and_loses_nothing_acknowledged(self):
        vm1, vm2 = self.lab.vms[1], self.lab.vms[2]
        a = self.lab.daemon
        self.state_dir = os.path.join(a.workdir, "state")
        acknowledged = set()  # what was acknowledged after the removal, by anyone

        self.attach(vm1)
        self.assertTrue(os.path.exists(os.path.join(self.state_dir, "state.bin")))

        # The operator's mistake.
        shutil.rmtree(self.state_dir)
        os.mkdir(self.state_dir, 0o700)

        # A refuses, says why, and writes nothing into the new directory.
        request2 = {"vm_id": vm2.vm_id, "interface": vm2.interface, "ip_addresses": [vm2.address]}
        try:
            self.call_on(self.client, "AttachVm", request2)
            acknowledged.add(vm2.vm_id)
        except grpcurl.RpcError:
            pass
        self.assertNotIn(vm2.vm_id, acknowledged,
                         f"vmnetd acknowledged AttachVm {vm2.vm_id} after its state directory "
                         f"{self.state_dir} was removed and made again")
        error = self.assertRefused(self.client, "AttachVm", request2, "AttachVm after rm -rf")
        print(f"\n  AttachVm answered: {error}", file=sys.stderr)
        self.assertRefused(self.client, "DetachVm", {"vm_id": vm1.vm_id}, "DetachVm after rm -rf")
        self.assertStatus(StatusCode.NOT_FOUND, "GetVm", {"vm_id": vm2.vm_id},
                          "the refused AttachVm changed the agent")
        self.assertEqual(os.listdir(self.state_dir), [],
                         "vmnetd wrote into the new directory at its --state-dir")
        logged = lab.wait_until(
            lambda: "level=error event=state_dir_lost" in a.log(this_start_only=True),
            LOG_DEADLINE)
        self.assertTrue(logged, "no `level=error event=state_dir_lost` line in vmnetd's log")

        # A second agent starts on the new directory and is the only one that acknowledges.
        b = DaemonOnStateDir(self.lab.host, a.binary, self.state_dir)
        self.addCleanup(b.close)
        b.start()
        with grpcurl.Client(b.target) as client_b:
            self.assertEqual(self.vm_ids(client_b), [], "B did not start on the new, empty "
                                                        "directory")
            self.call_on(client_b, "AttachVm", request2)
            acknowledged.add(vm2.vm_id)
            self.assertRefused(self.client, "AttachVm",
                               {"vm_id": "vm-x", "interface": "vmefffa",
                                "ip_addresses": ["198.18.0.1"]},
                               "AttachVm to A while B runs on the new directory")

        # Restarts lose nothing acknowledged: A stopped, B killed, A started again on the
        # directory, then B alone.
        self.assertIsNotNone(a.stop())
        self.assertEqual(b.kill(), -9)
        a.start()
        with grpcurl.Client(a.target) as client_a:
            self.assertEqual(self.vm_ids(client_a), sorted(acknowledged),
                             "A restarted on the state directory does not know exactly the VMs "
                             "acknowledged since the directory was made again")
        a.stop()
        b.start()
        with grpcurl.Client(b.target) as client_b:
            self.assertEqual(self.vm_ids(client_b), sorted(acknowledged),
                             "B restarted does not know exactly the VMs acknowledged since the "
                             "directory was made again")


if __name__ == "__main__":
    skips.main()
