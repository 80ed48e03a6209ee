// NetlinkKernel against the real kernel, in the test's own namespace (see
// netns_main.cc). What it claims is checked with iproute2, not only with
// our own dump.
#include "vmnet/kernel/netlink_kernel.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <linux/if_addr.h>
#include <linux/neighbour.h>
#include <linux/rtnetlink.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <memory>

#include "kernel_test.h"
#include "vmnet/reconciler/kernel_model.h"
#include "vmnet/reconciler/plan.h"

namespace vmnet::kernel {
namespace {

using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

constexpr uint8_t kProto = 237;

IpAddress Ip(const char* s) { return *IpAddress::Parse(s); }

class NetlinkKernelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!KernelTestsIsolated()) GTEST_SKIP() << KernelTestsSkipReason();
    Sh("ip link del eth0 2>/dev/null; ip link del vme1a 2>/dev/null");
    ASSERT_EQ(Sh("ip link add eth0 type veth peer name lan0 && ip link set eth0 up && "
                 "ip link set lan0 up && ip addr add 198.51.100.1/24 dev eth0 && "
                 "ip link add vme1a type veth peer name vm0 && ip link set vm0 up"),
              "");
    auto k = NetlinkKernel::Create({});
    ASSERT_TRUE(k.ok()) << k.status();
    kernel_ = std::move(*k);
    auto snap = kernel_->Dump();
    ASSERT_TRUE(snap.ok());
    for (const Link& l : snap->links) {
      if (l.name == "eth0") eth0_ = l.ifindex;
      if (l.name == "vme1a") vme_ = l.ifindex;
    }
    ASSERT_NE(eth0_, 0);
    ASSERT_NE(vme_, 0);
  }

  void TearDown() override {
    if (KernelTestsIsolated())
      Sh("ip link del eth0 2>/dev/null; ip link del vme1a 2>/dev/null");
  }

  std::vector<Write> VmWrites() {
    Route route;
    route.destination = IpPrefix::Host(Ip("198.51.100.201"));
    route.ifindex = vme_;
    route.protocol = kProto;
    route.scope = RT_SCOPE_LINK;
    Neighbor proxy;
    proxy.ifindex = eth0_;
    proxy.address = Ip("198.51.100.201");
    proxy.proxy = true;
    proxy.protocol = kProto;
    Neighbor neigh;
    neigh.ifindex = vme_;
    neigh.address = Ip("198.51.100.201");
    neigh.lladdr = MacAddress::Parse("02:00:00:00:00:01");
    neigh.state = NUD_PERMANENT;
    neigh.protocol = kProto;
    Address gw;
    gw.ifindex = vme_;
    gw.prefix = *IpPrefix::Parse("169.255.30.1/32");
    gw.scope = RT_SCOPE_LINK;
    gw.flags = IFA_F_NOPREFIXROUTE;
    gw.protocol = kProto;
    return {SetLinkUp{vme_, "vme1a"},
            SetIpv4Forwarding{vme_, "vme1a", true},
            SetIpv4Forwarding{eth0_, "eth0", true},
            AddAddress{gw},
            AddRoute{route},
            SetNeighbor{proxy},
            SetNeighbor{neigh}};
  }

  void ExpectAllOk(const std::vector<absl::Status>& results) {
    for (const auto& s : results) EXPECT_TRUE(s.ok()) << s;
  }

  std::unique_ptr<NetlinkKernel> kernel_;
  int eth0_ = 0, vme_ = 0;
};

