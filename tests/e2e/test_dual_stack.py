#!/usr/bin/python3
"""End-to-end test of dual-stack VMs (issue #5): vmnetd in a dual-stack namespace lab.

  Computer X ── LAN ── eth0 (uplink) [ HOST ] vme1a ══ eth0 [ VM 1 ]  198.51.100.201/32
  198.51.100.10        198.51.100.1              fe80::ffff:1:1       2001:db8:1::201/128
  2001:db8:1::10/64    2001:db8:1::1/64   vme2a ══ eth0 [ VM 2 ]  198.51.100.202/32
                                                                      2001:db8:1::202/128

Each VM's IPv6 default route is `via fe80::ffff:1:1 dev eth0`; the host has no IPv6 default
route. Per IPv6 address vmnetd must install a /128 route to the VM link (protocol 237), a proxy
NDP entry on the uplink and the gateway fe80::ffff:1:1/128 on the VM link, and turn on IPv6
forwarding and proxy_ndp; what a user checks is `ip`, the sysctls and pings of both families.

Classes: DualStackTest (two VMs attached: kernel objects, sysctls, reachability, the lists'
family filter, rejected requests), DetachTest, SpecTest (an IPv6-only VM, a non-canonical
address, a changed address), DriftRepairTest (IPv6 objects and settings someone changed are put
back), AnnouncementTest (X's neighbour entries are corrected by gratuitous ARP and unsolicited
NA without X asking: on attach, when a pending VM's link appears), AnnounceCountTest
(--announce-count, --announce-interval), RestartAnnouncementTest (on an agent restart), DadTest
(--dad: an address another machine holds fails the VM and is not published) and DadRetryTest.

Needs root and the vmnetd binary (<repo>/build/server/vmnetd, or set VMNETD); skips without
root, fails as root when it cannot run (tests/skips.py):

    /usr/bin/python3 tests/e2e/test_dual_stack.py [-v] [TestClass.test_method]
"""

import ipaddress
import os
import re
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import skips  # noqa: E402  (tests/skips.py: no skips as root)
import lab  # noqa: E402  (first: it explains a missing grpc module)
import grpcurl  # noqa: E402
from grpc import StatusCode  # noqa: E402
from test_host_routed import LabTestCase, REACH_DEADLINE, PROGRAM_DEADLINE  # noqa: E402
from test_port_security import Sniffer  # noqa: E402  (a sniffer of frames in a namespace)

AGENT_PROTOCOLS = (lab.AGENT_PROTOCOL, "vmnet")  # `ip -j` prints the name when rt_protos has it
WRONG_MAC = "02:00:00:00:00:99"  # a neighbour entry X holds before the VM is attached
WRONG_GATEWAY_MAC = "02:00:00:00:00:98"  # the VM's entry for its gateways before attach
ANNOUNCE_WAIT = 2.5  # the first announcement is due at once; 3 of them within 2 s by default
DAD_WAIT = 10  # --dad-timeout (1 s) plus the programming around it
IPV6_SYSCTLS = "net/ipv6/conf"
SETTLE_TIMEOUT = 30  # for the kernel to process a link's carrier (see assertReaches)
METRICS_FLAG = "--metrics-listen=127.0.0.1:9447"  # loopback of the lab's host namespace
ANNOUNCEMENTS_METRIC = "vmnet_announcements_sent_total"
DAD_CONFLICTS_METRIC = "vmnet_dad_conflicts_total"


def network(dst, family_bits):
    """`ip -j route`'s dst ("default", "2001:db8:1::201", "fe80::/64") as an ip_network."""
    if dst == "default":
        return ipaddress.ip_network("::/0" if family_bits == 128 else "0.0.0.0/0")
    return ipaddress.ip_network(dst if "/" in dst else f"{dst}/{family_bits}", strict=False)


def is_ipv6(text):
    return ipaddress.ip_address(text.split("/")[0]).version == 6


class DualStackTestCase(LabTestCase):
    """LabTestCase on a dual-stack lab; `vms_without_link` as for lab.Lab."""

    vms_without_link = ()

    @classmethod
    def setUpClass(cls):
        cls.lab = cls.enterClassContext(lab.Lab(vm_count=cls.vm_count, ipv6=True,
                                                vms_without_link=cls.vms_without_link))
        cls.prepare_host()
        cls.lab.start_daemon(*cls.daemon_flags)
        cls.client = cls.enterClassContext(grpcurl.Client(cls.lab.daemon.target))

    @classmethod
    def attach(cls, vm, with_mac=False, **overrides):
        """AttachVm with both of the VM's addresses."""
        return super().attach(vm, with_mac, **{"ip_addresses": vm.addresses, **overrides})

    # -- kernel views ----------------------------------------------------------------------------

    def kernel_route6(self, address):
        return next((r for r in self.lab.routes6()
                     if network(r["dst"], 128) == ipaddress.ip_network(f"{address}/128")), None)

    def kernel_proxy6(self, address, dev=lab.UPLINK):
        return next((p for p in self.lab.proxy_entries6()
                     if p["dst"] == address and p.get("dev") == dev), None)

    def has_gateway6(self, dev):
        return any(a["local"] == lab.GATEWAY6 and a["prefixlen"] == 128
                   for a in self.lab.addresses6(dev))

    def missing_objects6(self, vm):
        """What the host lacks of the VM's IPv6 network."""
        missing = []
        route = self.kernel_route6(vm.address6)
        if route is None or route.get("dev") != vm.interface:
            missing.append(f"route {vm.address6}/128 dev {vm.interface} (have {route})")
        elif route.get("protocol") not in AGENT_PROTOCOLS:
            missing.append(f"route {vm.address6}/128 proto {lab.AGENT_PROTOCOL} (have {route})")
        if self.kernel_proxy6(vm.address6) is None:
            missing.append(f"proxy entry {vm.address6} dev {lab.UPLINK}")
        if not self.has_gateway6(vm.interface):
            missing.append(f"address {lab.GATEWAY6}/128 dev {vm.interface}")
        return missing

    def final_state(self, vm_id, state):
        """GetVm's vm once it reached `state` (waiting up to DAD_WAIT), the last one otherwise."""
        last = {}

        def reached():
            last.update(self.call("GetVm", {"vm_id": vm_id})["vm"])
            return last.get("state") == state

        lab.wait_until(reached, DAD_WAIT, interval=0.2)
        return last

    def assertReaches(self, ns, address, who):
        # A link whose carrier the kernel's (machine-wide, rate-limited) linkwatch has not
        # processed yet drops every packet: on a busy machine that can take seconds after the
        # agent brings a VM link up. Wait for it (bounded), so that a failure is the agent's.
        lab.wait_until(self.lab.ipv6_settled, SETTLE_TIMEOUT)
        self.assertTrue(self.lab.ping(ns, address, deadline=REACH_DEADLINE),
                        f"{who} cannot ping {address} within {REACH_DEADLINE} s (host links "
                        f"not settled: {self.lab.ipv6_unsettled()})")

    def x_neighbour(self, address):
        """X's neighbour entry for `address` on its eth0, or None."""
        return next((n for n in self.lab.ip_json(self.lab.x, "neigh", "show", "dev", "eth0")
                     if n["dst"] == address), None)


