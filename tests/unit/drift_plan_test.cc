// Issue 13's planning cases, on the model alone: what a restart after a
// crash between saving a spec change and its kernel write must remove, a
// foreign proxy entry in the way, and the model following what the kernel
// says changed.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <linux/if_addr.h>
#include <linux/rtnetlink.h>

#include "vmnet/reconciler/kernel_model.h"
#include "vmnet/reconciler/plan.h"

namespace vmnet {
namespace {

using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr uint8_t kOurs = 237;

kernel::Snapshot Host() {
  kernel::Snapshot s;
  kernel::Link uplink;
  uplink.ifindex = 1;
  uplink.name = "eth0";
  uplink.up = true;
  uplink.ipv4_forwarding = true;
  uplink.ipv6 = kernel::Ipv6Conf{.forwarding = true, .accept_ra = 2, .proxy_ndp = true};
  kernel::Link vme;
  vme.ifindex = 7;
  vme.name = "vme1a";
  vme.up = true;
  vme.ipv4_forwarding = true;
  vme.ipv6 = kernel::Ipv6Conf{.forwarding = true, .accept_ra = 0, .proxy_ndp = false};
  s.links = {uplink, vme};
  s.ipv6_forwarding_all = true;
  return s;
}

std::vector<std::string> Texts(const std::vector<kernel::Write>& writes) {
  std::vector<std::string> out;
  for (const kernel::Write& w : writes) out.push_back(kernel::ToString(w));
  return out;
}

class DriftPlanTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_.uplinks = {"eth0"};
    config_.protocol = kOurs;
    model_.Reset(Host());
  }
  VmSpec Spec(std::vector<std::string> addresses, std::string mac = "") {
    return *ParseVmSpec("vm-1", "vme1a", addresses, mac, SpecRules{});
  }
  // The kernel holds everything `spec` needs.
  void Program(const VmSpec& spec) {
    for (const kernel::Write& w : PlanVm(spec, model_, config_).writes)
      model_.ApplyWrite(w);
    ASSERT_THAT(PlanVm(spec, model_, config_).writes, IsEmpty());
  }
  // What a restart plans for `now`: the VM itself, then the orphan sweep.
  std::vector<std::string> RestartPlan(const VmSpec& now) {
    std::vector<kernel::Write> writes = PlanVm(now, model_, config_).writes;
    for (kernel::Write& w : PlanOrphans(model_, config_, {&now})) writes.push_back(w);
    return Texts(writes);
  }

  HostConfig config_;
  KernelModel model_;
};

TEST_F(DriftPlanTest, FamilyRemovedWhileDownRemovesTheIpv6Gateway) {
  Program(Spec({"198.51.100.201", "2001:db8:1::201"}));
  std::vector<std::string> plan = RestartPlan(Spec({"198.51.100.201"}));
  EXPECT_THAT(plan, Contains(HasSubstr("delete address fe80::ffff:1:1/128")));
  EXPECT_THAT(plan, Contains(HasSubstr("delete route 2001:db8:1::201/128")));
  EXPECT_THAT(plan, Contains(HasSubstr("delete proxy neighbour 2001:db8:1::201")));
}

TEST_F(DriftPlanTest, AddressRemovedWhileDownRemovesItsObjects) {
  Program(Spec({"198.51.100.201", "203.0.113.201"}, "02:00:00:00:00:01"));
  std::vector<std::string> plan =
      RestartPlan(Spec({"198.51.100.201"}, "02:00:00:00:00:01"));
  EXPECT_THAT(plan, Contains(HasSubstr("delete route 203.0.113.201/32")));
  EXPECT_THAT(plan, Contains(HasSubstr("delete proxy neighbour 203.0.113.201")));
  EXPECT_THAT(plan, Contains(HasSubstr("delete neighbour 203.0.113.201")));
  for (const std::string& w : plan) EXPECT_THAT(w, Not(HasSubstr("198.51.100.201")));
}

TEST_F(DriftPlanTest, MacRemovedWhileDownRemovesTheNeighbourEntry) {
  Program(Spec({"198.51.100.201"}, "02:00:00:00:00:01"));
  EXPECT_THAT(RestartPlan(Spec({"198.51.100.201"})),
              Contains(HasSubstr("delete neighbour 198.51.100.201")));
}

TEST_F(DriftPlanTest, ForeignProxyEntryIsAConflictNeverAWrite) {
  kernel::Neighbor foreign;
  foreign.ifindex = 1;
  foreign.address = *IpAddress::Parse("198.51.100.201");
  foreign.proxy = true;
  foreign.protocol = 0;
  model_.Apply(kernel::NeighborEvent{false, foreign});
  VmSpec spec = Spec({"198.51.100.201"});
  VmPlan plan = PlanVm(spec, model_, config_);
  EXPECT_EQ(plan.state, VmState::kFailed);
  EXPECT_THAT(plan.message, HasSubstr("proxy neighbour 198.51.100.201"));
  EXPECT_THAT(plan.message, HasSubstr("not vmnetd's"));
  for (const std::string& w : Texts(plan.writes)) EXPECT_THAT(w, Not(HasSubstr("proxy")));
  // Not ours: neither a detach nor the sweep deletes it.
  EXPECT_THAT(Texts(PlanRemoval(spec, nullptr, model_, config_)),
              Not(Contains(HasSubstr("proxy"))));
  EXPECT_THAT(Texts(PlanOrphans(model_, config_, {})), Not(Contains(HasSubstr("proxy"))));
}

TEST_F(DriftPlanTest, LinkSettingsEventsUpdateTheModel) {
  kernel::Link vme{*model_.LinkByName("vme1a"), {}};
  vme.ipv6.reset();  // an MTU below 1280
  model_.Apply(kernel::LinkEvent{false, vme});
  VmSpec spec = Spec({"198.51.100.201", "2001:db8:1::201"});
  EXPECT_THAT(PlanVm(spec, model_, config_).message, HasSubstr("has no IPv6"));
  vme.ipv6 = kernel::Ipv6Conf{.forwarding = true, .accept_ra = 0, .proxy_ndp = false};
  KernelModel::Touched touched = model_.Apply(kernel::LinkEvent{false, vme});
  EXPECT_THAT(touched.links, Contains("vme1a"));
  EXPECT_EQ(PlanVm(spec, model_, config_).state, VmState::kProgrammed);

  touched = model_.Apply(kernel::HostSettingsEvent{false});
  EXPECT_TRUE(touched.everything);
  EXPECT_EQ(model_.ipv6_forwarding_all(), false);
  EXPECT_THAT(Texts(PlanUplinks(model_, config_, true)),
              Contains(HasSubstr("forwarding")));
}

TEST_F(DriftPlanTest, UplinkComingUpIsNamed) {
  kernel::Link uplink{*model_.LinkByName("eth0"), {}};
  uplink.up = false;
  EXPECT_THAT(model_.Apply(kernel::LinkEvent{false, uplink}).came_up, IsEmpty());
  uplink.up = true;
  EXPECT_THAT(model_.Apply(kernel::LinkEvent{false, uplink}).came_up, Contains("eth0"));
}

}  // namespace
}  // namespace vmnet