TEST_F(NetlinkKernelTest, WritesTheHostRoutedRecipe) {
  ExpectAllOk(kernel_->Apply(VmWrites()));
  EXPECT_THAT(Sh("ip link show vme1a"), HasSubstr(",UP"));
  EXPECT_EQ(Sh("cat /proc/sys/net/ipv4/conf/vme1a/forwarding"), "1\n");
  EXPECT_EQ(Sh("cat /proc/sys/net/ipv4/conf/eth0/forwarding"), "1\n");
  EXPECT_EQ(Sh("cat /proc/sys/net/ipv4/conf/lan0/forwarding"), "0\n")
      << "forwarding is set per link, not host-wide";
  EXPECT_EQ(Sh("ip route show 198.51.100.201/32"),
            "198.51.100.201 dev vme1a proto 237 scope link \n");
  EXPECT_EQ(Sh("ip -d neigh show proxy"), "198.51.100.201 dev eth0 proxy proto 237 \n");
  EXPECT_THAT(Sh("ip neigh show dev vme1a"),
              HasSubstr("198.51.100.201 lladdr 02:00:00:00:00:01 PERMANENT proto 237"));
  EXPECT_THAT(Sh("ip addr show dev vme1a"),
              HasSubstr("inet 169.255.30.1/32 scope link noprefixroute vme1a"));
  EXPECT_THAT(Sh("arp -n"), HasSubstr("MP"));

  auto snap = kernel_->Dump();
  ASSERT_TRUE(snap.ok());
  KernelModel model;
  model.Reset(*snap);
  EXPECT_EQ(model.LinkByName("vme1a")->ipv4_forwarding, true);
  EXPECT_TRUE(model.LinkByName("vme1a")->up);
  ASSERT_NE(model.FindNeighbor(eth0_, Ip("198.51.100.201"), true), nullptr);
  EXPECT_EQ(model.FindNeighbor(eth0_, Ip("198.51.100.201"), true)->protocol, kProto);
  ASSERT_NE(model.RoutesTo(IpPrefix::Host(Ip("198.51.100.201"))), nullptr);
  // bookworm's iproute2 does not print an address's protocol; our dump of
  // the kernel does.
  EXPECT_EQ(model.FindAddress(vme_, *IpPrefix::Parse("169.255.30.1/32"))->protocol,
            kProto);
}

TEST_F(NetlinkKernelTest, CreateNeverOverwritesAndDeleteOfNothingIsFine) {
  Sh("ip route add 198.51.100.201/32 dev eth0 proto static && ip link set vme1a up");
  Route ours;
  ours.destination = IpPrefix::Host(Ip("198.51.100.201"));
  ours.ifindex = vme_;
  ours.protocol = kProto;
  ours.scope = RT_SCOPE_LINK;
  auto results = kernel_->Apply({AddRoute{ours}, DeleteRoute{ours}});
  EXPECT_EQ(results[0].code(), absl::StatusCode::kAlreadyExists) << results[0];
  EXPECT_THAT(std::string(results[0].message()), HasSubstr("errno 17"));
  // Our delete names our protocol: the administrator's route survives it.
  EXPECT_TRUE(results[1].ok()) << results[1];
  EXPECT_THAT(Sh("ip route show 198.51.100.201/32"), HasSubstr("proto static"));

  Neighbor gone;
  gone.ifindex = eth0_;
  gone.address = Ip("198.51.100.77");
  gone.proxy = true;
  Address no_addr;
  no_addr.ifindex = vme_;
  no_addr.prefix = *IpPrefix::Parse("169.255.30.1/32");
  ExpectAllOk(kernel_->Apply({DeleteNeighbor{gone}, DeleteAddress{no_addr}}));
}

TEST_F(NetlinkKernelTest, FailuresNameTheObjectAndErrno) {
  Route r;
  r.destination = IpPrefix::Host(Ip("198.51.100.201"));
  r.ifindex = 9999;
  r.protocol = kProto;
  auto results = kernel_->Apply({AddRoute{r}});
  ASSERT_FALSE(results[0].ok());
  EXPECT_THAT(std::string(results[0].message()),
              HasSubstr("add route 198.51.100.201/32"));
  EXPECT_THAT(std::string(results[0].message()), HasSubstr("errno"));
}

TEST_F(NetlinkKernelTest, ManyWritesInFlightAllAcknowledged) {
  std::vector<Write> writes = {SetLinkUp{vme_, "vme1a"}};
  for (int i = 1; i <= 2000; ++i) {
    Route r;
    r.destination = IpPrefix::Host(IpAddress::V4((198u << 24) | (18u << 16) | i));
    r.ifindex = vme_;
    r.protocol = kProto;
    r.scope = RT_SCOPE_LINK;
    writes.push_back(AddRoute{r});
  }
  ExpectAllOk(kernel_->Apply(writes));
  EXPECT_EQ(Sh("ip route show proto 237 | wc -l"), "2000\n");
}

