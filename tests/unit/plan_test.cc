#include "vmnet/reconciler/plan.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <linux/neighbour.h>
#include <linux/rtnetlink.h>

namespace vmnet {
namespace {

using ::testing::HasSubstr;

IpAddress Ip(const char* s) { return *IpAddress::Parse(s); }

class PlanTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_.uplinks = {"eth0"};
    model_.Reset(Host());
    spec_ = *ParseVmSpec("vm-1", "vme1a", {"198.51.100.201"}, "02:00:00:00:00:01",
                         SpecRules{});
  }
  // The uplink eth0 (#1, up, forwarding) and the VM link vme1a (#7, down).
  static kernel::Snapshot Host() {
    kernel::Snapshot s;
    kernel::Link uplink;
    uplink.ifindex = 1;
    uplink.name = "eth0";
    uplink.up = true;
    uplink.ipv4_forwarding = true;
    kernel::Link vme;
    vme.ifindex = 7;
    vme.name = "vme1a";
    vme.ipv4_forwarding = false;
    s.links = {uplink, vme};
    return s;
  }
  void Hold(const std::vector<kernel::Write>& writes) {
    for (const auto& w : writes) model_.ApplyWrite(w);
  }

  HostConfig config_;
  KernelModel model_;
  VmSpec spec_;
};

TEST_F(PlanTest, FreshVmNeedsEveryObject) {
  VmPlan plan = PlanVm(spec_, model_, config_);
  EXPECT_EQ(plan.state, VmState::kProgrammed);
  // link up, forwarding, gateway address, route, proxy, neighbour.
  EXPECT_EQ(plan.writes.size(), 6u);
  Hold(plan.writes);
  EXPECT_TRUE(PlanVm(spec_, model_, config_).writes.empty());
}

// The writes of one kind, as text, for readable expectations.
template <typename W>
std::vector<std::string> WritesOf(const std::vector<kernel::Write>& writes) {
  std::vector<std::string> out;
  for (const auto& w : writes) {
    if (std::holds_alternative<W>(w)) out.push_back(kernel::ToString(w));
  }
  return out;
}

class Ipv6PlanTest : public PlanTest {
 protected:
  void SetUp() override {
    PlanTest::SetUp();
    kernel::Snapshot s = Host();
    s.links[0].ipv6 =
        kernel::Ipv6Conf{.forwarding = false, .accept_ra = 1, .proxy_ndp = false};
    s.links[1].ipv6 = kernel::Ipv6Conf{};
    s.ipv6_forwarding_all = false;
    model_.Reset(s);
    spec_ = *ParseVmSpec("vm-1", "vme1a", {"198.51.100.201", "2001:db8:1::201"}, "",
                         SpecRules{});
  }
};

TEST_F(Ipv6PlanTest, DualStackVmGetsRoutesProxiesAndBothGateways) {
  VmPlan plan = PlanVm(spec_, model_, config_);
  EXPECT_EQ(plan.state, VmState::kProgrammed);
  EXPECT_THAT(WritesOf<kernel::AddRoute>(plan.writes),
              ::testing::UnorderedElementsAre(HasSubstr("198.51.100.201/32 dev #7"),
                                              HasSubstr("2001:db8:1::201/128 dev #7")));
  EXPECT_THAT(WritesOf<kernel::SetNeighbor>(plan.writes),
              ::testing::UnorderedElementsAre(
                  HasSubstr("proxy neighbour 198.51.100.201 dev #1"),
                  HasSubstr("proxy neighbour 2001:db8:1::201 dev #1")));
  EXPECT_THAT(WritesOf<kernel::AddAddress>(plan.writes),
              ::testing::UnorderedElementsAre(HasSubstr("169.255.30.1/32 dev #7"),
                                              HasSubstr("fe80::ffff:1:1/128 dev #7")));
  EXPECT_THAT(WritesOf<kernel::SetIpv6Conf>(plan.writes),
              ::testing::ElementsAre("set net.ipv6.conf.vme1a.accept_ra=0"));
  // Once held (the kernel gives the IPv6 route metric 1024), nothing more.
  Hold(plan.writes);
  EXPECT_TRUE(PlanVm(spec_, model_, config_).writes.empty());
}

TEST_F(Ipv6PlanTest, Ipv4OnlyVmGetsNoIpv6Gateway) {
  spec_ = *ParseVmSpec("vm-1", "vme1a", {"198.51.100.201"}, "", SpecRules{});
  VmPlan plan = PlanVm(spec_, model_, config_);
  EXPECT_THAT(WritesOf<kernel::AddAddress>(plan.writes),
              ::testing::ElementsAre(HasSubstr("169.255.30.1/32")));
  EXPECT_TRUE(WritesOf<kernel::SetIpv6Conf>(plan.writes).empty());
}

TEST_F(Ipv6PlanTest, UplinksGetAcceptRa2ProxyNdpThenForwarding) {
  EXPECT_TRUE(WritesOf<kernel::SetIpv6Conf>(PlanUplinks(model_, config_, false)).empty());
  auto writes = PlanUplinks(model_, config_, true);
  EXPECT_THAT(WritesOf<kernel::SetIpv6Conf>(writes),
              ::testing::ElementsAre("set net.ipv6.conf.eth0.accept_ra=2",
                                     "set net.ipv6.conf.eth0.proxy_ndp=1",
                                     "set net.ipv6.conf.all.forwarding=1"));
  Hold(writes);
  EXPECT_TRUE(PlanUplinks(model_, config_, true).empty());
}

