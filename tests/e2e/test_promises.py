#!/usr/bin/python3
"""End-to-end tests of README promises that had none (issue #14): vmnetd in a namespace lab.

    Computer X ── LAN ── eth0 (uplink) [ HOST ] vme1a ══ eth0 [ VM 1 ] ...

Classes:
- MaxPendingRequestsTest: `--max-pending-requests=2`, the reconciler thread stalled (stopped
  by ptrace while it waits for work, as a slow pass would hold it): of a burst of 6
  concurrent AttachVm, exactly 4 are answered at once with RESOURCE_EXHAUSTED naming the
  flag, and nothing of them ever reaches the kernel or the desired state; the 2 queued are
  programmed once the thread runs again.
- MaxConcurrentStreamsTest: `--max-concurrent-streams=2`: on one connection two Watch
  streams run, a third call waits (a unary call with a deadline ends DEADLINE_EXCEEDED, a
  third Watch gets no headers) until one of them ends, and then runs; another connection
  is not affected.
- DadProbesCountedTest: `--dad`: an attach of a dual-stack VM sends 2 probes per address on
  the uplink (one at once, one halfway through --dad-timeout), counted on the wire in X, and
  `vmnet_dad_probes_sent_total` moves by exactly what went out.
- AnnounceSendErrorsTest: the uplink's queue drops every frame (a pfifo qdisc of limit 0,
  so sendto() fails with ENOBUFS): each announcement the kernel refused counts in
  `vmnet_announce_send_errors_total` and not in `vmnet_announcements_sent_total`, and the
  log names the link and the error. AnnounceOnDownUplinkTest: the uplink goes down between
  two announcements of an address (sendto() fails with ENETDOWN): the same.

Needs root and the vmnetd binary (<repo>/build/server/vmnetd, or set VMNETD); skips without
root, fails as root when it cannot run (tests/skips.py):

    /usr/bin/python3 tests/e2e/test_promises.py [-v] [TestClass.test_method]
"""

import concurrent.futures
import contextlib
import ctypes
import os
import platform
import re
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import skips  # noqa: E402  (tests/skips.py: no skips as root)
import lab  # noqa: E402  (first: it explains a missing grpc module)
import grpcurl  # noqa: E402
from grpc import StatusCode  # noqa: E402
from test_host_routed import (SERVICE, LabTestCase, PROGRAM_DEADLINE, kernel_route,  # noqa: E402
                              kernel_proxy_entry, has_gateway_address)
from test_dual_stack import DualStackTestCase  # noqa: E402
from test_port_security import Sniffer  # noqa: E402  (a sniffer of frames in a namespace)

METRICS_FLAG = "--metrics-listen=127.0.0.1:9447"  # loopback of the lab's host namespace
RECONCILER_THREAD = "vmnet-reconcile"  # Reconciler::Run names its thread so

# How long a call that must wait is given before the test concludes that it waits (a
# correct vmnetd never lets it through; a broken one answers within milliseconds).
QUEUED_WAIT = 1.5


# -- stalling one thread of vmnetd ------------------------------------------------------------

_PTRACE_CONT = 7
_PTRACE_DETACH = 17
_PTRACE_SEIZE = 0x4206
_PTRACE_INTERRUPT = 0x4207
_WALL = 0x40000000
# poll(2) as /proc/PID/task/TID/syscall numbers it: WaitForWork() is the reconciler thread's
# only poll, and there it holds no lock.
_POLL_SYSCALLS = {"x86_64": {7, 271}, "aarch64": {73}}.get(platform.machine(), set())

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def _ptrace(request, tid):
    if _libc.ptrace(request, tid, None, None) < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"ptrace({request:#x}, {tid}): {os.strerror(e)}")