TEST_F(NetlinkKernelTest, ConntrackDeletionsOfABatchEachGetTheirOwnStatus) {
  Sh("conntrack -F 2>/dev/null");
  ASSERT_EQ(Sh("for e in '198.51.100.201 203.0.113.7' '203.0.113.7 198.51.100.202' "
               "'2001:db8:1::201 2001:db8::7' '198.51.100.9 203.0.113.7' "
               "'2001:db8:1::9 2001:db8::7'; do set -- $e; "
               "conntrack -I -p udp -s $1 -d $2 --sport 1000 --dport 2000 -t 120 "
               ">/dev/null 2>&1; done; conntrack -L 2>/dev/null | grep -c udp"),
            "5\n");
  Route r;
  r.destination = IpPrefix::Host(Ip("198.51.100.201"));
  r.ifindex = vme_;
  r.protocol = kProto;
  r.scope = RT_SCOPE_LINK;
  // Mixed with rtnetlink writes and an nftables one (deleting an absent
  // base: OK), which go in other steps of Apply.
  auto results =
      kernel_->Apply({DeletePortSecurityBase{}, DeleteConntrack{Ip("198.51.100.201")},
                      SetLinkUp{vme_, "vme1a"}, DeleteConntrack{IpAddress()},
                      DeleteConntrack{Ip("2001:db8:1::201")}, AddRoute{r},
                      DeleteConntrack{Ip("198.51.100.202")}});
  ASSERT_EQ(results.size(), 7u);
  for (size_t i : {0, 1, 2, 4, 5, 6}) {
    EXPECT_TRUE(results[i].ok()) << i << ": " << results[i];
  }
  EXPECT_TRUE(absl::IsInvalidArgument(results[3])) << results[3];
  std::string after = Sh("conntrack -L 2>/dev/null");
  for (const char* gone : {"198.51.100.201", "198.51.100.202", "2001:db8:1::201"}) {
    EXPECT_THAT(after, Not(HasSubstr(std::string("=") + gone + " "))) << after;
  }
  EXPECT_THAT(after, HasSubstr("src=198.51.100.9 "));
  EXPECT_THAT(after, HasSubstr("src=2001:db8:1::9 "));
  EXPECT_EQ(Sh("ip route show proto 237 | wc -l"), "1\n");
  Sh("conntrack -F 2>/dev/null");
}

TEST_F(NetlinkKernelTest, EventsReportChangesBySomeoneElse) {
  ExpectAllOk(kernel_->Apply(VmWrites()));
  std::vector<Event> drained;
  ASSERT_TRUE(kernel_->ReadEvents(&drained).ok());
  Sh("ip route del 198.51.100.201/32");
  Sh("ip neigh del 198.51.100.201 dev vme1a");
  std::vector<Event> events;
  ASSERT_TRUE(kernel_->ReadEvents(&events).ok());
  bool route_deleted = false, neighbor_deleted = false;
  for (const Event& e : events) {
    if (auto* r = std::get_if<RouteEvent>(&e)) {
      route_deleted |= r->deleted && r->route.destination.address == Ip("198.51.100.201");
    }
    if (auto* n = std::get_if<NeighborEvent>(&e)) {
      neighbor_deleted |= n->deleted && n->neighbor.address == Ip("198.51.100.201");
    }
  }
  EXPECT_TRUE(route_deleted);
  EXPECT_TRUE(neighbor_deleted);
}

// `ip route replace` of a VM's route to another link raises one
// RTM_NEWROUTE (NLM_F_REPLACE) and no deletion of ours; deleting the
// replacement afterwards must leave the model with no route at all (issue 13,
// case 1: the VM was reported programmed with no route until the full
// re-read).
TEST_F(NetlinkKernelTest, ARouteReplacedThenDeletedLeavesNoRouteInTheModel) {
  ExpectAllOk(kernel_->Apply(VmWrites()));
  auto snap = kernel_->Dump();
  ASSERT_TRUE(snap.ok());
  KernelModel model;
  model.Reset(*snap);
  std::vector<Event> drained;
  ASSERT_TRUE(kernel_->ReadEvents(&drained).ok());
  IpPrefix vm = IpPrefix::Host(Ip("198.51.100.201"));
  auto apply_events = [&] {
    std::vector<Event> events;
    EXPECT_TRUE(kernel_->ReadEvents(&events).ok());
    for (const Event& e : events) model.Apply(e);
    return events.size();
  };

  ASSERT_EQ(Sh("ip route replace 198.51.100.201/32 dev eth0"), "");
  EXPECT_GE(apply_events(), 1u);
  ASSERT_NE(model.RoutesTo(vm), nullptr);
  ASSERT_EQ(model.RoutesTo(vm)->size(), 1u) << "the replaced route is still in the model";
  EXPECT_EQ(model.RoutesTo(vm)->front().ifindex, eth0_);
  EXPECT_NE(model.RoutesTo(vm)->front().protocol, kProto);

  ASSERT_EQ(Sh("ip route del 198.51.100.201/32 dev eth0"), "");
  EXPECT_GE(apply_events(), 1u);
  EXPECT_EQ(Sh("ip route show 198.51.100.201/32"), "");
  EXPECT_EQ(model.RoutesTo(vm), nullptr) << "the kernel holds no route to the VM";
}

