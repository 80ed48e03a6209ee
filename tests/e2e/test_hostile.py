#!/usr/bin/python3
"""Hostile input and concurrency against vmnetd, in the namespace lab of test_host_routed.

HostileInputTest sends every kind of invalid request, one table row per way a field can be
wrong, and checks for each row the precise gRPC status, that the message names the field (and
the reason), that it is short and printable (a hostile value cannot flood a log or a terminal),
and that nothing changed: the host namespace's routes (all tables, both families), proxy and
ordinary neighbour entries, addresses, links and forwarding sysctls, the VMs the agent holds,
its state file, and its Watch stream. PermissiveInterfaceTest runs the agent with
--interface-pattern='.*' to reach the rules behind the pattern (uplink, loopback, names Linux
cannot have); LimitsTest runs it with small limits (--max-vms, --max-watchers,
--max-request-bytes). Each class ends by checking that the agent still serves.

ConcurrencyTest: 8 clients, each on its own channel, attach, change and detach random VMs of a
pool of 40 for a bounded time; afterwards the kernel holds exactly the final desired state.

Needs root and the vmnetd binary (<repo>/build/server/vmnetd, or set VMNETD); skips without
root, fails as root when it cannot run (tests/skips.py).

    /usr/bin/python3 tests/e2e/test_hostile.py [-v] [TestClass.test_method]
"""

import collections
import dataclasses
import hashlib
import json
import os
import random
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import skips  # noqa: E402  (tests/skips.py: no skips as root)
import lab  # noqa: E402  (first: it explains a missing grpc module)
import grpcurl  # noqa: E402
import grpc  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from grpc import StatusCode  # noqa: E402
from test_host_routed import LabTestCase  # noqa: E402

SERVICE = "vmnet.v1.VmNetwork"
PROTO_DIR = os.path.join(lab.REPO, "proto")
# Generous: on a loaded host (other labs holding the kernel's rtnl lock) a call or an `ip`
# command can take seconds; a test that waits longer than usual is better than a false failure.
CALL_TIMEOUT = 30.0
COMMAND_TIMEOUT = 30.0
ROUTE_PROTOCOL = "237"  # vmnetd's default --route-protocol

# An error message longer than this, or with bytes outside printable ASCII, lets a hostile
# value flood a log line or drive a terminal.
MAX_MESSAGE_LENGTH = 400

INVALID = StatusCode.INVALID_ARGUMENT
NOT_FOUND = StatusCode.NOT_FOUND
EXISTS = StatusCode.ALREADY_EXISTS
EXHAUSTED = StatusCode.RESOURCE_EXHAUSTED
OUT_OF_RANGE = StatusCode.OUT_OF_RANGE
OK = StatusCode.OK

# A request that does not parse as the method's message (issue 13, item 8): INVALID_ARGUMENT
# saying so. (gRPC 1.51's typed callback handler would answer UNIMPLEMENTED with an empty
# message; vmnetd registers its methods raw and parses the requests itself.)
UNPARSABLE = INVALID
UNPARSABLE_NAMES = ("could not be parsed",)


# -- the API, with messages compiled from the repository's .proto ----------------------------