class DualStackTest(DualStackTestCase):
    """Two dual-stack VMs attached (VM 1 with its MAC); the uplink had accept_ra=1 before the
    agent started."""

    @classmethod
    def prepare_host(cls):
        cls.lab.set_sysctl(f"{IPV6_SYSCTLS}/{lab.UPLINK}/accept_ra", 1)
        cls.sysctls_before = {name: cls.lab.sysctl(f"{IPV6_SYSCTLS}/{name}")
                              for name in ("all/forwarding", f"{lab.UPLINK}/proxy_ndp",
                                           f"{lab.UPLINK}/accept_ra")}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.vm1, cls.vm2 = cls.lab.vms[1], cls.lab.vms[2]
        cls.reachable_before_attach = cls.lab.ping(cls.lab.x, cls.vm1.address6, count=2)
        cls.responses = {cls.vm1.vm_id: cls.attach(cls.vm1, with_mac=True),
                         cls.vm2.vm_id: cls.attach(cls.vm2)}

    def tearDown(self):
        self.detach("vm-invalid", allow_missing=True)

    # -- the API's answers -----------------------------------------------------------------------

    def test_attach_reports_programmed_with_both_addresses(self):
        for vm in (self.vm1, self.vm2):
            got = self.responses[vm.vm_id].get("vm", {})
            self.assertEqual((got.get("state"), got.get("ip_addresses")),
                             ("VM_STATE_PROGRAMMED", [vm.address, vm.address6]),
                             f"AttachVm {vm.vm_id} with {vm.addresses} answered {got}")

    def test_get_vm_and_watch_carry_ipv6(self):
        got = self.call("GetVm", {"vm_id": "vm-2"}).get("vm", {})
        self.assertEqual(got.get("ip_addresses"), self.vm2.addresses, f"GetVm vm-2 answered {got}")
        events, _ = self.watch_after_snapshot()
        snapshot = {e["vm"]["vm_id"]: e["vm"].get("ip_addresses") for e in events.seen
                    if e["type"] == "EVENT_TYPE_SNAPSHOT"}
        self.assertEqual(snapshot.get("vm-1"), self.vm1.addresses,
                         f"Watch's snapshot shows vm-1 as {events.seen}")

    # -- what the host shows -----------------------------------------------------------------------

    def test_vm_unreachable_over_ipv6_before_attach(self):
        self.assertFalse(self.reachable_before_attach,
                         f"X could ping {self.vm1.address6} before AttachVm")

    def test_ipv6_objects_on_the_host(self):
        for vm in (self.vm1, self.vm2):
            self.assertEqual(self.missing_objects6(vm), [],
                             f"`ip -6 route`, `ip -6 neigh show proxy` or `ip -6 addr` lack part "
                             f"of {vm.vm_id}'s IPv6 network")

    def test_route_and_proxy_entry_marked_alike(self):
        for vm in (self.vm1, self.vm2):
            route, proxy = self.kernel_route6(vm.address6), self.kernel_proxy6(vm.address6)
            self.assertIsNotNone(proxy, f"`ip -6 neigh show proxy` has no {vm.address6}")
            self.assertIn(proxy.get("protocol"), AGENT_PROTOCOLS,
                          f"proxy entry {proxy} is not marked as the agent's")
            self.assertEqual(route.get("protocol"), proxy.get("protocol"),
                             f"route {route} and proxy entry {proxy} carry different markers")

    def test_proxy_entries_in_ip_neigh_show_proxy(self):
        text = self.lab.run(self.lab.host, "ip", "-6", "neigh", "show", "proxy").stdout
        for vm in (self.vm1, self.vm2):
            self.assertRegex(text, rf"(?m)^{re.escape(vm.address6)} dev {lab.UPLINK} .*proxy",
                             f"`ip -6 neigh show proxy` lacks {vm.address6} on {lab.UPLINK}")

    def test_ipv6_sysctls(self):
        expected = {"all/forwarding": "1", f"{lab.UPLINK}/proxy_ndp": "1",
                    f"{self.vm1.interface}/accept_ra": "0", f"{self.vm2.interface}/accept_ra": "0",
                    f"{lab.UPLINK}/accept_ra": "2"}
        got = {name: self.lab.sysctl(f"{IPV6_SYSCTLS}/{name}") for name in expected}
        self.assertEqual(got, expected,
                         f"/proc/sys/{IPV6_SYSCTLS}/* in the host namespace (before the agent: "
                         f"{self.sysctls_before})")

    def test_accept_ra_change_logged(self):
        self.assertEqual(self.sysctls_before[f"{lab.UPLINK}/accept_ra"], "1",
                         "precondition: the uplink's accept_ra was not 1 before the agent")
        lines = [line for line in self.lab.daemon.log().splitlines()
                 if "accept_ra" in line and lab.UPLINK in line]
        self.assertTrue(lines, f"vmnetd's log has no line about accept_ra on {lab.UPLINK}")
        # The line names the setting and both values as key=value fields (a bare "2" would
        # match every line's timestamp).
        pattern = re.compile(rf"\bsetting=net\.ipv6\.conf\.{re.escape(lab.UPLINK)}\.accept_ra"
                             rf" old=1 new=2\b")
        self.assertTrue(any(pattern.search(line) for line in lines),
                        f"vmnetd's log does not say accept_ra on {lab.UPLINK} went from 1 to 2: "
                        f"{lines}")

    def test_vm_mac_installed_as_permanent_ipv6_neighbour(self):
        entries = self.lab.neighbours6(self.vm1.interface)
        mine = [n for n in entries if n["dst"] == self.vm1.address6]
        self.assertTrue(mine and mine[0].get("lladdr") == self.vm1.mac
                        and "PERMANENT" in mine[0].get("state", []),
                        f"`ip -6 neigh show dev {self.vm1.interface}` has no permanent "
                        f"{self.vm1.address6} lladdr {self.vm1.mac}: {entries}")
        listed = [e for e in self.call("ListArp", {"vm_id": "vm-1",
                                                   "family": "ADDRESS_FAMILY_IPV6"})["entries"]
                  if e["ip_address"] == self.vm1.address6 and not e["proxy"]]
        self.assertEqual([(e["interface"], e["lladdr"], e["state"]) for e in listed],
                         [(self.vm1.interface, self.vm1.mac, "PERMANENT")],
                         f"ListArp vm_id=vm-1 family=IPV6 shows {listed}")

    def test_host_has_no_ipv6_default_route(self):
        defaults = [r for r in self.lab.routes6() if r["dst"] == "default"]
        self.assertEqual(defaults, [], "the host has an IPv6 default route (the lab has none, "
                                       "and the agent must not add one)")

    # -- reachability ----------------------------------------------------------------------------

    def test_x_reaches_both_vms_over_ipv6(self):
        for vm in (self.vm1, self.vm2):
            self.assertReaches(self.lab.x, vm.address6, "X")

    def test_vms_reach_x_over_ipv6_through_the_link_local_gateway(self):
        for vm in (self.vm1, self.vm2):
            self.assertReaches(vm.ns, lab.X_ADDRESS6, f"VM {vm.index}")
            host_mac = self.lab.mac(vm.interface)
            gateway = next((n for n in self.lab.neighbours6(lab.VM_LINK, ns=vm.ns)
                            if n["dst"] == lab.GATEWAY6), None)
            self.assertTrue(gateway and gateway.get("lladdr") == host_mac,
                            f"VM {vm.index}'s neighbour entry for its gateway {lab.GATEWAY6} is "
                            f"{gateway}, not the host's {vm.interface} ({host_mac})")
            self.assertIn("router", gateway, f"{lab.GATEWAY6} did not answer as a router: "
                                             f"{gateway}")

    def test_vm1_reaches_vm2_over_ipv6(self):
        self.assertReaches(self.vm1.ns, self.vm2.address6, "VM 1")
        self.assertReaches(self.vm2.ns, self.vm1.address6, "VM 2")

    def test_both_families_at_the_same_time(self):
        for address in self.vm1.addresses:  # resolved first: then no echo request is lost
            self.assertReaches(self.lab.x, address, "X")
        pingers = [self.lab.start_ping(self.lab.x, address, 20, 0.05)
                   for address in self.vm1.addresses]
        pingers += [self.lab.start_ping(self.vm2.ns, address, 20, 0.05)
                    for address in (lab.X_ADDRESS, lab.X_ADDRESS6)]
        results = [(pinger.command[-1], pinger.wait()) for pinger in pingers]
        for address, (sent, received) in results:
            self.assertEqual((sent, received), (20, 20),
                             f"pings of both families at once: {address} answered "
                             f"{received} of {sent}: {results}")

    # -- the lists' family filter -----------------------------------------------------------

    def kernel_neighbours(self, family_flag):
        """(address, interface) of every neighbour and proxy entry `ip FAMILY neigh` shows."""
        entries = set()
        for args in (("neigh", "show"), ("neigh", "show", "proxy")):
            for n in self.lab.ip_json(self.lab.host, family_flag, *args):
                entries.add((n["dst"], n.get("dev")))
        return entries

    def test_list_arp_family_ipv6(self):
        before = self.kernel_neighbours("-6")
        entries = self.call("ListArp", {"family": "ADDRESS_FAMILY_IPV6"}).get("entries", [])
        after = self.kernel_neighbours("-6")
        listed = {(e["ip_address"], e["interface"]) for e in entries}
        self.assertEqual([e for e in entries if not is_ipv6(e["ip_address"])], [],
                         "ListArp family=IPV6 returned IPv4 entries")
        for vm in (self.vm1, self.vm2):
            mine = [e for e in entries
                    if e["ip_address"] == vm.address6 and e["interface"] == lab.UPLINK]
            self.assertEqual([(e["vm_id"], e["proxy"], e["family"]) for e in mine],
                             [(vm.vm_id, True, "ADDRESS_FAMILY_IPV6")],
                             f"ListArp family=IPV6 shows the proxy entry {vm.address6} on "
                             f"{lab.UPLINK} as {mine}: {entries}")
        self.assertLessEqual(before & after, listed,
                             "ListArp family=IPV6 lacks entries that `ip -6 neigh show` and "
                             "`ip -6 neigh show proxy` showed before and after the call")
        self.assertLessEqual(listed, before | after,
                             "ListArp family=IPV6 shows entries that `ip -6 neigh show` and "
                             "`ip -6 neigh show proxy` did not")

    def test_list_arp_family_ipv4(self):
        entries = self.call("ListArp", {"family": "ADDRESS_FAMILY_IPV4"}).get("entries", [])
        self.assertEqual([e for e in entries if is_ipv6(e["ip_address"])], [],
                         "ListArp family=IPV4 returned IPv6 entries")
        self.assertLessEqual({self.vm1.address, self.vm2.address},
                             {e["ip_address"] for e in entries},
                             f"ListArp family=IPV4 lacks the VMs' proxy entries: {entries}")

    def test_list_arp_all_families(self):
        addresses = {e["ip_address"] for e in self.call("ListArp").get("entries", [])}
        self.assertLessEqual({self.vm1.address, self.vm1.address6}, addresses,
                             "ListArp without a family lacks VM 1's IPv4 or IPv6 proxy entry")

    def kernel_routes6(self):
        return {(network(r["dst"], 128), r.get("dev")) for r in self.lab.routes6()}

    def test_list_routes_family_ipv6(self):
        before = self.kernel_routes6()
        routes = self.call("ListRoutes", {"family": "ADDRESS_FAMILY_IPV6"}).get("routes", [])
        after = self.kernel_routes6()
        self.assertEqual([r for r in routes if not is_ipv6(r["destination"])], [],
                         "ListRoutes family=IPV6 returned IPv4 routes")
        for vm in (self.vm1, self.vm2):
            mine = [r for r in routes if r["destination"] == f"{vm.address6}/128"]
            self.assertEqual([(r["interface"], r["vm_id"], r["protocol"] in AGENT_PROTOCOLS)
                              for r in mine], [(vm.interface, vm.vm_id, True)],
                             f"ListRoutes family=IPV6 shows {vm.address6}/128 as {mine}")
        agents = self.lab.run(self.lab.host, "ip", "-6", "route", "show", "table", "main",
                              "proto", lab.AGENT_PROTOCOL).stdout
        kernel = {str(network(line.split()[0], 128)) for line in agents.splitlines()}
        listed = {r["destination"] for r in routes if r["protocol"] in AGENT_PROTOCOLS}
        self.assertEqual(listed, kernel, f"ListRoutes family=IPV6's agent routes differ from "
                                         f"`ip -6 route show proto {lab.AGENT_PROTOCOL}`")
        listed_all = {(ipaddress.ip_network(r["destination"]), r["interface"]) for r in routes}
        self.assertLessEqual(before & after, listed_all,
                             "ListRoutes family=IPV6 lacks routes of `ip -6 route show table main`")
        self.assertLessEqual(listed_all, before | after,
                             "ListRoutes family=IPV6 shows routes `ip -6 route` does not")

    def test_list_routes_family_ipv4_and_vm_filter(self):
        routes = self.call("ListRoutes", {"family": "ADDRESS_FAMILY_IPV4"}).get("routes", [])
        self.assertEqual([r for r in routes if is_ipv6(r["destination"])], [],
                         "ListRoutes family=IPV4 returned IPv6 routes")
        # vm_id also covers the routes the kernel keeps on the VM's link (fe80::/64).
        only_vm1 = self.call("ListRoutes", {"vm_id": "vm-1"}).get("routes", [])
        self.assertEqual(sorted(r["destination"] for r in only_vm1
                                if r["protocol"] in AGENT_PROTOCOLS),
                         sorted([f"{self.vm1.address}/32", f"{self.vm1.address6}/128"]),
                         f"ListRoutes vm_id=vm-1 (all families) answered {only_vm1}")
        self.assertEqual({r["interface"] for r in only_vm1}, {self.vm1.interface},
                         f"ListRoutes vm_id=vm-1 answered {only_vm1}")

    # -- rejected requests -------------------------------------------------------------------------

    def test_invalid_ipv6_addresses_change_nothing(self):
        bad = ["fe80::1", lab.GATEWAY6, "ff02::1", "ff05::2", "::1", "::",
               "::ffff:198.51.100.209", lab.HOST_ADDRESS6, "2001:db8:1::zz"]
        before = (self.lab.snapshot(), self.lab.snapshot6())
        for address in bad:
            for index, addresses in ((0, [address]), (1, ["198.51.100.209", address])):
                request = {"vm_id": "vm-invalid", "interface": "vme9a", "ip_addresses": addresses}
                with self.subTest(ip_addresses=addresses):
                    error = self.assertStatus(StatusCode.INVALID_ARGUMENT, "AttachVm", request,
                                              f"AttachVm with ip_addresses {addresses}")
                    self.assertIn(f"ip_addresses[{index}]", error.details,
                                  f"AttachVm with ip_addresses {addresses}: the message does "
                                  f"not name ip_addresses[{index}]")
        self.assertEqual((self.lab.snapshot(), self.lab.snapshot6()), before,
                         "a rejected AttachVm changed the host")
        self.assertStatus(StatusCode.NOT_FOUND, "DetachVm", {"vm_id": "vm-invalid"},
                          "a rejected AttachVm left vm-invalid recorded")

    def test_ipv6_address_of_another_vm_already_exists(self):
        request = {"vm_id": "vm-invalid", "interface": "vme9a",
                   "ip_addresses": ["198.51.100.209", self.vm1.address6]}
        before = self.lab.snapshot6()
        error = self.assertStatus(StatusCode.ALREADY_EXISTS, "AttachVm", request,
                                  "AttachVm with vm-1's IPv6 address")
        self.assertIn("vm-1", error.details, "ALREADY_EXISTS does not name vm-1")
        self.assertEqual(self.lab.snapshot6(), before, "a rejected AttachVm changed the host")