// The model assumes what the kernel does silently when a link goes down:
// its routes, neighbour and proxy entries are gone, its addresses stay.
TEST_F(NetlinkKernelTest, LinkDownFlushesRoutesNeighboursAndProxies) {
  ExpectAllOk(kernel_->Apply(VmWrites()));
  Neighbor proxy_on_vme;
  proxy_on_vme.ifindex = vme_;
  proxy_on_vme.address = Ip("198.51.100.202");
  proxy_on_vme.proxy = true;
  ExpectAllOk(kernel_->Apply({SetNeighbor{proxy_on_vme}}));
  Sh("ip link set vme1a down");
  EXPECT_EQ(Sh("ip route show dev vme1a"), "");
  EXPECT_EQ(Sh("ip neigh show dev vme1a"), "");
  EXPECT_EQ(Sh("ip neigh show proxy dev vme1a"), "");
  EXPECT_THAT(Sh("ip addr show dev vme1a"), HasSubstr("169.255.30.1/32"));
}

TEST_F(NetlinkKernelTest, ProxyEntriesRaiseNoEventsButTheProxyDumpSeesThem) {
  std::vector<Event> drained;
  ASSERT_TRUE(kernel_->ReadEvents(&drained).ok());
  Sh("ip neigh add proxy 198.51.100.210 dev eth0 proto 237");
  std::vector<Event> events;
  ASSERT_TRUE(kernel_->ReadEvents(&events).ok());
  for (const Event& e : events) {
    if (auto* n = std::get_if<NeighborEvent>(&e)) {
      EXPECT_FALSE(n->neighbor.proxy);
    }
  }
  auto proxies = kernel_->DumpProxyNeighbors();
  ASSERT_TRUE(proxies.ok());
  ASSERT_EQ(proxies->size(), 1u);
  EXPECT_EQ((*proxies)[0].address, Ip("198.51.100.210"));
  EXPECT_EQ((*proxies)[0].protocol, kProto);
}

TEST_F(NetlinkKernelTest, TinyReceiveBufferOverflowIsReported) {
  auto small = NetlinkKernel::Create({.event_rcvbuf = 1024});
  ASSERT_TRUE(small.ok());
  Sh("(for i in $(seq 1 500); do echo route add 198.18.1.$((i % 250 + 1))/32 dev eth0 "
     "metric $i; "
     "done) | ip -batch - >/dev/null");
  std::vector<Event> events;
  absl::Status s = (*small)->ReadEvents(&events);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
}

// -- What tests/unit/fake_kernel.cc assumes, pinned against the real kernel
// --------------- Each test below is one behaviour of FakeKernel (see fake_kernel.h);
// when one goes red, the kernel changed and the fake must follow.

class KernelAnswersTest : public NetlinkKernelTest {
 protected:
  // Everything the kernel reported since the last call.
  std::vector<Event> Drain() {
    std::vector<Event> events;
    EXPECT_TRUE(kernel_->ReadEvents(&events).ok());
    return events;
  }
  static Route RouteTo(const char* prefix, int ifindex, uint32_t table = 254) {
    Route r;
    r.destination = *IpPrefix::Parse(prefix);
    r.ifindex = ifindex;
    r.protocol = kProto;
    r.scope = RT_SCOPE_LINK;
    r.table = table;
    return r;
  }
  static Address AddressOn(int ifindex, const char* prefix) {
    Address a;
    a.ifindex = ifindex;
    a.prefix = *IpPrefix::Parse(prefix);
    a.flags = IFA_F_NODAD;
    return a;
  }
};

