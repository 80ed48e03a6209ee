// The bandwidth limits' plan over a model built by hand, and the reconciler
// over the fake kernel: what is installed, changed in place, repaired,
// removed, and what is never touched.
#include "vmnet/reconciler/plan_bandwidth.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "vmnet/kernel/tc_codec.h"

namespace vmnet {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr uint64_t k20M = 20'000'000;

class PlanBandwidthTest : public ::testing::Test {
 protected:
  void SetUp() override {
    kernel::Snapshot s;
    kernel::Link vme;
    vme.ifindex = 7;
    vme.name = "vme1a";
    vme.up = true;
    vme.kind = "veth";
    s.links = {vme};
    model_.Reset(s);
    spec_ = *ParseVmSpec("vm-1", "vme1a", {"198.51.100.201"}, "", SpecRules{});
    spec_.bandwidth.ingress_bits_per_second = k20M;
    spec_.bandwidth.egress_bits_per_second = k20M;
  }
  VmPlan Plan() {
    VmPlan plan;
    PlanBandwidth(spec_, *model_.LinkByName("vme1a"), model_, &plan);
    return plan;
  }
  std::vector<std::string> Text(const std::vector<kernel::Write>& writes) {
    std::vector<std::string> out;
    for (const auto& w : writes) out.push_back(kernel::ToString(w));
    return out;
  }
  // What the kernel would announce after the ifb is created.
  void IfbAppears(int ifindex = 9) {
    kernel::Link ifb;
    ifb.ifindex = ifindex;
    ifb.name = "vmb1a";
    ifb.kind = "ifb";
    ifb.up = true;
    touched_ = model_.Apply(kernel::LinkEvent{false, ifb});
  }
  void Hold(const std::vector<kernel::Write>& writes) {
    for (const auto& w : writes) model_.ApplyWrite(w);
  }

