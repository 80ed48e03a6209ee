#!/usr/bin/python3
"""Paging of ListRoutes, ListArp and ListVms against the kernel: every entry exactly once, in
a stable order, whatever the page size; tokens survive changes made between pages.

Run as root: /usr/bin/python3 tests/e2e/test_paging.py -v
"""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import skips  # noqa: E402  (tests/skips.py: no skips as root)
import lab  # noqa: E402
from test_host_routed import LabTestCase  # noqa: E402

SERVICE = "vmnet.v1.VmNetwork"
EXTRA_ROUTES = 25  # foreign routes, so that there are pages to walk


class PagingTest(LabTestCase):
    vm_count = 2

    @classmethod
    def prepare_host(cls):
        lines = [f"route add 203.0.113.{i}/32 dev {lab.UPLINK}" for i in range(1, EXTRA_ROUTES + 1)]
        lines += [f"neigh add proxy 203.0.113.{i} dev {lab.UPLINK}" for i in range(1, 11)]
        cls.lab.ip_batch(cls.lab.host, lines)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        for index, vm in cls.lab.vms.items():
            cls.client.call(f"{SERVICE}/AttachVm", {
                "vm_id": f"vm-{index}", "interface": vm.interface, "ip_addresses": [vm.address]})

    def walk(self, method, field, page_size, request=None, between_pages=None):
        """Every entry of a listing, page by page."""
        entries, token, pages = [], "", 0
        while True:
            response = self.client.call(f"{SERVICE}/{method}", {
                **(request or {}), "page_size": page_size, "page_token": token})
            entries += response.get(field, [])
            token = response.get("next_page_token", "")
            pages += 1
            self.assertLess(pages, 1000, f"{method} never ends")
            if not token:
                return entries, pages
            if between_pages:
                between_pages()

    def test_routes_every_entry_once_in_the_same_order_whatever_the_page_size(self):
        ipv4 = {"family": "ADDRESS_FAMILY_IPV4"}  # `ip route` shows IPv4
        everything, _ = self.walk("ListRoutes", "routes", 1000, ipv4)
        kernel = self.lab.routes()
        self.assertEqual(len(everything), len(kernel),
                         f"ListRoutes has {len(everything)} routes, `ip route` {len(kernel)}")
        for size in (1, 7, 100):
            paged, pages = self.walk("ListRoutes", "routes", size, ipv4)
            self.assertEqual(paged, everything, f"page_size {size} lists other entries")
            self.assertEqual(pages, -(-len(everything) // size))

    def test_arp_and_vms_page_the_same_way(self):
        arp, _ = self.walk("ListArp", "entries", 1000)
        self.assertEqual(self.walk("ListArp", "entries", 3)[0], arp)
        proxies = [e for e in arp if e["flags"] == "MP"]
        self.assertEqual(len(proxies), 10 + self.vm_count)
        vms, _ = self.walk("ListVms", "vms", 1)
        self.assertEqual([v["vm_id"] for v in vms], ["vm-1", "vm-2"])

    def test_changes_between_pages_never_repeat_an_entry(self):
        added = []

        def add_route():
            n = len(added) + 100
            self.lab.run(self.lab.host, "ip", "route", "add", f"203.0.113.{n}/32", "dev", lab.UPLINK)
            added.append(n)

        paged, _ = self.walk("ListRoutes", "routes", 5, between_pages=add_route)
        # fe80::/64 is on every link: a route is its destination, link and metric.
        routes = [(r["destination"], r.get("interface"), r.get("metric")) for r in paged]
        self.assertEqual(len(routes), len(set(routes)), f"an entry came twice: {routes}")
        for n in added:
            self.lab.run(self.lab.host, "ip", "route", "del", f"203.0.113.{n}/32")

    def test_filtered_listing_keeps_its_filter_across_pages(self):
        routes, _ = self.walk("ListRoutes", "routes", 1, {"interface": lab.UPLINK})
        self.assertTrue(routes)
        self.assertTrue(all(r["interface"] == lab.UPLINK for r in routes))
        first = self.client.call(f"{SERVICE}/ListRoutes",
                                 {"interface": lab.UPLINK, "page_size": 1})
        # A token used with other filters continues a fresh listing with those filters.
        self.assertTrue(first.get("next_page_token"), f"one page of {len(routes)}: {first}")
        other = self.client.call(f"{SERVICE}/ListRoutes", {
            "vm_id": "vm-1", "page_size": 1, "page_token": first["next_page_token"]})
        # Not empty (an empty page would pass every "all of them" check), vm-1's only, and
        # the first page of vm-1's own listing.
        self.assertTrue(other.get("routes"), f"ListRoutes vm_id=vm-1 with a token of another "
                                             f"filter answered no route: {other}")
        self.assertTrue(all(r.get("vm_id") == "vm-1" for r in other["routes"]), other)
        fresh, _ = self.walk("ListRoutes", "routes", 1000, {"vm_id": "vm-1"})
        self.assertIn(f"{self.lab.vms[1].address}/32", [r["destination"] for r in fresh])
        self.assertEqual(other["routes"], fresh[:1],
                         "the token did not start a fresh listing with the new filter")


if __name__ == "__main__":
    skips.main()