TEST_F(KernelAnswersTest, AnExistingProxyEntryAddedAgainIsRelabelled) {
  ASSERT_EQ(Sh("ip neigh add proxy 198.51.100.210 dev eth0 proto static"), "");
  // NLM_F_CREATE | NLM_F_EXCL, yet no EEXIST: the kernel ignores EXCL for proxy entries
  // (`ip neigh add` sends both) and relabels the entry.
  EXPECT_EQ(Sh("ip neigh add proxy 198.51.100.210 dev eth0 proto 237"), "");
  EXPECT_EQ(Sh("ip -d neigh show proxy"), "198.51.100.210 dev eth0 proxy proto 237 \n");
}

// So NetlinkKernel reads an entry before it creates it (issue 13, case 10): another's is
// refused, never relabelled; ours is left as it is.
TEST_F(KernelAnswersTest, NetlinkKernelNeverRelabelsAnotherProxyEntry) {
  ASSERT_EQ(Sh("ip neigh add proxy 198.51.100.210 dev eth0 proto static"), "");
  Neighbor proxy;
  proxy.ifindex = eth0_;
  proxy.address = Ip("198.51.100.210");
  proxy.proxy = true;
  proxy.protocol = kProto;
  std::vector<absl::Status> results = kernel_->Apply({SetNeighbor{proxy}});
  ASSERT_EQ(results.size(), 1u);
  EXPECT_TRUE(absl::IsAlreadyExists(results[0])) << results[0];
  EXPECT_THAT(results[0].message(), HasSubstr("proto 4"));
  EXPECT_EQ(Sh("ip -d neigh show proxy"),
            "198.51.100.210 dev eth0 proxy proto static \n");

  ASSERT_EQ(Sh("ip neigh del proxy 198.51.100.210 dev eth0"), "");
  ExpectAllOk(kernel_->Apply({SetNeighbor{proxy}}));
  ExpectAllOk(kernel_->Apply({SetNeighbor{proxy}}));  // ours already: nothing to do
  EXPECT_EQ(Sh("ip -d neigh show proxy"), "198.51.100.210 dev eth0 proxy proto 237 \n");
}

TEST_F(KernelAnswersTest, LinkDownDropsIpv6AddressesWithEventsAndKeepsIpv4Ones) {
  ASSERT_EQ(Sh("ip link set vme1a up && ip addr add 198.51.100.5/32 dev vme1a && "
               "ip addr add 2001:db8:1::5/128 dev vme1a nodad"),
            "");
  Drain();
  ASSERT_EQ(Sh("ip link set vme1a down"), "");
  EXPECT_EQ(Sh("ip -6 addr show dev vme1a | grep inet6"), "");
  EXPECT_THAT(Sh("ip -4 addr show dev vme1a"), HasSubstr("198.51.100.5/32"));
  bool v6_deleted = false, v4_deleted = false;
  for (const Event& e : Drain()) {
    if (auto* a = std::get_if<AddressEvent>(&e); a != nullptr && a->deleted) {
      v6_deleted |= a->address.prefix == *IpPrefix::Parse("2001:db8:1::5/128");
      v4_deleted |= a->address.prefix.address.is_v4();
    }
  }
  EXPECT_TRUE(v6_deleted) << "no RTM_DELADDR for the IPv6 address";
  EXPECT_FALSE(v4_deleted);
}

TEST_F(KernelAnswersTest, ARouteToALinkThatIsDownIsEnetdown) {
  ASSERT_THAT(Sh("ip link show vme1a"), Not(HasSubstr(",UP")));
  auto results = kernel_->Apply({AddRoute{RouteTo("198.51.100.201/32", vme_)},
                                 AddRoute{RouteTo("2001:db8:1::201/128", vme_)}});
  for (const absl::Status& s : results) {
    EXPECT_THAT(std::string(s.message()), HasSubstr("errno 100")) << s;  // ENETDOWN
  }
  EXPECT_EQ(Sh("ip route show dev vme1a; ip -6 route show dev vme1a"), "");
}