class DetachTest(DualStackTestCase):
    """Both dual-stack VMs attached, then VM 1 detached."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.vm1, cls.vm2 = cls.lab.vms[1], cls.lab.vms[2]
        cls.attach(cls.vm1, with_mac=True)
        cls.attach(cls.vm2)
        cls.reachable_before_detach = cls.lab.ping(cls.lab.x, cls.vm1.address6,
                                                   deadline=REACH_DEADLINE)
        cls.detach(cls.vm1.vm_id)

    def test_vm1_was_reachable_before_detach(self):
        self.assertTrue(self.reachable_before_detach,
                        f"X could not ping {self.vm1.address6} after AttachVm (precondition)")

    def test_ipv6_objects_are_gone(self):
        address, dev = self.vm1.address6, self.vm1.interface
        self.assertIsNone(self.kernel_route6(address),
                          f"`ip -6 route` still has {address} after DetachVm vm-1")
        self.assertIsNone(self.kernel_proxy6(address),
                          f"`ip -6 neigh show proxy` still has {address} after DetachVm vm-1")
        self.assertFalse(self.has_gateway6(dev),
                         f"`ip -6 addr show dev {dev}` still has {lab.GATEWAY6}/128")
        permanent = [n for n in self.lab.neighbours6(dev) if "PERMANENT" in n.get("state", [])]
        self.assertEqual(permanent, [], f"`ip -6 neigh show dev {dev}` still has {permanent}")

    def test_x_can_no_longer_reach_vm1_over_ipv6(self):
        self.assertFalse(self.lab.ping(self.lab.x, self.vm1.address6, count=2),
                         f"X can still ping {self.vm1.address6}")

    def test_vm2_still_works(self):
        self.assertEqual(self.missing_objects6(self.vm2), [],
                         "DetachVm vm-1 took away part of vm-2's IPv6 network")
        self.assertReaches(self.lab.x, self.vm2.address6, "X")
        self.assertReaches(self.vm2.ns, lab.X_ADDRESS6, "VM 2")
        self.assertReaches(self.lab.x, self.vm2.address, "X")


class SpecTest(DualStackTestCase):
    """Specs beyond two addresses of each family: an IPv6-only VM, a non-canonical IPv6
    address, an IPv6 address changed by a new AttachVm."""

    vm_count = 3

    def test_ipv6_only_vm(self):
        vm3 = self.lab.vms[3]
        response = self.attach(vm3, ip_addresses=[vm3.address6])
        self.addCleanup(self.detach, vm3.vm_id, True)
        self.assertEqual(response["vm"].get("state"), "VM_STATE_PROGRAMMED", f"{response}")
        self.assertEqual(self.missing_objects6(vm3), [], "the IPv6-only VM's network is "
                                                         "incomplete")
        self.assertIsNone(next((r for r in self.lab.routes() if r["dst"] == vm3.address), None),
                          f"a route to {vm3.address}, which the IPv6-only VM was not given")
        self.assertReaches(self.lab.x, vm3.address6, "X")
        self.assertReaches(vm3.ns, lab.X_ADDRESS6, "VM 3")

    def test_non_canonical_ipv6_is_stored_canonical(self):
        vm1 = self.lab.vms[1]
        written = "2001:DB8:1:0:0:0:0:201"
        response = self.attach(vm1, ip_addresses=[vm1.address, written])
        self.addCleanup(self.detach, vm1.vm_id, True)
        self.assertEqual(response["vm"].get("ip_addresses"), vm1.addresses,
                         f"AttachVm with {written} answered {response}")
        self.assertEqual(self.missing_objects6(vm1), [], f"{written} was not programmed as "
                                                         f"{vm1.address6}")
        before = (self.lab.snapshot(), self.lab.snapshot6())
        again = self.attach(vm1)  # the canonical spelling: the same spec
        self.assertEqual(again["vm"].get("revision"), response["vm"].get("revision"),
                         f"AttachVm with {vm1.address6} after {written} is not a no-op: "
                         f"{response} then {again}")
        self.assertEqual((self.lab.snapshot(), self.lab.snapshot6()), before,
                         "the same spec spelled canonically changed the host")

    def test_changed_ipv6_address_converges(self):
        vm2 = self.lab.vms[2]
        self.attach(vm2)
        self.addCleanup(self.detach, vm2.vm_id, True)
        self.assertReaches(self.lab.x, vm2.address6, "X")
        new = "2001:db8:1::212"
        self.lab.run(vm2.ns, "ip", "addr", "add", f"{new}/128", "dev", lab.VM_LINK, "nodad")
        route4 = self.lab.ip_json(self.lab.host, "route", "show", f"{vm2.address}/32")
        response = self.attach(vm2, ip_addresses=[vm2.address, new])
        self.assertEqual(response["vm"].get("ip_addresses"), [vm2.address, new], f"{response}")
        self.assertIsNone(self.kernel_route6(vm2.address6),
                          f"the route to the old {vm2.address6} stayed")
        self.assertIsNone(self.kernel_proxy6(vm2.address6),
                          f"the proxy entry for the old {vm2.address6} stayed")
        self.assertIsNotNone(self.kernel_route6(new), f"no route to the new {new}")
        self.assertIsNotNone(self.kernel_proxy6(new), f"no proxy entry for the new {new}")
        self.assertTrue(self.has_gateway6(vm2.interface), f"{lab.GATEWAY6} left {vm2.interface}")
        self.assertEqual(self.lab.ip_json(self.lab.host, "route", "show", f"{vm2.address}/32"),
                         route4, "changing the IPv6 address disturbed the IPv4 route")
        self.assertReaches(self.lab.x, new, "X")
        self.assertReaches(self.lab.x, vm2.address, "X")


class DriftRepairTest(DualStackTestCase):
    """VM 1 attached (both families); someone damages its IPv6 objects or turns an IPv6
    setting off; vmnetd repairs them.

    Routes, proxy entries and addresses are repaired on the kernel's notification; the
    /proc/sys settings only by the periodic full resync (measured on this agent: at the default
    --full-resync-interval-s=300, proxy_ndp, forwarding and accept_ra were not set back within
    12 s; net.ipv4.conf.eth0.forwarding neither), so this class runs it every 3 s."""

    vm_count = 1
    daemon_flags = ("--full-resync-interval-s=3",)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.vm1 = cls.lab.vms[1]
        cls.attach(cls.vm1)

    def assertRepaired(self, *damage):
        self.lab.run(self.lab.host, *damage)
        repaired = lab.wait_until(lambda: not self.missing_objects6(self.vm1), PROGRAM_DEADLINE)
        self.assertTrue(repaired, f"after `{' '.join(damage)}` on the host, vmnetd had not "
                                  f"restored {self.missing_objects6(self.vm1)} within "
                                  f"{PROGRAM_DEADLINE} s")
        self.assertReaches(self.lab.x, self.vm1.address6, "X")

    def test_deleted_route_is_put_back(self):
        self.assertRepaired("ip", "-6", "route", "del", f"{self.vm1.address6}/128",
                            "dev", self.vm1.interface)

    def test_deleted_proxy_entry_is_put_back(self):
        self.assertRepaired("ip", "-6", "neigh", "del", "proxy", self.vm1.address6,
                            "dev", lab.UPLINK)

    def assertSettingRepaired(self, name, bad, good):
        self.lab.set_sysctl(f"{IPV6_SYSCTLS}/{name}", bad)
        repaired = lab.wait_until(lambda: self.lab.sysctl(f"{IPV6_SYSCTLS}/{name}") == good,
                                  PROGRAM_DEADLINE)
        self.assertTrue(repaired, f"after net.ipv6.conf.{name.replace('/', '.')}={bad} on the "
                                  f"host, vmnetd had not set it back to {good} within "
                                  f"{PROGRAM_DEADLINE} s")
        self.assertReaches(self.lab.x, self.vm1.address6, "X")

    def test_proxy_ndp_turned_off_is_turned_on(self):
        self.assertSettingRepaired(f"{lab.UPLINK}/proxy_ndp", 0, "1")

    def test_forwarding_turned_off_is_turned_on(self):
        self.assertSettingRepaired("all/forwarding", 0, "1")

    def test_deleted_gateway_is_put_back(self):
        self.assertRepaired("ip", "-6", "addr", "del", f"{lab.GATEWAY6}/128",
                            "dev", self.vm1.interface)


def seed_wrong_neighbours(the_lab, ns, addresses, mac, dev="eth0"):
    """Stale neighbour entries for `addresses` with `mac` in namespace `ns`: what a machine
    remembers from before (the VM elsewhere, the address unused)."""
    for address in addresses:
        the_lab.run(ns, "ip", "neigh", "replace", address, "lladdr", mac, "dev", dev,
                    "nud", "stale")


class AnnouncementTest(DualStackTestCase):
    """X holds stale neighbour entries with a wrong MAC for the VMs' addresses; announcements
    must correct them without X sending anything. VM 2's link appears after its attach."""

    vms_without_link = (2,)
    daemon_flags = (METRICS_FLAG,)
    UNUSED = ("198.51.100.209", "2001:db8:1::209")  # never attached: nobody announces them

    @classmethod
    def prepare_host(cls):
        vm1 = cls.lab.vms[1]
        seed_wrong_neighbours(cls.lab, cls.lab.x, vm1.addresses + list(cls.UNUSED), WRONG_MAC)
        seed_wrong_neighbours(cls.lab, vm1.ns, (lab.GATEWAY, lab.GATEWAY6), WRONG_GATEWAY_MAC)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # With its MAC, so that the host asks VM 1 nothing (an NS or ARP request from the host
        # would correct VM 1's entries for the gateways too).
        cls.response = cls.attach(cls.lab.vms[1], with_mac=True)

    def corrected(self, addresses, mac, lookup):
        """The entries (address -> entry) once every one of `addresses` has `mac`, waiting up
        to ANNOUNCE_WAIT; the last entries seen otherwise (`lookup` reads one)."""
        seen = {}

        def check():
            seen.update({address: lookup(address) for address in addresses})
            return all(n and n.get("lladdr") == mac for n in seen.values())

        lab.wait_until(check, ANNOUNCE_WAIT, interval=0.05)
        return seen

    def test_attach_announces_to_the_lan(self):
        vm1 = self.lab.vms[1]
        self.assertEqual(self.response["vm"].get("state"), "VM_STATE_PROGRAMMED",
                         f"AttachVm vm-1 answered {self.response}")
        uplink_mac = self.lab.mac(lab.UPLINK)
        seen = self.corrected(vm1.addresses, uplink_mac, self.x_neighbour)
        for address in vm1.addresses:
            self.assertEqual((seen[address] or {}).get("lladdr"), uplink_mac,
                             f"{ANNOUNCE_WAIT} s after AttachVm, X's neighbour entry for "
                             f"{address} is {seen[address]}: no gratuitous ARP / unsolicited NA "
                             f"with the host's uplink MAC {uplink_mac} reached X")
        untouched = {address: self.x_neighbour(address) for address in self.UNUSED}
        for address, entry in untouched.items():
            self.assertEqual((entry or {}).get("lladdr"), WRONG_MAC,
                             f"X's entry for {address}, which no VM has, changed: {entry} "
                             f"(so the corrected entries prove nothing)")

    def test_attach_announces_the_gateways_to_the_vm(self):
        vm1 = self.lab.vms[1]
        host_mac = self.lab.mac(vm1.interface)

        def lookup(address):
            return next((n for n in self.lab.ip_json(vm1.ns, "neigh", "show", "dev", lab.VM_LINK)
                         if n["dst"] == address), None)

        seen = self.corrected((lab.GATEWAY, lab.GATEWAY6), host_mac, lookup)
        for address, entry in seen.items():
            self.assertEqual((entry or {}).get("lladdr"), host_mac,
                             f"after AttachVm, VM 1's neighbour entry for its gateway {address} "
                             f"is {entry}, not {vm1.interface}'s MAC {host_mac}")
        self.assertIn("router", seen[lab.GATEWAY6] or {},
                      f"the NA for {lab.GATEWAY6} lacked the router flag: {seen[lab.GATEWAY6]}")

    def test_announcements_counted(self):
        sent = lab.metric_total(self.lab.daemon.metrics(), ANNOUNCEMENTS_METRIC)
        self.assertGreaterEqual(sent, len(self.lab.vms[1].addresses),
                                f"{ANNOUNCEMENTS_METRIC} is {sent} after VM 1's attach")

    def test_link_appearing_announces(self):
        vm2 = self.lab.vms[2]
        response = self.attach(vm2)
        self.assertEqual(response["vm"].get("state"), "VM_STATE_PENDING", f"{response}")
        seed_wrong_neighbours(self.lab, self.lab.x, vm2.addresses, WRONG_MAC)
        self.lab.add_vm_link(2)
        self.assertTrue(lab.wait_until(lambda: not self.missing_objects6(vm2), PROGRAM_DEADLINE),
                        f"{vm2.interface} appeared but the host lacks "
                        f"{self.missing_objects6(vm2)} after {PROGRAM_DEADLINE} s")
        uplink_mac = self.lab.mac(lab.UPLINK)
        seen = self.corrected(vm2.addresses, uplink_mac, self.x_neighbour)
        for address in vm2.addresses:
            self.assertEqual((seen[address] or {}).get("lladdr"), uplink_mac,
                             f"after {vm2.interface} appeared and vm-2 was programmed, X's "
                             f"neighbour entry for {address} is {seen[address]}")