def thread_id(pid, name):
    """The id of the thread of process `pid` named `name` (its comm), or None."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().strip() == name:
                    return int(tid)
    return None


def _current_syscall(pid, tid):
    """The number of the system call thread `tid` is in (stopped), or None (in user code)."""
    with open(f"/proc/{pid}/task/{tid}/syscall") as f:
        first = f.read().split()[0]
    return int(first) if first.lstrip("-").isdigit() and int(first) >= 0 else None


@contextlib.contextmanager
def thread_stopped_in_poll(pid, name, timeout=10):
    """Stops only thread `name` of process `pid` (ptrace: PTRACE_SEIZE, PTRACE_INTERRUPT) at a
    moment it waits in poll(2), for the `with` block; the other threads run on. Raises
    lab.LabError when the thread is not found or never caught in poll. The thread runs again
    after the block, and also when this process dies (the kernel detaches a tracer's
    tracees)."""
    if not _POLL_SYSCALLS:
        skips.skip(f"no poll(2) numbers known for {platform.machine()}")
    tid = lab.wait_until(lambda: thread_id(pid, name), 10)
    if tid is None:
        raise lab.LabError(f"vmnetd (pid {pid}) has no thread named {name}")
    _ptrace(_PTRACE_SEIZE, tid)
    try:
        deadline = time.monotonic() + timeout
        while True:
            _ptrace(_PTRACE_INTERRUPT, tid)
            os.waitpid(tid, _WALL)
            if _current_syscall(pid, tid) in _POLL_SYSCALLS:
                break
            if time.monotonic() > deadline:
                raise lab.LabError(f"thread {name} ({tid}) was not caught waiting in poll(2) "
                                   f"within {timeout} s")
            _ptrace(_PTRACE_CONT, tid)  # busy: let it get back to its poll
            time.sleep(0.01)
        yield tid
    finally:
        _ptrace(_PTRACE_DETACH, tid)  # stopped at this point: detaching lets it run


def grpc_requests(samples, method, code):
    """vmnet_grpc_requests_total{method=METHOD,code=CODE}, 0 when absent."""
    return sum(value for series, value in samples.items()
               if series.startswith("vmnet_grpc_requests_total{")
               and f'method="{method}"' in series and f'code="{code}"' in series)


# -- --max-pending-requests -------------------------------------------------------------------

class MaxPendingRequestsTest(LabTestCase):
    """--max-pending-requests=2 and a burst of 6 AttachVm while the reconciler is stalled."""

    vm_count = 6
    limit = 2
    daemon_flags = (f"--max-pending-requests={limit}", METRICS_FLAG)

    def attach_outcome(self, vm):
        try:
            return self.attach(vm)
        except grpcurl.RpcError as e:
            return e

    def test_burst_beyond_the_limit_is_refused_and_changes_nothing(self):
        vms = list(self.lab.vms.values())
        self.call("ListVms")  # the client's descriptors are loaded before the burst
        before = self.lab.snapshot()
        refusal = (f"vmnetd has {self.limit} requests queued, the limit "
                   f"(--max-pending-requests); retry with backoff")
        with concurrent.futures.ThreadPoolExecutor(len(vms)) as pool:
            with thread_stopped_in_poll(self.lab.daemon.process.pid, RECONCILER_THREAD):
                futures = {pool.submit(self.attach_outcome, vm): vm for vm in vms}
                # Nothing can be taken from the queue: those beyond the limit are answered
                # at once, the others wait for the reconciler.
                expected_refusals = len(vms) - self.limit
                lab.wait_until(lambda: sum(f.done() for f in futures) >= expected_refusals,
                               lab.time_bound(5), 0.02)
                answered = [f for f in futures if f.done()]
                self.assertEqual(len(answered), expected_refusals,
                                 f"with the reconciler stalled and --max-pending-requests="
                                 f"{self.limit}, {len(answered)} of {len(vms)} concurrent "
                                 f"AttachVm were answered: {[f.result() for f in answered]}")
                for f in answered:
                    outcome = f.result()
                    self.assertIsInstance(outcome, grpcurl.RpcError,
                                          f"{futures[f].vm_id} answered {outcome} while the "
                                          f"reconciler was stalled")
                    self.assertEqual(outcome.code, StatusCode.RESOURCE_EXHAUSTED, str(outcome))
                    self.assertEqual(outcome.details, refusal)
                self.assertEqual(self.lab.snapshot(), before,
                                 "the kernel changed while the reconciler was stalled")
            outcomes = {futures[f].vm_id: f.result(timeout=lab.time_bound(PROGRAM_DEADLINE))
                        for f in futures}
        refused = [vm for vm in vms if isinstance(outcomes[vm.vm_id], grpcurl.RpcError)]
        accepted = [vm for vm in vms if vm not in refused]
        self.assertEqual(len(refused), expected_refusals, f"outcomes: {outcomes}")
        for vm in accepted:
            self.assertEqual(outcomes[vm.vm_id]["vm"]["state"], "VM_STATE_PROGRAMMED",
                             f"the queued AttachVm of {vm.vm_id}: {outcomes[vm.vm_id]}")
            self.assertEqual(self.missing_objects(vm), [],
                             f"{vm.vm_id}, accepted, is not programmed in the kernel")
        # The queued ones were taken and applied in one pass; a refused one that had been
        # queued anyway would be in the kernel now.
        for vm in refused:
            self.assertIsNone(kernel_route(self.lab, vm.address),
                              f"{vm.vm_id} was refused, yet the kernel has its route")
            self.assertIsNone(kernel_proxy_entry(self.lab, vm.address),
                              f"{vm.vm_id} was refused, yet the kernel has its proxy entry")
            self.assertFalse(has_gateway_address(self.lab, vm.interface),
                             f"{vm.vm_id} was refused, yet its link has the gateway address")
            self.assertNotIn("UP", self.lab.link(vm.interface)["flags"],
                             f"{vm.vm_id} was refused, yet its link was brought up")
            self.assertStatus(StatusCode.NOT_FOUND, "GetVm", {"vm_id": vm.vm_id},
                              f"{vm.vm_id} was refused")
        listed = sorted(v["vm_id"] for v in self.call("ListVms").get("vms", []))
        self.assertEqual(listed, sorted(vm.vm_id for vm in accepted), "ListVms")
        samples = self.lab.daemon.metrics()
        self.assertEqual(grpc_requests(samples, "AttachVm", "RESOURCE_EXHAUSTED"),
                         expected_refusals, "vmnet_grpc_requests_total of the refusals")


# -- --max-concurrent-streams -----------------------------------------------------------------

class MaxConcurrentStreamsTest(LabTestCase):
    """--max-concurrent-streams=2: what a client sees on one connection and on another."""

    vm_count = 0
    limit = 2
    daemon_flags = (f"--max-concurrent-streams={limit}", METRICS_FLAG)

    def connection(self):
        """A client on a connection of its own (gRPC shares a connection between channels of
        the same target and arguments unless told not to)."""
        client = grpcurl.Client(self.lab.daemon.target,
                                options=[("grpc.use_local_subchannel_pool", 1)])
        self.addCleanup(client.close)
        client.call(f"{SERVICE}/ListVms")  # connected, settings exchanged, descriptors loaded
        client.method(f"{SERVICE}/Watch")
        return client

    def watch(self, client):
        stream = client.stream(f"{SERVICE}/Watch", {}, each="events")
        self.addCleanup(stream.cancel)
        return stream

    def test_streams_beyond_the_limit_wait_for_one_to_end(self):
        one, other = self.connection(), self.connection()
        streams = [self.watch(one) for _ in range(self.limit)]
        for i, stream in enumerate(streams):
            self.assertTrue(stream.wait_for_headers(lab.time_bound(5)),
                            f"Watch {i + 1} of {self.limit} on one connection did not start")
        watchers = lab.metric_total(self.lab.daemon.metrics(), "vmnet_watchers")
        self.assertEqual(watchers, self.limit, "vmnet_watchers")

        # A further stream on that connection waits...
        waiting = self.watch(one)
        self.assertFalse(waiting.wait_for_headers(QUEUED_WAIT),
                         f"a Watch beyond --max-concurrent-streams={self.limit} on one "
                         f"connection started at once")
        # ... and so does a unary call: its deadline passes before it reaches vmnetd.
        with self.assertRaises(grpcurl.RpcError, msg="ListVms on a full connection") as caught:
            one.call(f"{SERVICE}/ListVms", {}, timeout=QUEUED_WAIT)
        self.assertEqual(caught.exception.code, StatusCode.DEADLINE_EXCEEDED,
                         f"ListVms on a full connection: {caught.exception}")
        listed = grpc_requests(self.lab.daemon.metrics(), "ListVms", "OK")
        # Another connection is served meanwhile.
        other.call(f"{SERVICE}/ListVms", {}, timeout=lab.time_bound(5))  # raises if not
        samples = self.lab.daemon.metrics()
        self.assertEqual(grpc_requests(samples, "ListVms", "DEADLINE_EXCEEDED"), 0,
                         "the waiting ListVms reached vmnetd")
        self.assertEqual(grpc_requests(samples, "ListVms", "OK"), listed + 1,
                         "only the other connection's ListVms reached vmnetd")
        self.assertEqual(lab.metric_total(samples, "vmnet_watchers"), self.limit,
                         "vmnet_watchers with a third Watch waiting")

        # One stream ends: the waiting one starts.
        streams[0].cancel()
        self.assertTrue(waiting.wait_for_headers(lab.time_bound(5)),
                        "the waiting Watch did not start when another stream on its "
                        "connection ended")
        self.assertTrue(lab.wait_until(
            lambda: lab.metric_total(self.lab.daemon.metrics(), "vmnet_watchers") == self.limit,
            lab.time_bound(5)), "vmnet_watchers after one Watch ended and the waiting started")


# -- vmnet_dad_probes_sent_total --------------------------------------------------------------

def is_probe(frame, address):
    """Whether `frame` (a Sniffer item) arrived and is an ARP probe (sender 0.0.0.0) or a
    duplicate address detection neighbour solicitation (source ::) for `address`."""
    if frame.get("dir") != "in":
        return False
    if ":" in address:
        return (frame.get("kind") == "ip6" and frame.get("proto") == 58 and
                frame.get("type") == 135 and frame.get("target") == address and
                frame.get("src") == "::")
    return (frame.get("kind") == "arp" and frame.get("op") == 1 and
            frame.get("src") == "0.0.0.0" and frame.get("dst") == address)


def is_announcement(frame, address):
    """Whether `frame` arrived and is a gratuitous ARP or a neighbour advertisement of
    `address`."""
    if frame.get("dir") != "in":
        return False
    if ":" in address:
        return (frame.get("kind") == "ip6" and frame.get("proto") == 58 and
                frame.get("type") == 136 and frame.get("target") == address)
    return frame.get("kind") == "arp" and frame.get("src") == address == frame.get("dst")


class DadProbesCountedTest(DualStackTestCase):
    """--dad: the probes of a dual-stack VM's attach, on the wire in X and in the counter."""

    vm_count = 1
    daemon_flags = ("--dad", "--dad-timeout=1s", "--announce-count=1", METRICS_FLAG)
    PROBES_PER_ADDRESS = 2  # per uplink: one at once, one again halfway through --dad-timeout

    def probes_counted(self):
        return lab.metric_total(self.lab.daemon.metrics(), "vmnet_dad_probes_sent_total")

    def test_probes_on_the_wire_are_counted(self):
        vm = self.lab.vms[1]
        self.assertEqual(self.probes_counted(), 0, "vmnet_dad_probes_sent_total before attach")
        with Sniffer(self.lab.x) as lan:
            response = self.attach(vm, with_mac=True)
            self.assertEqual(response["vm"]["state"], "VM_STATE_PENDING",
                             f"with --dad, AttachVm answered {response}")
            got = self.final_state(vm.vm_id, "VM_STATE_PROGRAMMED")
            self.assertEqual(got.get("state"), "VM_STATE_PROGRAMMED", f"with --dad: {got}")
            # The announcements of the addresses follow the end of the probes on the same
            # wire: once X has them, X has every probe that was sent.
            self.assertTrue(lab.wait_until(
                lambda: all(any(is_announcement(f, a) for f in lan.items())
                            for a in vm.addresses), lab.time_bound(5), 0.05),
                f"X saw no announcement of {vm.addresses}: {lan.items()}")
            frames = {a: sum(is_probe(f, a) for f in lan.items()) for a in vm.addresses}
        self.assertEqual(frames, {a: self.PROBES_PER_ADDRESS for a in vm.addresses},
                         "probes on the wire in X")
        self.assertEqual(self.probes_counted(), sum(frames.values()),
                         "vmnet_dad_probes_sent_total against the probes on the wire")