TEST_F(KernelAnswersTest, TheLastIpv4AddressGoneFlushesIpv4RoutesNeighboursAndProxies) {
  ExpectAllOk(
      kernel_->Apply(VmWrites()));  // 169.255.30.1/32 is vme1a's only IPv4 address
  Neighbor proxy_on_vme;
  proxy_on_vme.ifindex = vme_;
  proxy_on_vme.address = Ip("198.51.100.202");
  proxy_on_vme.proxy = true;
  ExpectAllOk(kernel_->Apply(
      {SetNeighbor{proxy_on_vme}, AddRoute{RouteTo("2001:db8:1::201/128", vme_)}}));
  Drain();
  Address gateway = AddressOn(vme_, "169.255.30.1/32");
  ExpectAllOk(kernel_->Apply({DeleteAddress{gateway}}));
  EXPECT_EQ(Sh("ip -4 route show dev vme1a"), "");
  EXPECT_EQ(Sh("ip -4 neigh show dev vme1a"), "");
  EXPECT_EQ(Sh("ip -4 neigh show proxy dev vme1a"), "");
  EXPECT_THAT(Sh("ip -6 route show dev vme1a"), HasSubstr("2001:db8:1::201"))
      << "IPv6 is not touched";
  bool route_event = false, neighbour_event = false;
  for (const Event& e : Drain()) {
    if (auto* r = std::get_if<RouteEvent>(&e)) {
      route_event |= r->deleted && r->route.destination.address == Ip("198.51.100.201");
    }
    if (auto* n = std::get_if<NeighborEvent>(&e)) {
      neighbour_event |= n->deleted && n->neighbor.address == Ip("198.51.100.201");
    }
  }
  EXPECT_FALSE(route_event) << "the flushed route raised an event";
  EXPECT_TRUE(neighbour_event) << "the flushed neighbour entry raised no event";
}

TEST_F(KernelAnswersTest, DeletingWhatIsNotThereIsOkAndRaisesNoEvent) {
  ASSERT_EQ(Sh("ip link set vme1a up"), "");
  Drain();
  Neighbor neigh;
  neigh.ifindex = vme_;
  neigh.address = Ip("198.51.100.77");
  Neighbor proxy = neigh;
  proxy.proxy = true;
  ExpectAllOk(kernel_->Apply({DeleteRoute{RouteTo("198.51.100.77/32", vme_)},
                              DeleteRoute{RouteTo("2001:db8:1::77/128", vme_)},
                              DeleteAddress{AddressOn(vme_, "198.51.100.77/32")},
                              DeleteAddress{AddressOn(vme_, "2001:db8:1::77/128")},
                              DeleteNeighbor{neigh}, DeleteNeighbor{proxy}}));
  // NetlinkKernel reports the kernel's ESRCH/ENOENT/EADDRNOTAVAIL as OK; the kernel
  // itself refuses each one, so no event about them may follow. (The link's
  // coming up raises its own, IPv6 ones, at times of the kernel's choosing.)
  EXPECT_NE(Sh("ip route del 198.51.100.77/32 dev vme1a"), "");
  auto about_77 = [](const Event& e) {
    auto is_77 = [](const IpAddress& a) {
      return a == Ip("198.51.100.77") || a == Ip("2001:db8:1::77");
    };
    if (const auto* r = std::get_if<RouteEvent>(&e))
      return is_77(r->route.destination.address);
    if (const auto* a = std::get_if<AddressEvent>(&e))
      return is_77(a->address.prefix.address);
    if (const auto* n = std::get_if<NeighborEvent>(&e)) return is_77(n->neighbor.address);
    return false;
  };
  std::vector<Event> events = Drain();
  EXPECT_EQ(std::count_if(events.begin(), events.end(), about_77), 0);
}

TEST_F(KernelAnswersTest, TheSameIpv6AddressWithAnotherPrefixLengthExists) {
  ExpectAllOk(kernel_->Apply({AddAddress{AddressOn(vme_, "2001:db8:1::5/64")},
                              AddAddress{AddressOn(vme_, "198.51.100.5/24")}}));
  auto results = kernel_->Apply({AddAddress{AddressOn(vme_, "2001:db8:1::5/128")},
                                 AddAddress{AddressOn(vme_, "198.51.100.5/32")}});
  EXPECT_EQ(results[0].code(), absl::StatusCode::kAlreadyExists) << results[0];
  EXPECT_TRUE(results[1].ok()) << "IPv4 tells the two apart by prefix length: "
                               << results[1];
  EXPECT_THAT(
      Sh("ip -4 addr show dev vme1a"),
      ::testing::AllOf(HasSubstr("198.51.100.5/24"), HasSubstr("198.51.100.5/32")));
}