class AnnounceCountTest(DualStackTestCase):
    """--announce-count=2 --announce-interval=200ms: each announcement (each VM address on the
    uplink, each gateway on the VM's link) goes out exactly twice: counted on the wire (a
    sniffer in X and in each VM) and by the agent's counter."""

    vm_count = 3
    daemon_flags = (METRICS_FLAG, "--announce-count=2", "--announce-interval=200ms")

    def sent(self):
        return lab.metric_total(self.lab.daemon.metrics(), ANNOUNCEMENTS_METRIC)

    @staticmethod
    def announces(frame, address):
        """Whether `frame` (a Sniffer item) is a gratuitous ARP or an unsolicited neighbour
        advertisement for `address` that arrived on the sniffed interface."""
        if frame.get("dir") != "in":
            return False
        if ":" in address:
            # Unsolicited: the S flag (0x40 of the byte after the checksum, the high byte
            # of the sniffer's "id") clear; a VM checking its router gets solicited ones.
            return (frame.get("kind") == "ip6" and frame.get("proto") == 58 and
                    frame.get("type") == 136 and frame.get("target") == address and
                    not (frame.get("id", 0) >> 8) & 0x40)
        return frame.get("kind") == "arp" and frame.get("src") == address == frame.get("dst")

    def frames(self, wire):
        """{(sniffer name, address): frames seen} for each expected announcement."""
        return {(name, address): sum(self.announces(f, address) for f in sniffer.items())
                for (name, address), sniffer in wire.items()}

    def test_each_announcement_sent_count_times(self):
        vm1, vm2, vm3 = self.lab.vms[1], self.lab.vms[2], self.lab.vms[3]
        with Sniffer(self.lab.x) as lan, Sniffer(vm1.ns) as link1, Sniffer(vm2.ns) as link2, \
                Sniffer(vm3.ns) as link3:
            # 2 x (2 addresses on the one uplink + 169.255.30.1 and fe80::ffff:1:1 on vme1a)
            wire1 = {**{("X", a): lan for a in vm1.addresses},
                     ("vm-1", lab.GATEWAY): link1, ("vm-1", lab.GATEWAY6): link1}
            # 2 x (1 address on the uplink + 169.255.30.1 on its link: no IPv6, no gateway6)
            wire2 = {("X", vm2.address): lan, ("vm-2", lab.GATEWAY): link2}
            wire3 = {("X", vm3.address): lan, ("vm-3", lab.GATEWAY): link3}
            self.attach(vm1, with_mac=True)
            self.assertFramesReach(wire1, "attaching a dual-stack VM")
            # A third frame of vm-1's would leave 200 ms after its second; vm-2's second leaves
            # 200 ms after vm-2's first, which follows vm-1's second: when vm-2's second is on
            # the wire, a third of vm-1's would be too. The agent's own timing is the fence;
            # no fixed sleep.
            self.attach(vm2, ip_addresses=[vm2.address])
            self.assertFramesReach(wire2, "attaching an IPv4-only VM as well")
            self.assertEqual(self.frames(wire1), {k: 2 for k in wire1},
                             "vm-1 announced more than --announce-count=2 times")
            self.attach(vm3, ip_addresses=[vm3.address])
            self.assertFramesReach(wire3, "attaching a third VM")
            self.assertEqual(self.frames(wire2), {k: 2 for k in wire2},
                             "vm-2 announced more than --announce-count=2 times")
        # The counter counts what went out: 8 + 4 + 4 frames.
        self.assertEqual(self.sent(), 16, ANNOUNCEMENTS_METRIC)

    def assertFramesReach(self, wire, what):
        reached = lab.wait_until(lambda: all(n >= 2 for n in self.frames(wire).values()),
                                 ANNOUNCE_WAIT, 0.05)
        self.assertTrue(reached, f"after {what}, frames on the wire: {self.frames(wire)}")