# -- vmnet_announce_send_errors_total ---------------------------------------------------------

class AnnounceSendErrorsTest(LabTestCase):
    """Announcements on an uplink whose queue drops every frame: sendto() fails (ENOBUFS)."""

    vm_count = 1
    daemon_flags = ("--announce-count=2", "--announce-interval=100ms", METRICS_FLAG)

    def counters(self):
        samples = self.lab.daemon.metrics()
        return (lab.metric_total(samples, "vmnet_announce_send_errors_total"),
                lab.metric_total(samples, "vmnet_announcements_sent_total"))

    def test_refused_frames_are_counted_as_errors(self):
        vm = self.lab.vms[1]
        self.assertEqual(self.counters(), (0, 0), "(send errors, sent) before attach")
        # pfifo with room for no packet: the kernel drops each frame at the queue and sendto()
        # answers ENOBUFS.
        self.lab.run(self.lab.host, "tc", "qdisc", "add", "dev", lab.UPLINK, "root",
                     "handle", "1:", "pfifo", "limit", "0")
        self.addCleanup(self.lab.run, self.lab.host, "tc", "qdisc", "del", "dev", lab.UPLINK,
                        "root", check=False)
        with Sniffer(vm.ns) as link:
            self.assertEqual(self.attach(vm)["vm"]["state"], "VM_STATE_PROGRAMMED")
            # 2 x the VM's address on the uplink (refused) + 2 x the gateway on its link (sent).
            self.assertTrue(lab.wait_until(lambda: sum(self.counters()) >= 4,
                                           lab.time_bound(5), 0.05),
                            f"(send errors, sent) after attach: {self.counters()}")
            self.assertTrue(lab.wait_until(
                lambda: sum(is_announcement(f, lab.GATEWAY) for f in link.items()) >= 2,
                lab.time_bound(5), 0.05), f"the VM saw {link.items()}")
        self.assertEqual(self.counters(), (2, 2), "(send errors, sent): the uplink's two "
                         "refused, the gateway's two on the VM link sent")
        dropped = self.lab.run(self.lab.host, "tc", "-s", "qdisc", "show", "dev",
                               lab.UPLINK).stdout
        self.assertRegex(dropped, r"dropped [1-9]", "the uplink's qdisc dropped nothing")
        log = self.lab.daemon.log()
        self.assertRegex(log, rf"event=announce_send_failed interface={lab.UPLINK} "
                              rf"ifindex=\d+ error=\"No buffer space available\"")