class Api:
    """vmnet.v1.VmNetwork on one channel. Requests are dicts of field values (anything the
    message constructor takes, e.g. state=99) or raw bytes sent as they are."""

    _pool = None

    def __init__(self, target, timeout=CALL_TIMEOUT):
        self.channel = grpc.insecure_channel(target)
        self.timeout = timeout

    @classmethod
    def pool(cls):
        if cls._pool is None:
            cls._pool = grpcurl.load_proto("vmnet/v1/vmnet.proto", include_dir=PROTO_DIR)
        return cls._pool

    @classmethod
    def classes(cls, method):
        """The request and response classes of `method`."""
        desc = cls.pool().FindServiceByName(SERVICE).methods_by_name[method]
        return (grpcurl.message_class(cls.pool(), desc.input_type.full_name),
                grpcurl.message_class(cls.pool(), desc.output_type.full_name))

    @classmethod
    def serialize(cls, method, request):
        if isinstance(request, bytes):
            return request
        return cls.classes(method)[0](**request).SerializeToString()

    def _stub(self, method, streaming):
        response_class = self.classes(method)[1]
        make = self.channel.unary_stream if streaming else self.channel.unary_unary
        return make(f"/{SERVICE}/{method}", request_serializer=lambda raw: raw,
                    response_deserializer=response_class.FromString)

    def call(self, method, request=None, timeout=None):
        """The response message; raises grpcurl.RpcError for any status but OK."""
        try:
            return self._stub(method, False)(self.serialize(method, request or {}),
                                             timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise grpcurl.RpcError(e.code(), e.details() or "") from None

    def stream(self, method, request=None, timeout=None, each=None):
        """A server-streaming call as a grpcurl.Stream of dicts (`each`: see grpcurl.Stream;
        Watch streams give their events with each="events")."""
        return grpcurl.Stream(self._stub(method, True)(self.serialize(method, request or {}),
                                                       timeout=timeout), each=each)

    def list_all(self, method, field, request=None):
        """Every entry of a paged list, as dicts."""
        entries, token = [], ""
        for _ in range(1000):
            response = self.call(method, {**(request or {}), "page_size": 1000,
                                          "page_token": token})
            entries += [to_dict(e) for e in getattr(response, field)]
            token = response.next_page_token
            if not token:
                return entries
        raise AssertionError(f"{method} kept returning a next_page_token")

    def close(self):
        self.channel.close()


def state_number(name):
    """The number of VmState `name`, e.g. state_number("VM_STATE_PROGRAMMED") == 2."""
    return Api.pool().FindEnumTypeByName("vmnet.v1.VmState").values_by_name[name].number


def to_dict(message):
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def first_message(stream, timeout=5.0, cancel=True):
    """The first message of a stream (None when it ended without one), then cancels the
    stream unless `cancel` is False; raises RpcError when the stream failed."""
    result = {}

    def read():
        try:
            result["message"] = next(iter(stream), None)
        except grpcurl.RpcError as e:
            result["error"] = e

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if cancel or reader.is_alive():
        stream.cancel()
    if reader.is_alive():
        raise AssertionError(f"the stream sent nothing and did not end within {timeout} s")
    if "error" in result:
        raise result["error"]
    return result.get("message")


# -- what the host holds ------------------------------------------------------------------------

# Flags of a link that follow its carrier, not anything an agent sets.
CARRIER_FLAGS = {"LOWER_UP", "NO-CARRIER", "M-DOWN", "DORMANT"}
SYSCTL_FILES = ("/proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv4/conf/*/forwarding "
                "/proc/sys/net/ipv4/conf/*/proxy_arp /proc/sys/net/ipv6/conf/*/forwarding "
                "/proc/sys/net/ipv6/conf/*/proxy_ndp")


def _json_values(text):
    """The JSON values printed one after another (as `ip -j -batch` does)."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return values
        value, i = decoder.raw_decode(text, i)
        values.append(value)


# One shell in the namespace prints everything kernel_state() reads, the parts separated by
# a line "--": fewer processes, as the snapshot is taken after every row.
_SNAPSHOT_SCRIPT = f"""
printf 'route show table all\\nneigh show proxy\\nneigh show\\naddr show\\nlink show\\n' |
    ip -d -j -batch - && echo -- &&
ip -6 -d -j route show table all && echo -- &&
grep -H . {SYSCTL_FILES}
"""


def _canonical(items):
    return sorted(json.dumps(item, sort_keys=True) for item in items)


def _is_multicast(address):
    return address.lower().startswith("ff") or address.split(".")[0] in {str(n) for n in
                                                                            range(224, 240)}


def kernel_state(the_lab):
    """The host namespace as an agent could change it, for before/after comparisons: routes of
    all tables (IPv4 and IPv6), proxy entries, ordinary neighbours, addresses, links and the
    forwarding and proxy sysctls. Left out is only what changes by itself: address lifetimes,
    a link's carrier flags, operstate and qdisc, the state of dynamic (resolved) neighbours
    and multicast neighbours that the kernel makes when a link sends its first packets."""
    output = the_lab.run(the_lab.host, "sh", "-c", _SNAPSHOT_SCRIPT,
                         timeout=COMMAND_TIMEOUT).stdout
    batch, routes6, sysctls = output.split("\n--\n")
    routes4, proxies, neighbours, addresses, links = _json_values(batch)
    routes6 = json.loads(routes6)
    kept_neighbours = []
    for n in neighbours:
        if _is_multicast(n.get("dst", "")):
            continue
        if not {"PERMANENT", "NOARP"} & set(n.get("state", [])):
            n = {"dst": n.get("dst"), "dev": n.get("dev"), "state": "dynamic"}
        kept_neighbours.append(n)
    link_state = []
    for link in links:
        keep = {k: link.get(k) for k in ("ifindex", "ifname", "mtu", "address", "link_type",
                                         "master", "group", "txqlen", "link", "link_netnsid")}
        keep["flags"] = sorted(set(link.get("flags", [])) - CARRIER_FLAGS)
        link_state.append(keep)
    # The kernel's own IPv6 link-local addresses finish duplicate address detection by
    # themselves (the tentative flag clears and a local route appears), later still on a
    # loaded machine: neither is the agent's doing.
    address_state = {
        link["ifname"]: _canonical({k: v for k, v in a.items()
                                    if k not in ("valid_life_time", "preferred_life_time",
                                                 "tentative")}
                                   for a in link.get("addr_info", []))
        for link in addresses
    }
    routes = [r for r in routes4 + routes6
              if not (r.get("table") == "local" and r.get("dst", "").startswith("fe80:"))]
    return {
        # Some iproute2 versions list IPv6 routes in the batch's dump too: once is enough.
        "routes": sorted(set(_canonical(routes))),
        "proxy entries": _canonical(proxies),
        "neighbours": _canonical(kept_neighbours),
        "addresses": address_state,
        "links": _canonical(link_state),
        "sysctls": sorted(sysctls.split()),
    }


def ipv6_settled(the_lab):
    """True when every host link that is up with a carrier has its IPv6 link-local address
    and no address is tentative. The kernel adds that address only after it has seen the
    carrier (up to a second later) and clears its tentative flag a second or two after that,
    with a local route: until then, the host changes by itself."""
    for link in the_lab.ip_json(the_lab.host, "addr", "show"):
        flags = set(link.get("flags", []))
        addresses = [a for a in link.get("addr_info", []) if a.get("family") == "inet6"]
        if any(a.get("tentative") for a in addresses):
            return False
        if {"UP", "LOWER_UP"} <= flags and "LOOPBACK" not in flags and \
                not any(a.get("scope") == "link" for a in addresses):
            return False
    return True


def describe_changes(before, after):
    """What differs between two kernel_state() or agent_state() results, for a human."""
    lines = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if isinstance(old, list) and isinstance(new, list):
            gone = [x for x in old if x not in new]
            added = [x for x in new if x not in old]
            lines += [f"  {key}: - {x}" for x in gone] + [f"  {key}: + {x}" for x in added]
        elif isinstance(old, dict) and isinstance(new, dict):
            lines += [f"  {key}/{line.strip()}" for line in describe_changes(old, new)]
        else:
            lines.append(f"  {key}: {old!r} -> {new!r}")
    return lines


def has_line_starting(text, prefix):
    return any(line.startswith(prefix) for line in text.splitlines())


# -- table rows -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    """One request and what the agent must answer.

    `code` is a StatusCode (or a tuple of acceptable ones); `names` are substrings the status
    message must contain (the field, and the limit or VM it names); `check` inspects an OK
    response and returns a problem or None."""

    what: str
    method: str
    request: object  # dict of fields, or raw bytes
    code: object = INVALID
    names: tuple = ()
    check: object = None

    @property
    def label(self):
        return f"{self.method} {self.what}"

    @property
    def mutating(self):
        return self.method in ("AttachVm", "DetachVm")


def _bad_vm_ids():
    """(what, vm_id) for every way a vm_id is wrong, except empty (a filter may be empty)."""
    return [
        ("vm_id of 65 characters", "v" * 65),
        ("vm_id of 100000 characters", "v" * 100000),
        ("vm_id with a space", "vm 1"),
        ("vm_id with a leading space", " vm1"),
        ("vm_id with a trailing newline", "vm1\n"),
        ("vm_id with a tab", "vm\t1"),
        ("vm_id with a slash", "vm/1"),
        ("vm_id ../etc", "../etc"),
        ("vm_id with a colon", "vm:1"),
        ("vm_id with a quote", 'vm"1'),
        ("vm_id with a percent sign", "vm%n"),
        ("vm_id with a NUL byte", "vm\x001"),
        ("vm_id that is one NUL byte", "\x00"),
        ("vm_id with an ANSI escape", "vm\x1b[31m"),
        ("vm_id with DEL", "vm\x7f"),
        ("vm_id with a non-ASCII letter", "vm-\u00e9"),
        ("vm_id with a right-to-left override", "vm-\u202e1"),
        ("vm_id in full-width letters", "\uff56\uff4d1"),
    ]


# -- the test base --------------------------------------------------------------------------------

class HostileTestCase(LabTestCase):
    """A lab and a vmnetd; runs tables of rows and checks that rejected requests change
    nothing."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.api = Api(cls.lab.daemon.target)
        cls.addClassCleanup(cls.api.close)
        cls.specs = {}  # vm_id -> AttachVm request of the VMs the class keeps attached

    @classmethod
    def attach_and_keep(cls, request, state="VM_STATE_PROGRAMMED"):
        """Attaches a VM that the class's rows expect to find, remembering its spec."""
        response = cls.api.call("AttachVm", request)
        if response.vm.state != state_number(state):
            raise AssertionError(f"AttachVm {request} answered {to_dict(response)}")
        cls.specs[request["vm_id"]] = request
        return response

    def rpc(self, method, request=None):
        return self.api.call(method, request)

    # -- the state before and after ---------------------------------------------------------

    def settled_kernel_state(self):
        """kernel_state() once IPv6 has settled (see ipv6_settled), so that a comparison
        with it later sees only what a request changed."""
        lab.wait_until(lambda: ipv6_settled(self.lab), 10)
        return kernel_state(self.lab)

    def agent_state(self):
        """What the agent holds: its VMs (with revisions) and its state files' digests."""
        state_dir = os.path.join(self.lab.daemon.workdir, "state")
        files = {}
        for name in sorted(os.listdir(state_dir)):
            path = os.path.join(state_dir, name)
            if name != "lock" and os.path.isfile(path):
                with open(path, "rb") as f:
                    files[name] = hashlib.sha256(f.read()).hexdigest()
        return {"vms": _canonical(self.api.list_all("ListVms", "vms")),
                "state files": files}

    def restore(self):
        """After a row that should have been refused changed the agent: forget the VMs the
        class does not keep, and put those it keeps back as they were."""
        try:
            for vm in self.api.list_all("ListVms", "vms"):
                if vm["vm_id"] not in self.specs:
                    self.api.call("DetachVm", {"vm_id": vm["vm_id"], "allow_missing": True})
            for spec in self.specs.values():
                self.api.call("AttachVm", spec)
        except grpcurl.RpcError as e:
            print(f"could not undo what a wrongly accepted request changed: {e}",
                  file=sys.stderr)

    # -- rows -------------------------------------------------------------------------------

    def call_row(self, row):
        """The row's answer as (code, message, response); Watch rows read the first event.
        The code is None when a Watch neither sent an event nor ended."""
        try:
            if row.method == "Watch":
                response = first_message(
                    self.api.stream("Watch", row.request, timeout=10, each="events"))
            else:
                response = self.api.call(row.method, row.request)
            return OK, "", response
        except grpcurl.RpcError as e:
            return e.code, e.details, None
        except AssertionError as e:
            return None, str(e), None

    def row_problems(self, row):
        """What is wrong with the agent's answer to `row` (empty when it is right)."""
        codes = row.code if isinstance(row.code, tuple) else (row.code,)
        code, message, response = self.call_row(row)
        expected = " or ".join(c.name for c in codes)
        if code not in codes:
            if code is None:
                answer = message
            elif code == OK:
                answer = f"OK {to_dict(response) if hasattr(response, 'DESCRIPTOR') else response}"
            else:
                answer = f"{code.name}: {message}"
            return [f"{row.label}: expected {expected}, the agent answered {answer}"]
        problems = []
        for name in row.names:
            if name not in message:
                problems.append(f"{row.label}: the {code.name} message does not name "
                                f"{name!r}: {message!r}")
        if len(message) > MAX_MESSAGE_LENGTH:
            problems.append(f"{row.label}: the message is {len(message)} characters long "
                            f"(more than {MAX_MESSAGE_LENGTH}): {message[:200]!r}...")
        if any(not (32 <= ord(c) < 127) for c in message):
            problems.append(f"{row.label}: the message has unprintable or non-ASCII "
                            f"characters: {message!r}")
        if code == OK and row.check is not None:
            problem = row.check(response)
            if problem:
                problems.append(f"{row.label}: {problem}")
        return problems

    def run_rows(self, rows):
        """Runs each row in a subTest; after each row that could change something, the kernel
        and the agent must be as before the table. A Watch opened before the table must see
        no event."""
        events, end = self.watch_after_snapshot()
        kernel_before, agent_before = self.settled_kernel_state(), self.agent_state()
        for row in rows:
            with self.subTest(row.label):
                problems = self.row_problems(row)
                if row.mutating or row is rows[-1]:
                    kernel_after, agent_after = kernel_state(self.lab), self.agent_state()
                    if kernel_after != kernel_before:
                        problems.append(f"{row.label} changed the host:\n" + "\n".join(
                            describe_changes(kernel_before, kernel_after)))
                    if agent_after != agent_before:
                        problems.append(f"{row.label} changed what the agent holds:\n" + "\n"
                                        .join(describe_changes(agent_before, agent_after)))
                        self.restore()
                    if problems and (kernel_after != kernel_before or
                                     agent_after != agent_before):
                        # Blame the next rows only for what they change themselves.
                        kernel_before = self.settled_kernel_state()
                        agent_before = self.agent_state()
                if problems:
                    self.fail("\n".join(problems))
        self.assertNoEventSince(events, end, "the agent should have refused or only "
                                             "validated every request")

    def head_revision(self):
        """The revision of the agent's latest event: where a Watch opened now ends its
        initial snapshot. (Closed again at once: --max-watchers.)"""
        now, now_end = self.watch_after_snapshot()
        now.close()
        return int(now_end.get("revision", 0))

    def assertNoEventSince(self, events, end, why):
        """The agent published no event after `end`, the SNAPSHOT_END of Watch `events`: the
        head of its event log is still there. Deterministic, unlike waiting a while for events
        that should not come. Closes `events` first (--max-watchers)."""
        events.drain()  # what arrived, for the message
        events.close()
        stray = [f"{e['type']} {e.get('vm', {}).get('vm_id', '')}" for e in events.seen
                 if e["type"] not in ("EVENT_TYPE_SNAPSHOT", "EVENT_TYPE_SNAPSHOT_END")]
        self.assertEqual(self.head_revision(), int(end.get("revision", 0)),
                         f"the agent published events ({why}); the Watch saw {stray}")

    def assertStillServing(self, valid_attach):
        """The agent is running, reports SERVING, and a valid AttachVm still programs the
        host (it is detached again afterwards)."""
        self.assertIsNone(self.lab.daemon.process.poll(),
                          f"vmnetd exited with status {self.lab.daemon.process.returncode}")
        self.assertEqual(self.lab.daemon.health(), "SERVING",
                         "grpc.health.v1.Health/Check no longer answers SERVING")
        response = self.rpc("AttachVm", valid_attach)
        self.addCleanup(self.api.call, "DetachVm", {"vm_id": valid_attach["vm_id"],
                                                    "allow_missing": True})
        self.assertEqual(response.vm.state, state_number("VM_STATE_PROGRAMMED"),
                         f"a valid AttachVm {valid_attach} answered {to_dict(response)}")
        routes = [r["dst"] for r in self.lab.routes()]
        for address in valid_attach["ip_addresses"]:
            self.assertIn(address, routes, f"after a valid AttachVm {valid_attach} the host "
                                           f"has no route to {address}")
        self.rpc("DetachVm", {"vm_id": valid_attach["vm_id"]})


def vm_request(vm, **changes):
    """The AttachVm request of lab VM `vm`, with `changes`."""
    return {"vm_id": vm.vm_id, "interface": vm.interface, "ip_addresses": [vm.address],
            **changes}


def expect_vm(**fields):
    """A Row.check: the response's vm has these field values."""
    def check(response):
        got = to_dict(response).get("vm", {})
        wrong = {k: got.get(k) for k, v in fields.items() if got.get(k) != v}
        return f"answered vm {got}; expected {fields}" if wrong else None
    return check


def expect_list(field, predicate, what):
    """A Row.check for a List response: `predicate(entries)` holds."""
    def check(response):
        entries = [to_dict(e) for e in getattr(response, field)]
        return None if predicate(entries) else f"answered {entries}; expected {what}"
    return check


# -- 1. hostile input -------------------------------------------------------------------------

class HostileInputTest(HostileTestCase):
    """VM 1 attached (with its MAC); every row uses VM 2's link (left unattached) or VM 1."""

    vm_count = 2
    max_addresses = 4
    daemon_flags = (f"--max-addresses-per-vm={max_addresses}",)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.vm1, cls.vm2 = cls.lab.vms[1], cls.lab.vms[2]
        cls.attach_and_keep(vm_request(cls.vm1, mac_address=cls.vm1.mac))
        # A VM whose interface does not exist yet: it holds its address and interface too.
        cls.pending = {"vm_id": "vm-0", "interface": "vme77", "ip_addresses": ["198.51.100.77"]}
        cls.attach_and_keep(cls.pending, state="VM_STATE_PENDING")
        # Real page tokens of each list, to hand to the wrong list.
        cls.tokens = {}
        for method in ("ListArp", "ListRoutes", "ListVms"):
            token = cls.api.call(method, {"page_size": 1}).next_page_token
            if not token:
                raise AssertionError(f"{method} page_size=1 returned no next_page_token")
            cls.tokens[method] = token

    def valid(self, **changes):
        """A valid AttachVm of a new VM on VM 2's link, with `changes`."""
        return vm_request(self.vm2, **changes)

    # -- AttachVm ----------------------------------------------------------------------------

    def test_attach_vm_id(self):
        rows = [Row("with an empty vm_id", "AttachVm", self.valid(vm_id=""), names=("vm_id",))]
        rows += [Row(f"with a {what}", "AttachVm", self.valid(vm_id=vm_id), names=("vm_id",))
                 for what, vm_id in _bad_vm_ids()]
        rows.append(Row("with a vm_id of 64 characters (the maximum), validate_only",
                        "AttachVm", self.valid(vm_id="v" * 64, validate_only=True), OK,
                        check=expect_vm(vm_id="v" * 64)))
        rows.append(Row("with a vm_id of every allowed character kind, validate_only",
                        "AttachVm", self.valid(vm_id="Az09._-", validate_only=True), OK))
        self.run_rows(rows)

    def test_attach_interface(self):
        cases = [
            ("empty", ""),
            ("of 16 bytes", "vme0123456789abc"),
            ("of 100000 bytes", "vme" + "a" * 99997),
            ("not matching the pattern (foo1)", "foo1"),
            ("with no hex digits (vme)", "vme"),
            ("with a non-hex digit (vmeg)", "vmeg"),
            ("in capitals (VME1A)", "VME1A"),
            ("with a trailing space", self.vm2.interface + " "),
            ("with a leading space", " " + self.vm2.interface),
            ("with a trailing newline", self.vm2.interface + "\n"),
            ("with a NUL byte", self.vm2.interface + "\x00"),
            ("with a slash", self.vm2.interface + "/.."),
            ("with a non-ASCII letter", "vm\u00e91"),
            ("that is the uplink eth0 (not matching the pattern)", lab.UPLINK),
            ("that is lo", "lo"),
        ]
        rows = [Row(f"with an interface {what}", "AttachVm", self.valid(interface=interface),
                    names=("interface",)) for what, interface in cases]
        longest = "vme" + "f" * 12  # 15 bytes, matches vme[0-9a-f]{1,12}, does not exist
        rows.append(Row("with an interface of 15 bytes that does not exist yet, validate_only",
                        "AttachVm", self.valid(interface=longest, validate_only=True), OK,
                        check=expect_vm(interface=longest, state="VM_STATE_PENDING")))
        self.run_rows(rows)

    def test_attach_ip_addresses(self):
        good = "198.51.100.50"
        other = "198.51.100.53"  # not `good`: a sloppy parse must not end in "given twice"
        syntax = [
            ("an empty string", ""),
            ("not an IP", "not-an-ip"),
            ("with a leading space", " " + other),
            ("with a trailing space", other + " "),
            ("with a trailing newline", other + "\n"),
            ("with a tab", other + "\t"),
            ("in CIDR form", other + "/32"),
            ("a subnet", "198.51.100.0/24"),
            ("with an octet over 255", "198.51.100.256"),
            ("of three parts", "198.51.100"),
            ("with a leading zero (octal?)", "198.51.100.050"),
            ("in hex", "0xc6.51.100.50"),
            ("as one integer", "3325256754"),
            ("of 10000 characters", "1" * 10000),
            ("with a NUL byte and more after it", other + "\x00junk"),
        ]
        kinds = [
            ("IPv6 link-local", "fe80::1", "link-local"),
            ("v4-mapped IPv6", "::ffff:198.51.100.50", "IPv4-mapped"),
            ("IPv6 multicast", "ff02::1", "multicast"),
            ("IPv6 loopback", "::1", "loopback"),
            ("IPv6 unspecified", "::", "unspecified"),
            ("the IPv6 gateway", "fe80::ffff:1:1", "link-local"),
            ("unspecified 0.0.0.0", "0.0.0.0", "unspecified"),
            ("broadcast 255.255.255.255", "255.255.255.255", "broadcast"),
            ("the uplink subnet's broadcast", "198.51.100.255", "broadcast"),
            ("multicast 224.0.0.1", "224.0.0.1", "multicast"),
            ("multicast 239.255.255.250", "239.255.255.250", "multicast"),
            ("loopback 127.0.0.1", "127.0.0.1", "loopback"),
            ("loopback 127.1.2.3", "127.1.2.3", "loopback"),
            ("link-local 169.254.1.1", "169.254.1.1", "link-local"),
            ("reserved 240.0.0.1", "240.0.0.1", "reserved"),
            ("reserved 255.255.255.254", "255.255.255.254", "reserved"),
            ("the gateway", lab.GATEWAY, "gateway"),
            ("the host's own", lab.HOST_ADDRESS, "own"),
        ]
        rows = [Row("with no ip_addresses", "AttachVm", self.valid(ip_addresses=[]),
                    names=("ip_addresses",))]
        # The bad address second: the message must name its index.
        rows += [Row(f"with ip_addresses[1] {what}", "AttachVm",
                     self.valid(ip_addresses=[good, address]), names=("ip_addresses[1]",))
                 for what, address in syntax]
        rows += [Row(f"with ip_addresses[1] {what}", "AttachVm",
                     self.valid(ip_addresses=[good, address]),
                     names=("ip_addresses[1]", reason)) for what, address, reason in kinds]
        rows += [Row(f"with ip_addresses[0] {what}", "AttachVm",
                     self.valid(ip_addresses=[address]), names=("ip_addresses[0]", reason))
                 for what, address, reason in kinds[:1] + kinds[-2:]]
        rows.append(Row("with an address given twice", "AttachVm",
                        self.valid(ip_addresses=[good, "198.51.100.51", good]),
                        names=("ip_addresses[2]", "twice")))
        too_many = [f"198.51.100.{60 + i}" for i in range(self.max_addresses + 1)]
        rows.append(Row(f"with {len(too_many)} addresses (--max-addresses-per-vm="
                        f"{self.max_addresses})", "AttachVm", self.valid(ip_addresses=too_many),
                        names=("ip_addresses", "--max-addresses-per-vm")))
        rows.append(Row(f"with {self.max_addresses} addresses (the maximum), validate_only",
                        "AttachVm", self.valid(ip_addresses=too_many[:-1], validate_only=True),
                        OK, check=expect_vm(ip_addresses=too_many[:-1])))
        self.run_rows(rows)

    def test_attach_allowed_source_prefixes(self):
        cases = [
            ("not a prefix", "zz", ("CIDR",)),
            ("without a length", "203.0.113.0", ("CIDR",)),
            ("with a length of 33", "203.0.113.0/33", ("CIDR",)),
            ("with a negative length", "203.0.113.0/-1", ("CIDR",)),
            ("with host bits set", "203.0.113.1/24", ("host bits", "203.0.113.0/24")),
            ("IPv6 with host bits set", "2001:db8:2::1/48", ("host bits",)),
            ("multicast", "224.0.0.0/4", ("multicast",)),
            ("loopback", "127.0.0.0/8", ("loopback",)),
            ("link-local", "fe80::/10", ("link-local",)),
            ("IPv4-mapped", "::ffff:203.0.113.0/120", ("IPv4-mapped",)),
            ("with a NUL byte", "203.0.113.0/24\x00", ("CIDR",)),
        ]
        rows = [Row(f"with allowed_source_prefixes[1] {what}", "AttachVm",
                    self.valid(allowed_source_prefixes=["198.51.100.128/25", prefix]),
                    names=("allowed_source_prefixes[1]", *reason))
                for what, prefix, reason in cases]
        rows.append(Row("with a prefix given twice", "AttachVm",
                        self.valid(allowed_source_prefixes=["203.0.113.0/24", "203.0.113.0/24"]),
                        names=("allowed_source_prefixes[1]", "twice")))
        rows.append(Row("with VM 1's address as an allowed source", "AttachVm",
                        self.valid(allowed_source_prefixes=[f"{self.vm1.address}/32"]),
                        names=("allowed_source_prefixes[0]", self.vm1.address, "vm-1")))
        rows.append(Row("with 0.0.0.0/0 and ::/0, validate_only", "AttachVm",
                        self.valid(allowed_source_prefixes=["0.0.0.0/0", "::/0"],
                                   validate_only=True), OK,
                        check=expect_vm(allowed_source_prefixes=["0.0.0.0/0", "::/0"])))
        self.run_rows(rows)

    def test_attach_bandwidth(self):
        cases = [
            ("ingress_bits_per_second", 7999, ("below", "8000")),
            ("ingress_bits_per_second", 1, ("below",)),
            ("ingress_bits_per_second", 400_000_000_001, ("above", "400 Gbit/s")),
            ("ingress_bits_per_second", 2**64 - 1, ("above",)),
            ("egress_bits_per_second", 7999, ("below",)),
            ("egress_bits_per_second", 10**18, ("above",)),
        ]
        rows = [Row(f"with bandwidth.{field} {value}", "AttachVm",
                    self.valid(bandwidth={field: value}), names=(f"bandwidth.{field}", *reason))
                for field, value, reason in cases]
        rows += [
            Row("with bandwidth.burst_bytes 1513 (less than one packet)", "AttachVm",
                self.valid(bandwidth={"ingress_bits_per_second": 20_000_000,
                                      "burst_bytes": 1513}),
                names=("bandwidth.burst_bytes", "MTU")),
            Row("with bandwidth.burst_bytes of 2 GiB", "AttachVm",
                self.valid(bandwidth={"ingress_bits_per_second": 20_000_000,
                                      "burst_bytes": 2**31}),
                names=("bandwidth.burst_bytes", "1 GiB")),
            Row("with bandwidth.burst_bytes 2**64-1", "AttachVm",
                self.valid(bandwidth={"egress_bits_per_second": 20_000_000,
                                      "burst_bytes": 2**64 - 1}),
                names=("bandwidth.burst_bytes",)),
            Row("with a burst of more than 60 s at the lower limit", "AttachVm",
                self.valid(bandwidth={"ingress_bits_per_second": 8000,
                                      "egress_bits_per_second": 20_000_000,
                                      "burst_bytes": 60_001}),
                names=("bandwidth.burst_bytes", "60 s")),
            Row("with bandwidth.egress_packets_per_second 2**64-1", "AttachVm",
                self.valid(bandwidth={"egress_packets_per_second": 2**64 - 1}),
                names=("bandwidth.egress_packets_per_second",)),
            Row("with bandwidth.egress_packets_per_second 10**9+1", "AttachVm",
                self.valid(bandwidth={"egress_packets_per_second": 10**9 + 1}),
                names=("bandwidth.egress_packets_per_second", "1000000000")),
            # A packet-rate limit within the bounds (port security is on): accepted.
            Row("with bandwidth.egress_packets_per_second 1 and 10**9, validate_only",
                "AttachVm",
                self.valid(bandwidth={"egress_packets_per_second": 10**9},
                           validate_only=True), OK,
                check=expect_vm(bandwidth={"egress_packets_per_second": "1000000000"})),
            Row("with bandwidth.egress_packets_per_second 1, validate_only", "AttachVm",
                self.valid(bandwidth={"egress_packets_per_second": 1}, validate_only=True),
                OK, check=expect_vm(bandwidth={"egress_packets_per_second": "1"})),
            Row("with 8 kbit/s and 400 Gbit/s (the bounds), validate_only", "AttachVm",
                self.valid(bandwidth={"ingress_bits_per_second": 8000,
                                      "egress_bits_per_second": 400_000_000_000},
                           validate_only=True), OK,
                check=expect_vm(bandwidth={"ingress_bits_per_second": "8000",
                                           "egress_bits_per_second": "400000000000"})),
        ]
        self.run_rows(rows)

    def test_attach_mac_address(self):
        cases = [
            ("not a MAC", "zz", ()),
            ("of five groups", "52:54:00:00:00", ()),
            ("of seven groups", "52:54:00:00:00:01:02", ()),
            ("with a non-hex digit", "52:54:00:00:00:0g", ()),
            ("with a one-digit group", "52:54:00:00:00:1", ()),
            ("without separators", "525400000001", ()),
            ("in dotted form", "5254.0000.0001", ()),
            ("with a leading space", " 52:54:00:00:00:02", ()),
            ("with a NUL byte", "52:54:00:00:00:02\x00", ()),
            ("multicast 01:00:5e:00:00:01", "01:00:5e:00:00:01", ("multicast",)),
            ("multicast 33:33:00:00:00:01", "33:33:00:00:00:01", ("multicast",)),
            ("broadcast ff:ff:ff:ff:ff:ff", "ff:ff:ff:ff:ff:ff", ()),
            ("all zeros", "00:00:00:00:00:00", ("zero",)),
        ]
        rows = [Row(f"with a mac_address {what}", "AttachVm", self.valid(mac_address=mac),
                    names=("mac_address", *reason)) for what, mac, reason in cases]
        rows.append(Row("with a mac_address in capitals, validate_only", "AttachVm",
                        self.valid(mac_address="52:54:00:AB:CD:EF", validate_only=True), OK,
                        check=expect_vm(mac_address="52:54:00:ab:cd:ef")))
        self.run_rows(rows)

    def test_attach_request_id(self):
        self.run_rows([
            Row("with a request_id of 129 bytes", "AttachVm", self.valid(request_id="r" * 129),
                names=("request_id",)),
            Row("with a request_id of 100000 bytes", "AttachVm",
                self.valid(request_id="r" * 100000), names=("request_id",)),
            Row("of VM 1 with a request_id of 129 bytes", "AttachVm",
                {**self.specs["vm-1"], "request_id": "r" * 129}, names=("request_id",)),
            Row("with a request_id of 128 bytes, validate_only", "AttachVm",
                self.valid(request_id="r" * 128, validate_only=True), OK),
        ])

    def test_attach_what_another_vm_holds(self):
        held = self.vm1.address
        self.run_rows([
            Row("with VM 1's address", "AttachVm",
                self.valid(ip_addresses=["198.51.100.50", held]), EXISTS,
                names=("ip_addresses[1]", held, "vm-1")),
            Row("with VM 1's address, validate_only", "AttachVm",
                self.valid(ip_addresses=[held], validate_only=True), EXISTS,
                names=("ip_addresses[0]", "vm-1")),
            Row("with VM 1's interface", "AttachVm", self.valid(interface=self.vm1.interface),
                EXISTS, names=("interface", self.vm1.interface, "vm-1")),
            Row("with the address of a VM whose interface does not exist yet", "AttachVm",
                self.valid(ip_addresses=self.pending["ip_addresses"]), EXISTS,
                names=("ip_addresses[0]", "vm-0")),
            Row("with the interface of a VM whose interface does not exist yet", "AttachVm",
                self.valid(interface=self.pending["interface"]), EXISTS,
                names=("interface", "vm-0")),
        ])

    def test_attached_vm_changed_to_bad_spec_stays_as_it_was(self):
        spec = self.specs["vm-1"]
        self.run_rows([
            Row("of VM 1 changed to the uplink", "AttachVm", {**spec, "interface": lab.UPLINK},
                names=("interface",)),
            Row("of VM 1 changed to no addresses", "AttachVm", {**spec, "ip_addresses": []},
                names=("ip_addresses",)),
            Row("of VM 1 adding the host's own address", "AttachVm",
                {**spec, "ip_addresses": [self.vm1.address, lab.HOST_ADDRESS]},
                names=("ip_addresses[1]", "own")),
            Row("of VM 1 adding the gateway", "AttachVm",
                {**spec, "ip_addresses": [self.vm1.address, lab.GATEWAY]},
                names=("ip_addresses[1]", "gateway")),
            Row("of VM 1 changed to a multicast MAC", "AttachVm",
                {**spec, "mac_address": "01:00:5e:00:00:01"}, names=("mac_address",)),
            Row("of VM 1 with a new address, validate_only", "AttachVm",
                {**spec, "ip_addresses": [self.vm1.address, "198.51.100.52"],
                 "validate_only": True}, OK,
                check=expect_vm(vm_id="vm-1", ip_addresses=["198.51.100.52",
                                                            self.vm1.address])),
            Row("of VM 1 with the same spec (a no-op)", "AttachVm", spec, OK,
                check=expect_vm(state="VM_STATE_PROGRAMMED")),
        ])

    def test_validate_only_changes_nothing(self):
        self.run_rows([
            Row("of a new VM, validate_only", "AttachVm",
                self.valid(mac_address=self.vm2.mac, validate_only=True), OK,
                check=expect_vm(vm_id=self.vm2.vm_id, interface=self.vm2.interface,
                                ip_addresses=[self.vm2.address], mac_address=self.vm2.mac,
                                state="VM_STATE_PROGRAMMED")),
            Row("of a new VM whose interface does not exist, validate_only", "AttachVm",
                self.valid(interface="vme9999", validate_only=True), OK,
                check=expect_vm(state="VM_STATE_PENDING")),
            Row("of the VM only validated", "GetVm", {"vm_id": self.vm2.vm_id},
                NOT_FOUND, names=("vm_id",)),
        ])

    def test_malformed_protobuf(self):
        request_class = Api.classes("AttachVm")[0]
        rest = request_class(interface=self.vm2.interface, ip_addresses=[self.vm2.address],
                             validate_only=True).SerializeToString()
        # A complete, valid attach of a new VM (not validate_only), then a broken field: the
        # agent must not apply the valid part.
        applied = request_class(vm_id=self.vm2.vm_id, interface=self.vm2.interface,
                                ip_addresses=[self.vm2.address]).SerializeToString()
        kept = next(iter(self.specs))
        self.run_rows([
            Row("with a vm_id that is not UTF-8", "AttachVm", b"\x0a\x03\xff\xfe\x41" + rest,
                UNPARSABLE, UNPARSABLE_NAMES),
            Row("with an address that is not UTF-8", "AttachVm",
                b"\x0a\x04vm-9\x1a\x02\xc3\x28" + rest, UNPARSABLE, UNPARSABLE_NAMES),
            Row("of four 0xff bytes", "AttachVm", b"\xff\xff\xff\xff", UNPARSABLE,
                UNPARSABLE_NAMES),
            Row("with a length past the end", "AttachVm", b"\x0a\x7fvm-9", UNPARSABLE,
                UNPARSABLE_NAMES),
            Row("with a truncated varint (validate_only)", "AttachVm", rest + b"\x30\x80",
                UNPARSABLE, UNPARSABLE_NAMES),
            Row("of a valid new VM followed by a truncated varint", "AttachVm",
                applied + b"\x30\x80", UNPARSABLE, UNPARSABLE_NAMES),
            Row("of a valid new VM followed by a string that is not UTF-8", "AttachVm",
                applied + b"\x2a\x02\xc3\x28", UNPARSABLE, UNPARSABLE_NAMES),
            # A field of the wrong wire type is an unknown field: vm_id stays empty.
            Row("with vm_id sent as a number", "AttachVm", b"\x08\x01" + rest,
                names=("vm_id",)),
            Row("with a vm_id that is not UTF-8", "DetachVm", b"\x0a\x02\xc3\x28",
                UNPARSABLE, UNPARSABLE_NAMES),
            Row("of a kept VM with a truncated varint", "DetachVm",
                b"\x0a" + bytes([len(kept)]) + kept.encode() + b"\x10\x80", UNPARSABLE,
                UNPARSABLE_NAMES),
            Row("of a kept VM with a request_id that is not UTF-8", "DetachVm",
                b"\x0a" + bytes([len(kept)]) + kept.encode() + b"\x1a\x02\xc3\x28",
                UNPARSABLE, UNPARSABLE_NAMES),
            Row("with a vm_id that is not UTF-8", "GetVm", b"\x0a\x02\xc3\x28", UNPARSABLE,
                UNPARSABLE_NAMES),
            Row("with a length past the end", "GetVm", b"\x0a\x7fvm", UNPARSABLE,
                UNPARSABLE_NAMES),
            Row("with a truncated varint", "ListVms", b"\x10\xff", UNPARSABLE,
                UNPARSABLE_NAMES),
            Row("with a page_token that is not UTF-8", "ListVms", b"\x1a\x02\xc3\x28",
                UNPARSABLE, UNPARSABLE_NAMES),
            Row("with a truncated varint", "ListArp", b"\x18\xff", UNPARSABLE,
                UNPARSABLE_NAMES),
            Row("with an interface that is not UTF-8", "ListArp", b"\x0a\x02\xc3\x28",
                UNPARSABLE, UNPARSABLE_NAMES),
            Row("with a truncated varint", "ListRoutes", b"\x28\x80", UNPARSABLE,
                UNPARSABLE_NAMES),
            Row("with a vm_id that is not UTF-8", "ListRoutes", b"\x12\x02\xc3\x28",
                UNPARSABLE, UNPARSABLE_NAMES),
            Row("with a vm_id that is not UTF-8", "Watch", b"\x0a\x02\xc3\x28", UNPARSABLE,
                UNPARSABLE_NAMES),
            Row("with a truncated varint", "Watch", b"\x10\x80", UNPARSABLE,
                UNPARSABLE_NAMES),
            Row("with an unknown field (ignored), validate_only", "AttachVm",
                b"\x0a\x04vm-9" + rest + b"\xf8\x07\x01", OK),
        ])

    # -- the other RPCs -----------------------------------------------------------------------

    def test_detach_vm(self):
        rows = [Row("with an empty vm_id", "DetachVm", {"vm_id": ""}, names=("vm_id",))]
        rows += [Row(f"with a {what}", "DetachVm", {"vm_id": vm_id}, names=("vm_id",))
                 for what, vm_id in _bad_vm_ids()]
        rows += [
            Row("with a bad vm_id and allow_missing", "DetachVm",
                {"vm_id": "vm 1", "allow_missing": True}, names=("vm_id",)),
            Row("of an unknown VM", "DetachVm", {"vm_id": "vm-unknown"}, NOT_FOUND,
                names=("vm_id", "vm-unknown")),
            Row("of an unknown VM with allow_missing", "DetachVm",
                {"vm_id": "vm-unknown", "allow_missing": True}, OK),
            Row("of VM 1 with a request_id of 129 bytes", "DetachVm",
                {"vm_id": "vm-1", "request_id": "r" * 129}, names=("request_id",)),
            Row("of VM 1 in other letter case", "DetachVm", {"vm_id": "VM-1"}, NOT_FOUND,
                names=("vm_id",)),
        ]
        self.run_rows(rows)

    def test_get_vm(self):
        rows = [Row("with an empty vm_id", "GetVm", {"vm_id": ""}, names=("vm_id",))]
        rows += [Row(f"with a {what}", "GetVm", {"vm_id": vm_id}, names=("vm_id",))
                 for what, vm_id in _bad_vm_ids()]
        rows += [
            Row("of an unknown VM", "GetVm", {"vm_id": "vm-unknown"}, NOT_FOUND,
                names=("vm_id", "vm-unknown")),
            Row("of VM 1", "GetVm", {"vm_id": "vm-1"}, OK,
                check=expect_vm(vm_id="vm-1", mac_address=self.vm1.mac)),
        ]
        self.run_rows(rows)

    def test_list_arp_and_list_routes(self):
        rows = []
        for method, field in (("ListArp", "entries"), ("ListRoutes", "routes")):
            other = "ListRoutes" if method == "ListArp" else "ListArp"
            rows += [
                Row("with page_size -1", method, {"page_size": -1}, names=("page_size",)),
                Row("with page_size -2147483648", method, {"page_size": -2 ** 31},
                    names=("page_size",)),
                Row("with page_size 2147483647 (capped)", method, {"page_size": 2 ** 31 - 1},
                    OK),
                Row("with a page_token that is not base64", method,
                    {"page_token": "garbage!*"}, names=("page_token",)),
                Row("with a page_token that is base64 of nothing it issued", method,
                    {"page_token": "AAAAAAAA"}, names=("page_token",)),
                Row(f"with a page_token from {other}", method,
                    {"page_token": self.tokens[other]}, names=("page_token",)),
                Row("with a page_token from ListVms", method,
                    {"page_token": self.tokens["ListVms"]}, names=("page_token",)),
                Row("with a page_token of 100000 characters", method,
                    {"page_token": "A" * 100000}, names=("page_token",)),
                Row("with a page_token with a NUL byte", method,
                    {"page_token": self.tokens[method] + "\x00"}, names=("page_token",)),
                Row("with an interface filter of 16 bytes", method,
                    {"interface": "vme0123456789abc"}, names=("interface",)),
                Row("with an interface filter of 100000 bytes", method,
                    {"interface": "x" * 100000}, names=("interface",)),
                Row("with the vm_id filter of an unknown VM", method, {"vm_id": "vm-unknown"},
                    OK, check=expect_list(field, lambda e: e == [], "no entries")),
                Row("with its own page_token", method, {"page_token": self.tokens[method]},
                    OK),
            ]
            rows += [Row(f"with a filter {what}", method, {"vm_id": vm_id},
                         names=("vm_id",)) for what, vm_id in _bad_vm_ids()]
        self.run_rows(rows)

    def test_list_vms(self):
        self.run_rows([
            Row("with page_size -1", "ListVms", {"page_size": -1}, names=("page_size",)),
            Row("with page_size -2147483648", "ListVms", {"page_size": -2 ** 31},
                names=("page_size",)),
            Row("with a page_token that is not base64", "ListVms", {"page_token": "%%%"},
                names=("page_token",)),
            Row("with a page_token from ListArp", "ListVms",
                {"page_token": self.tokens["ListArp"]}, names=("page_token",)),
            Row("with a page_token from ListRoutes", "ListVms",
                {"page_token": self.tokens["ListRoutes"]}, names=("page_token",)),
            Row("with a page_token of 100000 characters", "ListVms",
                {"page_token": "A" * 100000}, names=("page_token",)),
            Row("with state 99 (not a VmState)", "ListVms", {"state": 99}, names=("state",)),
            Row("with state -1 (not a VmState)", "ListVms", {"state": -1}, names=("state",)),
            Row("with state VM_STATE_FAILED", "ListVms", {"state": 3}, OK,
                check=expect_list("vms", lambda e: e == [], "no VMs")),
            Row("with state VM_STATE_PROGRAMMED", "ListVms", {"state": 2}, OK,
                check=expect_list("vms", lambda e: [v["vm_id"] for v in e] == ["vm-1"],
                                  "only vm-1")),
            Row("with state VM_STATE_PENDING", "ListVms", {"state": 1}, OK,
                check=expect_list("vms", lambda e: [v["vm_id"] for v in e] == ["vm-0"],
                                  "only vm-0")),
        ])

    def test_watch(self):
        revision = int(self.api.call("GetVm", {"vm_id": "vm-1"}).vm.revision)
        with self.api.stream("Watch", {"initial_snapshot": True}, timeout=5,
                             each="events") as snapshot:
            end = next(e for e in snapshot if e["type"] == "EVENT_TYPE_SNAPSHOT_END")
        current = int(end["revision"])
        rows = [Row(f"with a {what}", "Watch", {"vm_id": vm_id, "initial_snapshot": True},
                    names=("vm_id",)) for what, vm_id in _bad_vm_ids()]
        rows += [
            Row("from the next revision (not made yet)", "Watch",
                {"from_revision": current + 1, "initial_snapshot": True}, OUT_OF_RANGE,
                names=("from_revision",)),
            Row("from revision 2^64-1", "Watch", {"from_revision": 2 ** 64 - 1}, OUT_OF_RANGE,
                names=("from_revision",)),
            Row("from the current revision", "Watch",
                {"from_revision": current, "initial_snapshot": True}, OK),
            Row("from VM 1's revision, of VM 1", "Watch",
                {"vm_id": "vm-1", "from_revision": revision, "initial_snapshot": True}, OK),
            Row("with a negative progress_interval", "Watch",
                {"progress_interval": {"seconds": -1}}, INVALID, names=("progress_interval",)),
            Row("with a progress_interval of 50 ms", "Watch",
                {"progress_interval": {"nanos": 50_000_000}}, INVALID,
                names=("progress_interval",)),
            Row("with a progress_interval of 2 hours", "Watch",
                {"progress_interval": {"seconds": 7200}}, INVALID,
                names=("progress_interval",)),
            Row("with a progress_interval of 0.1 s", "Watch",
                {"progress_interval": {"nanos": 100_000_000}, "initial_snapshot": True}, OK),
        ]
        self.run_rows(rows)

    def test_request_id_cannot_forge_log_lines(self):
        """request_id is echoed in the agent's log: a newline in it must not start a line."""
        forged = "ts=2000-01-01T00:00:00.000Z level=error event=forged"
        request_id = f"r1\n{forged}"  # within the 128 bytes a request_id may have
        try:
            self.rpc("AttachVm", self.valid(request_id=request_id))
            self.rpc("DetachVm", {"vm_id": self.vm2.vm_id, "request_id": request_id})
        except grpcurl.RpcError as e:  # refusing it is fine too, if it names the field
            self.assertEqual((e.code, "request_id" in e.details), (INVALID, True),
                             f"AttachVm with a request_id holding newlines answered {e}")
        finally:
            self.api.call("DetachVm", {"vm_id": self.vm2.vm_id, "allow_missing": True})
        self.assertFalse(has_line_starting(self.lab.daemon.log(), forged),
                         f"a request_id with a newline forged a line in the vmnetd log: "
                         f"{forged!r}")

    def test_z_still_serving(self):  # z: runs after the other tests of the class
        self.assertStillServing(self.valid())


class DeadlineTest(HostileTestCase):
    """An AttachVm whose deadline is shorter than the work (issue 13, item 9): the caller sees
    DEADLINE_EXCEEDED, the agent may still apply it, Watch and GetVm show what it did, and
    retrying the same spec succeeds and changes nothing."""

    vm_count = 4

    def test_attach_past_its_deadline(self):
        events, _ = self.watch_after_snapshot()
        applied = None
        for vm in self.lab.vms.values():
            request = vm_request(vm)
            try:
                self.api.call("AttachVm", request, timeout=0.001)
                self.rpc("DetachVm", {"vm_id": vm.vm_id})  # answered in time: not the case
                continue
            except grpcurl.RpcError as e:
                self.assertEqual(e.code, StatusCode.DEADLINE_EXCEEDED, e)
            # The outcome is on the Watch stream, whatever the caller saw.
            added = events.next_matching(
                lambda e, vm_id=vm.vm_id: (e["type"] == "EVENT_TYPE_VM_ADDED" and
                                           e.get("vm", {}).get("vm_id") == vm_id), timeout=3)
            if added is None:
                # It never reached the agent: then nothing of it may be there either.
                with self.assertRaises(grpcurl.RpcError) as cm:
                    self.rpc("GetVm", {"vm_id": vm.vm_id})
                self.assertEqual(cm.exception.code, NOT_FOUND)
                continue
            applied = (vm, request, added)
            break
        self.assertIsNotNone(applied, "no AttachVm with a 1 ms deadline reached the agent "
                                      "(each one tried expired before it was sent)")
        vm, request, added = applied
        # Watch and GetVm agree, and the kernel holds the VM.
        self.assertEqual(added["vm"]["state"], "VM_STATE_PROGRAMMED", added)
        got = to_dict(self.rpc("GetVm", {"vm_id": vm.vm_id}))["vm"]
        self.assertEqual(got["state"], "VM_STATE_PROGRAMMED", got)
        self.assertEqual(str(got["revision"]), str(added["vm"]["revision"]), (got, added))
        self.assertTrue(any(r.get("dst") == vm.address for r in self.lab.routes()),
                        f"the agent reports {vm.vm_id} PROGRAMMED; the host has no route to "
                        f"{vm.address}")
        # Retrying the same spec: OK, the same VM, the same revision, nothing changed.
        kernel_before, agent_before = self.settled_kernel_state(), self.agent_state()
        retried = to_dict(self.rpc("AttachVm", request))["vm"]
        self.assertEqual(retried["state"], "VM_STATE_PROGRAMMED", retried)
        self.assertEqual(str(retried["revision"]), str(got["revision"]), retried)
        self.assertEqual(kernel_state(self.lab), kernel_before,
                         "\n".join(describe_changes(kernel_before, kernel_state(self.lab))))
        self.assertEqual(self.agent_state(), agent_before)
        # No event after the VM_ADDED: the head of the agent's event log is still there.
        events.close()
        self.assertEqual(self.head_revision(), int(added["revision"]),
                         "the retry of the same spec produced events")


class PermissiveInterfaceTest(HostileTestCase):
    """--interface-pattern='.*': the rules behind the pattern must still hold."""

    vm_count = 1
    daemon_flags = ("--interface-pattern=.*",)

    def test_interface_rules_behind_the_pattern(self):
        vm1 = self.lab.vms[1]
        cases = [
            ("that is the uplink", lab.UPLINK, ("uplink",)),
            ("that is lo (loopback)", "lo", ()),
            ("with a slash (Linux forbids it)", "a/b", ()),
            ("with a space (Linux forbids it)", "a b", ()),
            ("with a colon (Linux forbids it)", "a:b", ()),
            ("that is . (Linux forbids it)", ".", ()),
            ("that is .. (Linux forbids it)", "..", ()),
            ("with a NUL byte", vm1.interface + "\x00", ()),
            ("with a newline", vm1.interface + "\n", ()),
            ("of 16 bytes", "abcdefghijklmnop", ("15",)),
        ]
        rows = [Row(f"with an interface {what}", "AttachVm",
                    vm_request(vm1, interface=interface), names=("interface", *reason))
                for what, interface, reason in cases]
        rows.append(Row("with any other name, validate_only", "AttachVm",
                        vm_request(vm1, interface="tap-vm_1.x", validate_only=True), OK,
                        check=expect_vm(state="VM_STATE_PENDING")))
        self.run_rows(rows)

    def test_z_still_serving(self):
        self.assertStillServing(vm_request(self.lab.vms[1]))


class LimitsTest(HostileTestCase):
    """Small limits: 2 VMs, 2 watchers, requests of 4096 bytes."""

    vm_count = 3
    max_request_bytes = 4096
    watch_history = 4
    daemon_flags = ("--max-vms=2", "--max-watchers=2",
                    f"--max-request-bytes={max_request_bytes}",
                    f"--watch-history={watch_history}")

    def while_watchers_end(self, open_stream):
        """open_stream() retried for up to 5 s while it is refused for --max-watchers: the
        Watches an earlier test cancelled end asynchronously in the agent."""
        def attempt():
            try:
                return open_stream()
            except grpcurl.RpcError as error:
                if error.code != EXHAUSTED or "--max-watchers" not in error.details:
                    raise
                return None
        result = lab.wait_until(attempt, 5)
        self.assertIsNotNone(result, "a Watch was still refused for --max-watchers 5 s after "
                                     "the earlier tests cancelled theirs")
        return result

    def watch_after_snapshot(self):
        return self.while_watchers_end(super().watch_after_snapshot)

    def test_max_vms(self):
        vm1, vm2, vm3 = (self.lab.vms[i] for i in (1, 2, 3))
        self.addCleanup(self.specs.clear)
        for vm in (vm1, vm2):
            self.rpc("AttachVm", vm_request(vm))
            self.addCleanup(self.api.call, "DetachVm", {"vm_id": vm.vm_id,
                                                        "allow_missing": True})
            self.specs[vm.vm_id] = vm_request(vm)
        changed = vm_request(vm1, ip_addresses=[vm1.address, "198.51.100.71"])
        self.run_rows([
            Row("of a third VM (--max-vms=2)", "AttachVm", vm_request(vm3), EXHAUSTED,
                names=("--max-vms",)),
            Row("of a third VM, validate_only", "AttachVm",
                vm_request(vm3, validate_only=True), EXHAUSTED, names=("--max-vms",)),
            Row("of VM 1 again (no new VM)", "AttachVm", vm_request(vm1), OK),
        ])
        # A VM already held may still change; a detach makes room for the third.
        self.rpc("AttachVm", changed)
        self.specs[vm1.vm_id] = changed
        self.rpc("DetachVm", {"vm_id": vm2.vm_id})
        response = self.rpc("AttachVm", vm_request(vm3))
        self.addCleanup(self.api.call, "DetachVm", {"vm_id": vm3.vm_id, "allow_missing": True})
        self.assertEqual(response.vm.state, state_number("VM_STATE_PROGRAMMED"),
                         f"after DetachVm vm-2, AttachVm vm-3 answered {to_dict(response)}")

    def open_watch(self):
        """A Watch that the agent accepted (it sent its snapshot), left open; None when the
        agent refused it. A watcher counts once its first message arrives."""
        stream = self.api.stream("Watch", {"initial_snapshot": True}, each="events")
        self.addCleanup(stream.cancel)
        try:
            first_message(stream, cancel=False)
            return stream
        except grpcurl.RpcError:
            return None

    def test_max_watchers(self):
        # Watches of earlier tests end asynchronously: wait until both slots are free.
        held = [lab.wait_until(self.open_watch, 5) for _ in range(2)]
        self.assertTrue(all(held), "two Watches with --max-watchers=2 were not accepted "
                                   "within 5 s")
        with self.assertRaises(grpcurl.RpcError, msg="a third Watch with --max-watchers=2 "
                                                     "was accepted") as caught:
            first_message(self.api.stream("Watch", {"initial_snapshot": True}, each="events"))
        self.assertEqual(caught.exception.code, EXHAUSTED,
                         f"a third Watch answered {caught.exception}")
        self.assertIn("--max-watchers", caught.exception.details,
                      f"a third Watch answered {caught.exception}")
        held[0].cancel()
        self.assertTrue(lab.wait_until(self.open_watch, 5),
                        "5 s after a client cancelled its Watch, a new Watch is still refused "
                        "(--max-watchers=2)")

    def test_watch_from_before_the_history(self):
        vm3 = self.lab.vms[3]
        for _ in range(self.watch_history):  # two events each: more than the history holds
            self.rpc("AttachVm", vm_request(vm3))
            self.rpc("DetachVm", {"vm_id": vm3.vm_id})
        def snapshot_end():
            with self.api.stream("Watch", {"initial_snapshot": True}, timeout=5,
                                 each="events") as snapshot:
                return next(e for e in snapshot if e["type"] == "EVENT_TYPE_SNAPSHOT_END")
        end = self.while_watchers_end(snapshot_end)
        oldest = int(end["revision"]) - self.watch_history + 1
        self.run_rows([
            Row(f"from revision 1 (--watch-history={self.watch_history}, revision now "
                f"{end['revision']})", "Watch", {"from_revision": 1}, OUT_OF_RANGE,
                names=("from_revision",)),
            Row("from two revisions before the oldest retained (one event lost)", "Watch",
                {"from_revision": oldest - 2}, OUT_OF_RANGE, names=("from_revision",)),
            Row("from the revision before the oldest retained", "Watch",
                {"from_revision": oldest - 1, "initial_snapshot": True}, OK),
        ])

    def test_request_over_max_request_bytes(self):
        addresses = [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(1000)]
        request = vm_request(self.lab.vms[3], ip_addresses=addresses)
        size = len(Api.serialize("AttachVm", request))
        self.assertGreater(size, self.max_request_bytes)
        rows = [
            Row(f"of {size} bytes (--max-request-bytes={self.max_request_bytes})", "AttachVm",
                request, EXHAUSTED),
            Row("with a vm_id of 5000 bytes", "AttachVm",
                vm_request(self.lab.vms[3], vm_id="v" * 5000), EXHAUSTED),
            Row("with a page_token of 5000 bytes", "ListRoutes", {"page_token": "A" * 5000},
                EXHAUSTED),
            Row("with a vm_id of 5000 bytes", "Watch", {"vm_id": "v" * 5000}, EXHAUSTED),
            Row("with a vm_id of 3000 bytes (under the limit)", "GetVm", {"vm_id": "v" * 3000},
                INVALID, names=("vm_id",)),
        ]
        self.run_rows(rows)

    def test_z_still_serving(self):
        self.assertStillServing(vm_request(self.lab.vms[3]))


# -- 2. concurrency ---------------------------------------------------------------------------

@dataclasses.dataclass
class PoolVm:
    index: int
    vm_id: str
    interface: str
    addresses: list  # the addresses this VM may take: no other VM ever has them
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    spec: object = None  # (sorted addresses, mac) when attached, per the last acknowledgement


class ConcurrencyTest(HostileTestCase):
    """8 clients, a pool of 40 VMs (veth pairs with both ends on the host, no traffic), for a
    bounded time; then the kernel must hold exactly the final desired state."""

    vm_count = 0
    pool_size = 40
    clients = 8
    seconds = 20.0
    # A route and a proxy entry of an administrator in the VMs' range: never touched.
    foreign_route = "198.19.254.0/24"
    foreign_proxy = "198.19.255.7"

    @classmethod
    def prepare_host(cls):
        cls.pool = []
        commands = []
        for i in range(cls.pool_size):
            vm = PoolVm(index=i, vm_id=f"pool-{i:02d}", interface=f"vme{0xc00 + i:x}",
                        addresses=[f"198.18.{i}.{n}" for n in range(1, 9)])
            peer = f"vmp{0xc00 + i:x}"  # does not match vme[0-9a-f]{1,12}
            commands += [f"link add {vm.interface} type veth peer name {peer}",
                         f"link set {peer} up"]
            cls.pool.append(vm)
        commands += [f"route add {cls.foreign_route} dev {lab.UPLINK}",
                     f"neigh add proxy {cls.foreign_proxy} dev {lab.UPLINK}"]
        cls.lab.ip_batch(cls.lab.host, commands, timeout=COMMAND_TIMEOUT)

    def test_concurrent_attach_change_detach(self):
        seed = int(os.environ.get("VMNET_TEST_SEED", time.time_ns() % 1000000))
        print(f"\nConcurrencyTest: seed {seed} (VMNET_TEST_SEED={seed} repeats each client's "
              f"choices)",
              file=sys.stderr)
        counts = collections.Counter()
        problems = []
        problems_lock = threading.Lock()
        deadline = time.monotonic() + self.seconds
        programmed = state_number("VM_STATE_PROGRAMMED")

        def count(what):
            with problems_lock:
                counts[what] += 1

        def problem(text):
            with problems_lock:
                if len(problems) < 20:
                    problems.append(text)

        def random_spec(rng, vm):
            addresses = sorted(rng.sample(vm.addresses, rng.randint(1, 4)),
                               key=lambda a: tuple(int(o) for o in a.split(".")))
            mac = f"52:54:00:c0:{vm.index:02x}:{rng.randint(1, 255):02x}" \
                if rng.random() < 0.3 else ""
            return addresses, mac

        def attach(api, vm, spec):
            request = {"vm_id": vm.vm_id, "interface": vm.interface,
                       "ip_addresses": spec[0], "mac_address": spec[1]}
            response = api.call("AttachVm", request)
            got = to_dict(response.vm)
            if response.vm.state != programmed or sorted(got.get("ip_addresses", [])) != \
                    sorted(spec[0]) or got.get("mac_address", "") != spec[1]:
                problem(f"AttachVm {request} answered {got}")
            vm.spec = spec

        def one_operation(api, rng):
            vm = rng.choice(self.pool)
            roll = rng.random()
            if roll < 0.05:  # take an address another VM holds: ALREADY_EXISTS
                other = rng.choice([o for o in self.pool if o is not vm])
                first, second = sorted((vm, other), key=lambda v: v.index)
                with first.lock, second.lock:
                    if other.spec is None:
                        count("steal skipped")
                        return
                    taken = rng.choice(other.spec[0])
                    try:
                        api.call("AttachVm", {"vm_id": vm.vm_id, "interface": vm.interface,
                                              "ip_addresses": [taken]})
                        problem(f"AttachVm {vm.vm_id} with {taken}, held by {other.vm_id}, "
                                f"was accepted")
                        vm.spec = ([taken], "")
                    except grpcurl.RpcError as e:
                        if e.code != EXISTS or other.vm_id not in e.details:
                            raise
                    count("steal refused")
                return
            with vm.lock:
                if roll < 0.50:
                    attach(api, vm, random_spec(rng, vm))
                    count("attach or change")
                elif roll < 0.60:
                    if vm.spec is None:
                        attach(api, vm, random_spec(rng, vm))
                    else:
                        attach(api, vm, vm.spec)  # the same spec: a no-op
                    count("attach same")
                elif roll < 0.90:
                    try:
                        api.call("DetachVm", {"vm_id": vm.vm_id})
                        if vm.spec is None:
                            problem(f"DetachVm {vm.vm_id}, not attached, answered OK")
                    except grpcurl.RpcError as e:
                        if e.code != NOT_FOUND or vm.spec is not None:
                            raise
                        count("detach not found")
                    vm.spec = None
                    count("detach")
                else:
                    try:
                        got = to_dict(api.call("GetVm", {"vm_id": vm.vm_id}).vm)
                        if vm.spec is None:
                            problem(f"GetVm {vm.vm_id}, detached, answered {got}")
                        elif (got.get("ip_addresses"), got.get("mac_address", "")) != \
                                (vm.spec[0], vm.spec[1]):
                            problem(f"GetVm {vm.vm_id} answered {got}; last acknowledged "
                                    f"spec {vm.spec}")
                    except grpcurl.RpcError as e:
                        if e.code != NOT_FOUND or vm.spec is not None:
                            raise
                    count("get")

        def client(number):
            rng = random.Random(seed * 100 + number)
            api = Api(self.lab.daemon.target)
            try:
                while time.monotonic() < deadline:
                    try:
                        one_operation(api, rng)
                        count("ops")
                    except grpcurl.RpcError as e:
                        count(f"error {e.code.name}")
                        problem(f"unexpected {e.code.name}: {e.details}")
            except Exception as e:  # noqa: BLE001  (reported, not lost in a thread)
                problem(f"client {number} stopped: {e!r}")
            finally:
                api.close()

        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.seconds + 2 * CALL_TIMEOUT)
        elapsed = time.monotonic() - started
        stuck = sum(t.is_alive() for t in threads)
        print(f"ConcurrencyTest: {counts['ops']} operations in {elapsed:.1f} s "
              f"({counts['ops'] / elapsed:.0f}/s) by {self.clients} clients on "
              f"{self.pool_size} VMs: {dict(sorted(counts.items()))}", file=sys.stderr)
        self.assertEqual(stuck, 0, f"{stuck} clients still wait for an answer "
                                   f"{2 * CALL_TIMEOUT:.0f} s after the deadline")
        self.assertEqual(problems, [], "clients saw unexpected answers")
        self.assertGreater(counts["detach"] - counts["detach not found"], 0,
                           "no VM was ever detached (the mix did not run)")

        attached = {vm.vm_id: vm for vm in self.pool if vm.spec is not None}
        print(f"ConcurrencyTest: {len(attached)} of {self.pool_size} VMs attached at the end",
              file=sys.stderr)
        converged = lab.wait_until(lambda: not self.final_state_problems(), 5)
        self.assertTrue(converged, "after the clients stopped, the host does not hold exactly "
                                 "the last acknowledged state:\n" +
                        "\n".join(self.final_state_problems()))

    def final_state_problems(self):
        """How the host and the agent differ from the pool's last acknowledged specs."""
        attached = [vm for vm in self.pool if vm.spec is not None]
        problems = []
        want_routes = {(a, vm.interface) for vm in attached for a in vm.spec[0]}
        routes = self.lab.ip_json(self.lab.host, "-d", "route", "show", "table", "all",
                                  "proto", ROUTE_PROTOCOL)
        have_routes = {(r["dst"], r.get("dev")) for r in routes}
        problems += [f"no route {a}/32 dev {d} proto {ROUTE_PROTOCOL}"
                     for a, d in sorted(want_routes - have_routes)]
        problems += [f"stray route {a} dev {d} proto {ROUTE_PROTOCOL}"
                     for a, d in sorted(have_routes - want_routes)]
        problems += [f"route {r['dst']} is in table {r.get('table', 'main')} scope "
                     f"{r.get('scope')}" for r in routes
                     if r.get("table", "main") != "main" or r.get("scope") != "link"]

        want_proxies = {(a, lab.UPLINK) for vm in attached for a in vm.spec[0]}
        want_proxies.add((self.foreign_proxy, lab.UPLINK))
        have_proxies = {(p["dst"], p.get("dev")) for p in self.lab.proxy_entries()}
        problems += [f"no proxy entry {a} dev {d}" for a, d in sorted(want_proxies - have_proxies)]
        problems += [f"stray proxy entry {a} dev {d}"
                     for a, d in sorted(have_proxies - want_proxies)]

        want_permanent = {(a, vm.interface, vm.spec[1]) for vm in attached if vm.spec[1]
                          for a in vm.spec[0]}
        neighbours = self.lab.ip_json(self.lab.host, "-4", "neigh", "show", "nud", "permanent")
        have_permanent = {(n["dst"], n.get("dev"), n.get("lladdr")) for n in neighbours
                          if n.get("dev", "").startswith("vme")}
        problems += [f"no permanent neighbour {a} dev {d} lladdr {m}"
                     for a, d, m in sorted(want_permanent - have_permanent)]
        problems += [f"stray permanent neighbour {a} dev {d} lladdr {m}"
                     for a, d, m in sorted(have_permanent - want_permanent)]

        links = {link["ifname"]: link for link in self.lab.ip_json(self.lab.host, "addr", "show")}
        for vm in self.pool:
            link = links.get(vm.interface, {})
            gateway = any(a.get("local") == lab.GATEWAY and a.get("prefixlen") == 32
                          for a in link.get("addr_info", []))
            if vm.spec is not None and not gateway:
                problems.append(f"no {lab.GATEWAY}/32 on {vm.interface} ({vm.vm_id} attached)")
            if vm.spec is None and gateway:
                problems.append(f"{lab.GATEWAY}/32 still on {vm.interface} ({vm.vm_id} "
                                f"detached)")
            if vm.spec is not None and "UP" not in link.get("flags", []):
                problems.append(f"{vm.interface} is not up ({vm.vm_id} attached)")

        if not any(r["dst"] == self.foreign_route for r in self.lab.routes()):
            problems.append(f"the administrator's route {self.foreign_route} is gone")

        listed = {v["vm_id"]: v for v in self.api.list_all("ListVms", "vms")}
        want = {vm.vm_id: (vm.interface, vm.spec[0], vm.spec[1], "VM_STATE_PROGRAMMED")
                for vm in attached}
        have = {i: (v.get("interface"), v.get("ip_addresses"), v.get("mac_address", ""),
                    v.get("state")) for i, v in listed.items()}
        for vm_id in sorted(set(want) | set(have)):
            if want.get(vm_id) != have.get(vm_id):
                problems.append(f"ListVms has {vm_id} as {have.get(vm_id)}; last acknowledged "
                                f"{want.get(vm_id)}")
        owners = {a: vm.vm_id for vm in attached for a in vm.spec[0]}
        for route in self.api.list_all("ListRoutes", "routes"):
            address = route["destination"].removesuffix("/32")
            if route.get("protocol") == "vmnet" and route.get("vm_id") != owners.get(address):
                problems.append(f"ListRoutes shows {route}; its VM is {owners.get(address)}")
        return problems


if __name__ == "__main__":
    skips.main()