TEST_F(Ipv6PlanTest, AcceptRa1IsLeftAloneWhenForwardingWasAlreadyOn) {
  kernel::Snapshot s = Host();
  s.links[0].ipv6 =
      kernel::Ipv6Conf{.forwarding = true, .accept_ra = 1, .proxy_ndp = true};
  s.ipv6_forwarding_all = true;
  model_.Reset(s);
  EXPECT_TRUE(PlanUplinks(model_, config_, true).empty());
}

TEST_F(Ipv6PlanTest, DroppingIpv6RemovesItsObjectsAndTheIpv6GatewayOnly) {
  Hold(PlanVm(spec_, model_, config_).writes);
  VmSpec v4_only = *ParseVmSpec("vm-1", "vme1a", {"198.51.100.201"}, "", SpecRules{});
  auto removal = PlanRemoval(spec_, &v4_only, model_, config_);
  std::vector<std::string> text;
  for (const auto& w : removal) text.push_back(kernel::ToString(w));
  EXPECT_THAT(text, ::testing::UnorderedElementsAre(
                        HasSubstr("delete route 2001:db8:1::201/128"),
                        HasSubstr("delete proxy neighbour 2001:db8:1::201"),
                        HasSubstr("delete conntrack entries of 2001:db8:1::201"),
                        HasSubstr("delete address fe80::ffff:1:1/128")));
}

TEST_F(PlanTest, MissingLinkIsPending) {
  spec_.interface = "vme2b";
  VmPlan plan = PlanVm(spec_, model_, config_);
  EXPECT_EQ(plan.state, VmState::kPending);
  EXPECT_TRUE(plan.writes.empty());
}

TEST_F(PlanTest, LearnedNeighbourIsReplacedButForeignPermanentOneIsNot) {
  kernel::Neighbor learned;
  learned.ifindex = 7;
  learned.address = Ip("198.51.100.201");
  learned.state = NUD_STALE;
  learned.lladdr = MacAddress::Parse("02:00:00:00:00:99");
  model_.Apply(kernel::NeighborEvent{false, learned});
  VmPlan plan = PlanVm(spec_, model_, config_);
  EXPECT_EQ(plan.state, VmState::kProgrammed);

  learned.state = NUD_PERMANENT;
  model_.Apply(kernel::NeighborEvent{false, learned});
  plan = PlanVm(spec_, model_, config_);
  EXPECT_EQ(plan.state, VmState::kFailed);
  EXPECT_THAT(plan.message, HasSubstr("neighbour 198.51.100.201"));
  for (const auto& w : plan.writes) {
    EXPECT_FALSE(std::holds_alternative<kernel::SetNeighbor>(w) &&
                 !std::get<kernel::SetNeighbor>(w).neighbor.proxy)
        << kernel::ToString(w);
  }
}

TEST_F(PlanTest, OurRouteOnAnOldLinkIsMoved) {
  kernel::Route stale;
  stale.destination = IpPrefix::Host(Ip("198.51.100.201"));
  stale.ifindex = 99;
  stale.protocol = config_.protocol;
  stale.scope = RT_SCOPE_LINK;
  model_.Apply(kernel::RouteEvent{false, stale});
  VmPlan plan = PlanVm(spec_, model_, config_);
  int deletes = 0, adds = 0;
  for (const auto& w : plan.writes) {
    deletes += std::holds_alternative<kernel::DeleteRoute>(w);
    adds += std::holds_alternative<kernel::AddRoute>(w);
  }
  EXPECT_EQ(deletes, 1);
  EXPECT_EQ(adds, 1);
}

TEST_F(PlanTest, RemovalTouchesOnlyOurs) {
  Hold(PlanVm(spec_, model_, config_).writes);
  kernel::Neighbor foreign;
  foreign.ifindex = 1;
  foreign.address = Ip("198.51.100.99");
  foreign.proxy = true;
  model_.Apply(kernel::NeighborEvent{false, foreign});
  auto writes = PlanRemoval(spec_, nullptr, model_, config_);
  // route, proxy, neighbour, gateway address, forwarding off, and the
  // address's conntrack entries (issue 12).
  EXPECT_EQ(writes.size(), 6u);
  for (const auto& w : writes) {
    EXPECT_EQ(kernel::ToString(w).find("198.51.100.99"), std::string::npos);
  }
}

TEST_F(PlanTest, OrphansAreOursAndUnwanted) {
  Hold(PlanVm(spec_, model_, config_).writes);
  absl::flat_hash_map<IpAddress, AddressOwner> owners;
  absl::flat_hash_map<std::string, std::string> interfaces;
  EXPECT_EQ(PlanOrphans(model_, config_, owners, interfaces).size(), 4u);
  owners[Ip("198.51.100.201")] = {"vme1a", /*has_mac=*/true};
  interfaces["vme1a"] = "vm-1";
  EXPECT_TRUE(PlanOrphans(model_, config_, owners, interfaces).empty());
  // The spec lost its MAC: our permanent neighbour entry is no longer wanted.
  owners[Ip("198.51.100.201")].has_mac = false;
  EXPECT_EQ(PlanOrphans(model_, config_, owners, interfaces).size(), 1u);
}

TEST_F(PlanTest, OurNeighbourEntryGoesWhenTheSpecHasNoMac) {
  Hold(PlanVm(spec_, model_, config_).writes);
  spec_.mac.reset();
  VmPlan plan = PlanVm(spec_, model_, config_);
  ASSERT_EQ(plan.writes.size(), 1u);
  EXPECT_TRUE(std::holds_alternative<kernel::DeleteNeighbor>(plan.writes[0]));
}

}  // namespace
}  // namespace vmnet