class RestartAnnouncementTest(DualStackTestCase):
    """VM 1 attached; X's entries for it are spoiled while vmnetd is stopped; the restarted
    agent announces VM 1's addresses again."""

    vm_count = 1
    daemon_flags = (METRICS_FLAG,)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.vm1 = cls.lab.vms[1]
        cls.attach(cls.vm1, with_mac=True)
        cls.programmed = (cls.lab.snapshot(), cls.lab.snapshot6())
        # `ip monitor` of the host from before SIGTERM until the restarted agent is SERVING
        # (it makes its differences before that): what the stop and the start changed.
        # The kernel's own IPv6 autoconfiguration of the VM link (its fe80:: address) is
        # no change of the agent's: let it finish first.
        lab.wait_until(cls.lab.ipv6_settled, SETTLE_TIMEOUT)
        with cls.lab.monitor(cls.lab.host, objects=("route", "address")) as monitor:
            before = monitor.mark()
            cls.stop_status = cls.lab.daemon.stop()
            seed_wrong_neighbours(cls.lab, cls.lab.x, cls.vm1.addresses, WRONG_MAC)
            cls.lab.daemon.start()
            cls.restart_lines = monitor.lines_between(before, monitor.mark())
        cls.after_restart = (cls.lab.snapshot(), cls.lab.snapshot6())
        cls.restart_writes = lab.metric_total(cls.lab.daemon.metrics(),
                                              "vmnet_kernel_writes_total")
        cls.client = cls.enterClassContext(grpcurl.Client(cls.lab.daemon.target))

    def test_restart_changes_nothing(self):
        self.assertEqual(self.after_restart, self.programmed,
                         "starting vmnetd again changed the host's routes, proxy entries or "
                         "addresses of either family")

    def test_restart_after_sigterm_writes_nothing(self):
        """README: on SIGTERM vmnetd leaves the kernel as it is; started again with nothing
        drifted, it writes nothing, for IPv4 and IPv6 alike (sysctls included: the counter
        counts /proc/sys writes too)."""
        self.assertEqual(self.stop_status, 0, "vmnetd did not exit 0 on SIGTERM")
        self.assertEqual(self.restart_lines, [],
                         "`ip monitor route address` on the host saw changes between SIGTERM "
                         "and the restarted agent's SERVING")
        self.assertEqual(self.restart_writes, 0,
                         "vmnet_kernel_writes_total of the restarted agent")

    def test_restart_announces(self):
        uplink_mac = self.lab.mac(lab.UPLINK)

        def lladdrs():
            return {a: (self.x_neighbour(a) or {}).get("lladdr") for a in self.vm1.addresses}

        lab.wait_until(lambda: set(lladdrs().values()) == {uplink_mac}, ANNOUNCE_WAIT, 0.05)
        self.assertEqual(lladdrs(), {a: uplink_mac for a in self.vm1.addresses},
                         f"after vmnetd restarted, X's neighbour entries for VM 1 do not carry "
                         f"the host's uplink MAC {uplink_mac}")