  KernelModel model_;
  VmSpec spec_;
  KernelModel::Touched touched_;
};

TEST(IfbNameTest, DerivedFromTheLinkAndFitsIfnamsiz) {
  EXPECT_EQ(kernel::IfbName("vme7b9a73a1"), "vmb7b9a73a1");
  EXPECT_EQ(kernel::IfbName("vme123456789abc"), "vmb123456789abc");
  std::string odd = kernel::IfbName("vmb1");  // would be its own name
  EXPECT_EQ(odd.size(), 15u);
  EXPECT_NE(odd, "vmb1");
  EXPECT_EQ(kernel::IfbName("tap0"), "vmb0");
  EXPECT_EQ(kernel::IfbName("x"), kernel::IfbName("x"));
  EXPECT_EQ(kernel::IfbName("x").size(), 15u);
}

// The ifb's ifindex is unknown until it exists, so its tbf and the redirect
// ride on its create: the VM is PROGRAMMED after one pass, and once the
// kernel's events for what the create made are in, nothing is left to do.
TEST_F(PlanBandwidthTest, InstallsInOnePassThenNothing) {
  VmPlan first = Plan();
  EXPECT_EQ(first.state, VmState::kProgrammed) << first.message;
  EXPECT_THAT(Text(first.writes),
              ElementsAre(HasSubstr("qdisc tbf ed: dev #7 root rate 20000000bit"),
                          HasSubstr("qdisc ingress ffff: dev #7 ingress"),
                          "create ifb link vmb1a for vme1a with tbf rate 20000000bit "
                          "burst 65536b, and redirect dev #7 to it"));
  const auto& create = std::get<kernel::CreateIfb>(first.writes[2]);
  EXPECT_EQ(create.tbf, kernel::Tbf(0, k20M, kernel::DefaultBurstBytes(k20M)));
  EXPECT_EQ(create.redirect.ifindex, 7);
  EXPECT_EQ(create.redirect.redirect_ifindex, 0);
  // What the kernel layer writes once it knows the ifb is #9.
  EXPECT_THAT(
      Text(kernel::IfbFollowUps(create, 9)),
      ElementsAre(HasSubstr("qdisc tbf ed: dev #9 root rate 20000000bit"),
                  HasSubstr("add filter dev #7 parent ffff: prio 237 u32 match all "
                            "action mirred egress redirect dev #9")));
  Hold(first.writes);
  IfbAppears();
  // The ifb's RTM_NEWLINK plans the VM again: its link is touched.
  EXPECT_THAT(touched_.links, ::testing::Contains("vme1a"));
  Hold(kernel::IfbFollowUps(create, 9));
  VmPlan second = Plan();
  EXPECT_EQ(second.state, VmState::kProgrammed);
  EXPECT_TRUE(second.writes.empty()) << ::testing::PrintToString(Text(second.writes));
}

// An ifb that is there but has lost its tbf and redirect (or a redirect to an
// older ifb) gets them back as writes of their own.
TEST_F(PlanBandwidthTest, AnExistingIfbGetsItsTbfAndRedirect) {
  IfbAppears();
  VmPlan plan = Plan();
  EXPECT_EQ(plan.state, VmState::kProgrammed);
  EXPECT_THAT(
      Text(plan.writes),
      ElementsAre(HasSubstr("qdisc tbf ed: dev #7 root rate 20000000bit"),
                  HasSubstr("qdisc tbf ed: dev #9 root rate 20000000bit"),
                  HasSubstr("qdisc ingress ffff: dev #7 ingress"),
                  HasSubstr("add filter dev #7 parent ffff: prio 237 u32 match all "
                            "action mirred egress redirect dev #9")));
  Hold(plan.writes);
  EXPECT_TRUE(Plan().writes.empty());
}

TEST_F(PlanBandwidthTest, ChangedLimitIsOneReplace) {
  IfbAppears();
  Hold(Plan().writes);
  ASSERT_TRUE(Plan().writes.empty());
  spec_.bandwidth.ingress_bits_per_second = 8'000'000;
  VmPlan plan = Plan();
  ASSERT_EQ(plan.writes.size(), 1u);
  const auto& set = std::get<kernel::SetQdisc>(plan.writes[0]);
  EXPECT_EQ(set.qdisc.rate_bytes_per_second, 1'000'000u);
  EXPECT_EQ(set.qdisc.handle, kernel::kQdiscHandle);
}

TEST_F(PlanBandwidthTest, DriftIsRepaired) {
  IfbAppears();
  Hold(Plan().writes);
  // tc qdisc del dev vme1a root
  model_.Apply(kernel::QdiscEvent{true, *model_.FindQdisc(7, kernel::kRootParent)});
  EXPECT_THAT(Text(Plan().writes),
              ElementsAre(HasSubstr("replace qdisc tbf ed: dev #7")));
  Hold(Plan().writes);
  // The ifb recreated with another ifindex: the filter is put back to it.
  model_.Apply(kernel::LinkEvent{true, {*model_.LinkByName("vmb1a"), {}}});
  IfbAppears(12);
  EXPECT_THAT(Text(Plan().writes),
              ElementsAre(HasSubstr("qdisc tbf ed: dev #12"), HasSubstr("delete filter"),
                          HasSubstr("redirect dev #12")));
}

TEST_F(PlanBandwidthTest, ForeignRootQdiscFailsTheVmUntouched) {
  kernel::Qdisc htb{
      .ifindex = 7, .parent = kernel::kRootParent, .handle = 0x10000, .kind = "htb"};
  model_.Apply(kernel::QdiscEvent{false, htb});
  spec_.bandwidth.egress_bits_per_second = 0;
  VmPlan plan = Plan();
  EXPECT_EQ(plan.state, VmState::kFailed);
  EXPECT_THAT(plan.message, HasSubstr("qdisc htb 1: dev #7"));
  EXPECT_THAT(plan.message, HasSubstr("not vmnetd's"));
  EXPECT_TRUE(plan.writes.empty());
  // The kernel's default root (handle 0) is replaced.
  htb.handle = 0;
  htb.kind = "noqueue";
  model_.Apply(kernel::QdiscEvent{false, htb});
  EXPECT_EQ(Plan().state, VmState::kProgrammed);
}

TEST_F(PlanBandwidthTest, LimitGoneRemovesOnlyOurs) {
  IfbAppears();
  Hold(Plan().writes);
  // Someone else's filter on the same ingress qdisc.
  kernel::TcFilter theirs{.ifindex = 7, .prio = 1, .match_all = false};
  model_.Apply(kernel::TcFilterEvent{false, theirs});
  spec_.bandwidth = {};
  EXPECT_THAT(Text(Plan().writes),
              ElementsAre(HasSubstr("delete qdisc tbf ed: dev #7"),
                          HasSubstr("delete filter dev #7 parent ffff: prio 237"),
                          HasSubstr("delete link vmb1a")));
}

TEST_F(PlanBandwidthTest, DetachAndOrphans) {
  IfbAppears();
  Hold(Plan().writes);
  std::vector<kernel::Write> writes;
  PlanBandwidthRemoval(spec_, nullptr, model_, &writes);
  EXPECT_THAT(Text(writes), ElementsAre(HasSubstr("delete qdisc tbf ed: dev #7"),
                                        HasSubstr("delete filter dev #7"),
                                        HasSubstr("delete qdisc ingress"),
                                        HasSubstr("delete link vmb1a")));
  // The same objects are orphans when no desired VM wants them...
  std::vector<kernel::Write> orphans;
  PlanBandwidthOrphans(model_, {}, &orphans);
  EXPECT_EQ(Text(orphans).size(), 4u);
  // ...and none while the VM is desired.
  orphans.clear();
  PlanBandwidthOrphans(model_, {&spec_}, &orphans);
  EXPECT_TRUE(orphans.empty()) << ::testing::PrintToString(Text(orphans));
}

TEST(TbfTest, MatchesTheKernelsRounding) {
  kernel::Qdisc want = kernel::Tbf(7, k20M, 65536);
  kernel::Qdisc have = want;
  have.burst_bytes -= 1;
  EXPECT_TRUE(kernel::TbfMatches(have, want));
  have.burst_bytes -= 100;
  EXPECT_FALSE(kernel::TbfMatches(have, want));
  EXPECT_EQ(kernel::DefaultBurstBytes(k20M), 65536u);
  EXPECT_EQ(kernel::DefaultBurstBytes(10'000'000'000ull), 12'500'000u);
}

}  // namespace
}  // namespace vmnet
