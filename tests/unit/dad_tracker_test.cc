#include "vmnet/reconciler/dad_tracker.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace vmnet {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

IpAddress Ip(const char* s) { return *IpAddress::Parse(s); }

VmSpec Spec(std::vector<std::string> addresses) {
  auto spec = ParseVmSpec("vm-1", "vme1a", addresses, "", SpecRules{});
  EXPECT_TRUE(spec.ok()) << spec.status();
  return *spec;
}

TEST(DadTrackerTest, NewAddressesWaitForOneProbe) {
  DadTracker dad;
  VmSpec spec = Spec({"198.51.100.201", "2001:db8::201"});
  auto split = dad.Split(spec);
  EXPECT_THAT(split.spec.addresses, IsEmpty());
  EXPECT_THAT(split.unverified, ElementsAre(Ip("198.51.100.201"), Ip("2001:db8::201")));
  EXPECT_TRUE(split.start_probe);
  dad.ProbeStarted("vm-1");
  EXPECT_FALSE(dad.Split(spec).start_probe);  // one probe at a time
}

TEST(DadTrackerTest, AddressesNobodyAnsweredForArePublished) {
  DadTracker dad;
  VmSpec spec = Spec({"198.51.100.201"});
  dad.ProbeStarted("vm-1");
  EXPECT_EQ(dad.ProbeDone(spec, {Ip("198.51.100.201")}, {}), 0u);
  auto split = dad.Split(spec);
  EXPECT_THAT(split.spec.addresses, ElementsAre(Ip("198.51.100.201")));
  EXPECT_THAT(split.unverified, IsEmpty());
  EXPECT_FALSE(split.start_probe);
  // A new address is probed; the verified one stays published meanwhile.
  VmSpec grown = Spec({"198.51.100.201", "198.51.100.202"});
  split = dad.Split(grown);
  EXPECT_THAT(split.spec.addresses, ElementsAre(Ip("198.51.100.201")));
  EXPECT_THAT(split.unverified, ElementsAre(Ip("198.51.100.202")));
  EXPECT_TRUE(split.start_probe);
}

TEST(DadTrackerTest, AnAnswerFailsTheVmUntilCleared) {
  DadTracker dad;
  VmSpec spec = Spec({"198.51.100.201", "198.51.100.202"});
  MacAddress mac = *MacAddress::Parse("02:00:00:00:00:0a");
  EXPECT_EQ(dad.ProbeDone(spec, spec.addresses, {{Ip("198.51.100.202"), "eth0", mac}}),
            1u);
  EXPECT_THAT(dad.Failure("vm-1"),
              HasSubstr("198.51.100.202 is answered on eth0 by 02:00:00:00:00:0a"));
  auto split = dad.Split(spec);
  EXPECT_THAT(split.spec.addresses, IsEmpty());  // nothing is published
  EXPECT_FALSE(split.start_probe);               // nor probed again by itself
  EXPECT_TRUE(dad.ClearFailure("vm-1"));
  EXPECT_FALSE(dad.ClearFailure("vm-1"));
  EXPECT_TRUE(dad.Split(spec).start_probe);
}

TEST(DadTrackerTest, AnswersAboutAddressesTheVmNoLongerWantsAreIgnored) {
  DadTracker dad;
  MacAddress mac = *MacAddress::Parse("02:00:00:00:00:0a");
  VmSpec now = Spec({"198.51.100.201"});
  EXPECT_EQ(dad.ProbeDone(now, {Ip("198.51.100.201"), Ip("198.51.100.209")},
                          {{Ip("198.51.100.209"), "eth0", mac}}),
            0u);
  EXPECT_EQ(dad.Failure("vm-1"), "");
  EXPECT_THAT(dad.Split(now).spec.addresses, ElementsAre(Ip("198.51.100.201")));
}

TEST(DadTrackerTest, ForgetDropsEverything) {
  DadTracker dad;
  dad.MarkVerified("vm-1", Ip("198.51.100.201"));
  EXPECT_THAT(dad.Split(Spec({"198.51.100.201"})).spec.addresses,
              ElementsAre(Ip("198.51.100.201")));
  dad.Forget("vm-1");
  EXPECT_THAT(dad.Split(Spec({"198.51.100.201"})).spec.addresses, IsEmpty());
}

}  // namespace
}  // namespace vmnet