class DadTest(DualStackTestCase):
    """vmnetd --dad: VM 1's addresses are free; X holds VM 2's IPv4 address and VM 3's IPv6
    address, so their probes are answered by X."""

    vm_count = 3
    daemon_flags = ("--dad", "--dad-timeout=1s", METRICS_FLAG)

    @classmethod
    def prepare_host(cls):
        cls.lab.run(cls.lab.x, "ip", "addr", "add", f"{cls.lab.vms[2].address}/32", "dev", "eth0")
        cls.lab.run(cls.lab.x, "ip", "addr", "add", f"{cls.lab.vms[3].address6}/128",
                    "dev", "eth0", "nodad")

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.x_mac = cls.lab.mac("eth0", ns=cls.lab.x)
        cls.responses = {vm.vm_id: cls.attach(vm, with_mac=True) for vm in cls.lab.vms.values()}

    def test_free_addresses_are_programmed(self):
        vm1 = self.lab.vms[1]
        got = self.final_state(vm1.vm_id, "VM_STATE_PROGRAMMED")
        self.assertEqual(got.get("state"), "VM_STATE_PROGRAMMED",
                         f"with --dad, vm-1 (no address in use) is {got}")
        self.assertEqual(self.missing_objects6(vm1), [], "vm-1's IPv6 network is incomplete")
        for address in vm1.addresses:
            self.assertReaches(self.lab.x, address, "X")

    def check_conflict(self, vm, address):
        got = self.final_state(vm.vm_id, "VM_STATE_FAILED")
        self.assertEqual(got.get("state"), "VM_STATE_FAILED",
                         f"with --dad, {vm.vm_id}, whose {address} X holds, is {got} "
                         f"(AttachVm answered {self.responses[vm.vm_id]})")
        message = got.get("message", "")
        self.assertIn(address, message, f"{vm.vm_id}'s message does not name {address}")
        self.assertIn(self.x_mac, message.lower(),
                      f"{vm.vm_id}'s message does not name X's MAC {self.x_mac}")
        proxies = self.lab.proxy_entries() + self.lab.proxy_entries6()
        self.assertEqual([p for p in proxies if p["dst"] == address], [],
                         f"a proxy entry for {address}, which X holds, is published")

    def test_ipv4_address_in_use_fails_the_vm(self):
        self.check_conflict(self.lab.vms[2], self.lab.vms[2].address)

    def test_ipv6_address_in_use_fails_the_vm(self):
        self.check_conflict(self.lab.vms[3], self.lab.vms[3].address6)

    def test_zz_conflicts_counted(self):  # last: after the conflicts were found
        for vm in (self.lab.vms[2], self.lab.vms[3]):
            self.final_state(vm.vm_id, "VM_STATE_FAILED")
        conflicts = lab.metric_total(self.lab.daemon.metrics(), DAD_CONFLICTS_METRIC)
        self.assertGreaterEqual(conflicts, 2, f"{DAD_CONFLICTS_METRIC} after two conflicts")