class AnnounceOnDownUplinkTest(AnnounceSendErrorsTest):
    """The uplink goes down between an address's first and second announcement: the second
    is refused by the kernel (ENETDOWN) and counted as an error."""

    daemon_flags = ("--announce-count=2", "--announce-interval=2s", "--log-level=debug",
                    METRICS_FLAG)  # a link gone or down is logged at debug level

    def test_refused_frames_are_counted_as_errors(self):
        vm = self.lab.vms[1]
        self.assertEqual(self.counters(), (0, 0), "(send errors, sent) before attach")
        self.addCleanup(self.lab.run, self.lab.host, "ip", "link", "set", lab.UPLINK, "up",
                        check=False)
        with Sniffer(self.lab.x) as lan, Sniffer(vm.ns) as link:
            self.assertEqual(self.attach(vm)["vm"]["state"], "VM_STATE_PROGRAMMED")
            self.assertTrue(lab.wait_until(
                lambda: any(is_announcement(f, vm.address) for f in lan.items()),
                lab.time_bound(5), 0.02), f"X saw no announcement of {vm.address}")
            # The second is due 2 s after the first.
            self.lab.run(self.lab.host, "ip", "link", "set", lab.UPLINK, "down")
            self.assertTrue(lab.wait_until(
                lambda: sum(is_announcement(f, lab.GATEWAY) for f in link.items()) >= 2,
                lab.time_bound(10), 0.05), f"the VM saw {link.items()}")
            # The gateway's second and the address's second leave in the same round.
            self.assertTrue(lab.wait_until(lambda: sum(self.counters()) >= 4,
                                           lab.time_bound(5), 0.05),
                            f"(send errors, sent): {self.counters()}")
            self.assertEqual(sum(is_announcement(f, vm.address) for f in lan.items()), 1,
                             "X's announcements of the VM's address")
        self.assertEqual(self.counters(), (1, 3), "(send errors, sent): the address's second "
                         "on the down uplink refused; its first and the gateway's two sent")
        self.assertRegex(self.lab.daemon.log(),
                         rf"event=announce_send_failed interface={lab.UPLINK} "
                         rf"ifindex=\d+ error=\"Network is down\"")


if __name__ == "__main__":
    skips.main()
