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
    model_.Reset(s);
    spec_ = *ParseVmSpec("vm-1", "vme1a", {"198.51.100.201"}, "02:00:00:00:00:01", SpecRules{});
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
  // route, proxy, neighbour, gateway address, forwarding off.
  EXPECT_EQ(writes.size(), 5u);
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