class DadRetryTest(DualStackTestCase):
    """vmnetd --dad: X holds VM 1's IPv6 address, then gives it up; the VM's message says
    "Attach again to retry", and the same AttachVm again then programs it."""

    vm_count = 1
    daemon_flags = ("--dad",)

    def test_attach_again_after_the_conflict_is_gone(self):
        vm1 = self.lab.vms[1]
        held = ["ip", "addr", "add", f"{vm1.address6}/128", "dev", "eth0", "nodad"]
        self.lab.run(self.lab.x, *held)
        self.attach(vm1, with_mac=True)
        failed = self.final_state(vm1.vm_id, "VM_STATE_FAILED")
        self.assertEqual(failed.get("state"), "VM_STATE_FAILED", f"with --dad and X holding "
                         f"{vm1.address6}, vm-1 is {failed} (precondition)")
        self.lab.run(self.lab.x, "ip", "addr", "del", f"{vm1.address6}/128", "dev", "eth0")
        self.attach(vm1, with_mac=True)
        again = self.final_state(vm1.vm_id, "VM_STATE_PROGRAMMED")
        self.assertEqual(again.get("state"), "VM_STATE_PROGRAMMED",
                         f"after X gave up {vm1.address6} (failed with {failed['message']!r}), "
                         f"AttachVm again left vm-1 {again}")
        self.assertEqual(self.missing_objects6(vm1), [], "vm-1's IPv6 network is incomplete")
        for address in vm1.addresses:
            self.assertReaches(self.lab.x, address, "X")


if __name__ == "__main__":
    skips.main()