TEST_F(KernelAnswersTest, RouteConflictsArePerTable) {
  ASSERT_EQ(Sh("ip link set vme1a up"), "");
  auto results = kernel_->Apply({AddRoute{RouteTo("198.51.100.201/32", vme_, 100)},
                                 AddRoute{RouteTo("198.51.100.201/32", vme_)},
                                 AddRoute{RouteTo("198.51.100.201/32", eth0_)}});
  EXPECT_TRUE(results[0].ok()) << results[0];
  EXPECT_TRUE(results[1].ok()) << "a route in another table is no conflict: "
                               << results[1];
  EXPECT_EQ(results[2].code(), absl::StatusCode::kAlreadyExists) << results[2];
  EXPECT_EQ(Sh("ip route show table 100"),
            "198.51.100.201 dev vme1a proto 237 scope link \n");
}

// -- The planner's "nothing more to write", against the real kernel
// --------------------------- plan_test.cc checks that a plan, once held, plans nothing
// more, by applying the writes to the agent's own model: the agent agreeing with itself.
// Here the writes go to the kernel, and the model is the kernel's dump: a field the
// kernel stores otherwise than we write it (a metric, a flag, a scope) would plan the
// write again on every pass, and after every restart.

class PlanAgainstTheKernelTest : public NetlinkKernelTest {
 protected:
  KernelModel DumpedModel() {
    auto snap = kernel_->Dump();
    EXPECT_TRUE(snap.ok()) << snap.status();
    KernelModel model;
    model.Reset(*snap);
    return model;
  }
  static std::vector<std::string> Text(const std::vector<Write>& writes) {
    std::vector<std::string> out;
    for (const Write& w : writes) out.push_back(ToString(w));
    return out;
  }
  void SetUp() override {
    NetlinkKernelTest::SetUp();
    config_.uplinks = {"eth0"};
  }
  HostConfig config_;
};

TEST_F(PlanAgainstTheKernelTest, ADualStackVmWithAMacOnceWrittenPlansNothingMore) {
  auto spec = ParseVmSpec("vm-1", "vme1a", {"198.51.100.201", "2001:db8:1::201"},
                          "02:00:00:00:00:01", SpecRules{});
  ASSERT_TRUE(spec.ok()) << spec.status();
  KernelModel model = DumpedModel();
  std::vector<Write> writes = PlanUplinks(model, config_, /*ipv6=*/true);
  VmPlan plan = PlanVm(*spec, model, config_);
  ASSERT_EQ(plan.state, VmState::kProgrammed) << plan.message;
  ASSERT_FALSE(plan.writes.empty());
  writes.insert(writes.end(), plan.writes.begin(), plan.writes.end());
  // Without port security: nftables is nft_test.cc's.
  std::erase_if(writes, [](const Write& w) { return IsNftWrite(w); });
  auto results = kernel_->Apply(writes);
  for (size_t i = 0; i < writes.size(); ++i) {
    EXPECT_TRUE(results[i].ok()) << ToString(writes[i]) << ": " << results[i];
  }
  EXPECT_EQ(Sh("ip -6 route show 2001:db8:1::201"),
            "2001:db8:1::201 dev vme1a proto 237 metric 1024 pref medium\n");

  model = DumpedModel();
  EXPECT_THAT(Text(PlanUplinks(model, config_, true)), IsEmpty());
  plan = PlanVm(*spec, model, config_);
  EXPECT_EQ(plan.state, VmState::kProgrammed) << plan.message;
  EXPECT_THAT(Text(plan.writes), IsEmpty());
}

TEST_F(PlanAgainstTheKernelTest, AnIpv4VmWithoutAMacOnceWrittenPlansNothingMore) {
  auto spec = ParseVmSpec("vm-1", "vme1a", {"198.51.100.201"}, "", SpecRules{});
  ASSERT_TRUE(spec.ok()) << spec.status();
  VmPlan plan = PlanVm(*spec, DumpedModel(), config_);
  ASSERT_FALSE(plan.writes.empty());
  ExpectAllOk(kernel_->Apply(plan.writes));
  plan = PlanVm(*spec, DumpedModel(), config_);
  EXPECT_EQ(plan.state, VmState::kProgrammed) << plan.message;
  EXPECT_THAT(Text(plan.writes), IsEmpty());
}

}  // namespace
}  // namespace vmnet::kernel
