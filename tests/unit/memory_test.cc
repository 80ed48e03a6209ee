// TrimPolicy's decisions, and MemoryTrimmer against glibc's real allocator:
// what a burst of allocations freed leaves the process's RSS once the burst
// is over.
#include "vmnet/agent/memory.h"

#include <unistd.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <vector>

#include "gtest/gtest.h"

namespace vmnet {
namespace {

constexpr size_t kMiB = 1 << 20;

// Busy threshold 4 MiB, settled 256 KiB; the process starts at 30 MiB RSS
// with 10 MiB of slack.
TrimPolicy Policy() { return TrimPolicy(4 * kMiB, kMiB / 4, 30 * kMiB, 10 * kMiB); }

TEST(TrimPolicyTest, ABurstUnderTheBusyThresholdIsTrimmedWhenItEnds) {
  TrimPolicy policy = Policy();
  // A storm: RSS grows by 2 MiB a check and 3 MiB of it ends up free.
  EXPECT_FALSE(policy.Check(32 * kMiB, 11 * kMiB));
  EXPECT_FALSE(policy.Check(34 * kMiB, 12 * kMiB));
  EXPECT_FALSE(policy.Check(36 * kMiB, 13 * kMiB));
  EXPECT_TRUE(policy.moving());
  // The first check that finds it still.
  EXPECT_TRUE(policy.Check(36 * kMiB, 13 * kMiB));
  EXPECT_FALSE(policy.moving());
  policy.Trimmed(33 * kMiB, 10 * kMiB);
  EXPECT_FALSE(policy.Check(33 * kMiB, 10 * kMiB));
}

TEST(TrimPolicyTest, WhileMemoryMovesOnlyTheBusyThresholdTrims) {
  TrimPolicy policy = Policy();
  EXPECT_FALSE(policy.Check(34 * kMiB, 13 * kMiB));
  EXPECT_TRUE(policy.Check(38 * kMiB, 15 * kMiB));  // 5 MiB over the floor
  policy.Trimmed(34 * kMiB, 11 * kMiB);
  // The floor is what the trim left: 3 MiB more is under the busy threshold.
  EXPECT_FALSE(policy.Check(38 * kMiB, 14 * kMiB));
}

TEST(TrimPolicyTest, SlackGrowingWhileRssStandsStillIsTrimmed) {
  TrimPolicy policy = Policy();
  // Under 1 MiB of RSS a check: freed memory the next allocations did not
  // take again.
  EXPECT_FALSE(policy.Check(30 * kMiB + kMiB / 2, 10 * kMiB + kMiB / 8));
  EXPECT_TRUE(policy.Check(31 * kMiB, 10 * kMiB + kMiB / 2));
  EXPECT_FALSE(policy.moving());
}

TEST(TrimPolicyTest, WhatATrimCouldNotGiveBackIsNotTrimmedAgain) {
  TrimPolicy policy = Policy();
  EXPECT_FALSE(policy.Check(36 * kMiB, 12 * kMiB));
  EXPECT_TRUE(policy.Check(36 * kMiB, 12 * kMiB));
  policy.Trimmed(36 * kMiB, 12 * kMiB);  // fragments: nothing came back
  for (int i = 0; i < 3; ++i) EXPECT_FALSE(policy.Check(36 * kMiB, 12 * kMiB));
}

TEST(TrimPolicyTest, WhatComesBackRightAfterATrimIsNotTrimmedAgain) {
  TrimPolicy policy = Policy();
  EXPECT_FALSE(policy.Check(36 * kMiB, 12 * kMiB));
  EXPECT_TRUE(policy.Check(36 * kMiB, 12 * kMiB));
  policy.Trimmed(35 * kMiB, 11 * kMiB);
  // A pass fills its 1 MiB buffer again and frees it: the same slack.
  EXPECT_FALSE(policy.Check(36 * kMiB, 12 * kMiB));
  EXPECT_FALSE(policy.Check(36 * kMiB, 12 * kMiB));
  // More than that, freed later, is trimmed.
  EXPECT_TRUE(policy.Check(36 * kMiB + kMiB / 2, 12 * kMiB + kMiB / 2));
}

TEST(TrimPolicyTest, TheTailOfABurstIsTrimmedWhenItEnds) {
  TrimPolicy policy = Policy();
  EXPECT_TRUE(policy.Check(36 * kMiB, 15 * kMiB));  // moving, 5 MiB over
  policy.Trimmed(31 * kMiB, 10 * kMiB);
  // The burst's last 4 MiB of garbage, still at the next check.
  EXPECT_TRUE(policy.Check(31 * kMiB + kMiB / 2, 14 * kMiB));
}

TEST(TrimPolicyTest, NewGarbageAfterATrimIsTrimmedToo) {
  TrimPolicy policy = Policy();
  EXPECT_TRUE(policy.Check(30 * kMiB, 12 * kMiB));
  policy.Trimmed(28 * kMiB, 10 * kMiB);  // 2 MiB given back
  EXPECT_FALSE(policy.Check(28 * kMiB, 10 * kMiB));
  // A listing's 3 MiB, freed a few checks later.
  EXPECT_FALSE(policy.Check(28 * kMiB + kMiB / 2, 10 * kMiB));
  EXPECT_TRUE(policy.Check(28 * kMiB + kMiB / 2, 13 * kMiB));
}

// Sanitizers replace malloc: malloc_trim and the heap statistics the
// trimmer reads are not theirs.
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)

// Allocates and touches `bytes` in 4 KiB blocks, then frees all but one in
// 1024: what stays keeps glibc from handing the freed memory back itself
// (it does that only at the top of the heap), as a long-lived record
// allocated during a storm does.
std::vector<std::unique_ptr<char[]>> Burst(size_t bytes) {
  std::vector<std::unique_ptr<char[]>> blocks(bytes / 4096);
  for (auto& block : blocks) {
    block.reset(new char[4096]);
    std::memset(block.get(), 1, 4096);
  }
  std::vector<std::unique_ptr<char[]>> kept;
  for (size_t i = 1023; i < blocks.size(); i += 1024)
    kept.push_back(std::move(blocks[i]));
  return kept;  // the others are freed here
}

TEST(MemoryTrimmerTest, GivesBackWhatABurstFreedOnceTheBurstIsOver) {
  constexpr size_t kBurst = 24 << 20;
  // A busy threshold larger than the burst: only the trim after it settles
  // can give the memory back (or glibc itself, when the freed blocks end up
  // at the top of a heap: then this test shows nothing, as it does when the
  // whole suite runs before it).
  MemoryTrimmer trimmer(/*interval_ms=*/10, /*max_interval_ms=*/40,
                        /*busy_slack_bytes=*/size_t{256} << 20,
                        /*settled_slack_bytes=*/size_t{256} << 10);
  size_t before = ResidentBytes();
  auto kept = Burst(kBurst);
  ASSERT_GT(ResidentBytes(), before + kBurst / 2)
      << "the freed burst should still be resident before any trim";

  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (ResidentBytes() > before + (4 << 20) &&
         std::chrono::steady_clock::now() < deadline) {
    usleep(10 * 1000);
  }
  EXPECT_LE(ResidentBytes(), before + (4 << 20))
      << "RSS before the burst " << before << " B; the trimmer trimmed "
      << trimmer.trims() << " times";
}

#endif  // !__SANITIZE_ADDRESS__ && !__SANITIZE_THREAD__

}  // namespace
}  // namespace vmnet
