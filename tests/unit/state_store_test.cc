#include "vmnet/state/state_store.h"

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

namespace vmnet {
namespace {

using ::testing::HasSubstr;

class StateStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vmnet-state-test.XXXXXX";
    dir_ = mkdtemp(tmpl);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  StoredState Example() {
    StoredState s;
    s.revision_lease = 42;
    s.vms.push_back({*ParseVmSpec("vm-1", "vme1a", {"198.51.100.201"},
                                  "02:00:00:00:00:01", SpecRules{}),
                     7});
    s.vms.push_back({*ParseVmSpec("vm-2", "vme2a", {"198.51.100.202", "203.0.113.5"}, "",
                                  SpecRules{}),
                     9});
    return s;
  }

  std::string dir_;
};

TEST_F(StateStoreTest, EmptyDirectoryLoadsEmptyState) {
  auto store = StateStore::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  auto state = store->Load();
  ASSERT_TRUE(state.ok());
  EXPECT_TRUE(state->vms.empty());
}

TEST_F(StateStoreTest, SavedStateSurvivesReopen) {
  {
    auto store = StateStore::Open(dir_);
    ASSERT_TRUE(store->Save(Example()).ok());
  }
  auto store = StateStore::Open(dir_);
  auto state = store->Load();
  ASSERT_TRUE(state.ok()) << state.status();
  EXPECT_EQ(*state, Example());
}

TEST_F(StateStoreTest, BandwidthLimitsAndThePacketRateAreKept) {
  StoredState s = Example();
  s.vms[0].spec.bandwidth = {20000000, 8000000, 30000, 200};
  s.vms[1].spec.bandwidth.egress_packets_per_second = 1000000000;
  auto decoded = StateStore::Decode(StateStore::Encode(s));
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(*decoded, s);
}

TEST_F(StateStoreTest, SecondAgentOnSameDirectoryIsRefused) {
  auto first = StateStore::Open(dir_);
  ASSERT_TRUE(first.ok());
  auto second = StateStore::Open(dir_);
  ASSERT_FALSE(second.ok());
  EXPECT_THAT(std::string(second.status().message()), HasSubstr("locked"));
}

TEST_F(StateStoreTest, EveryDamagedByteIsReportedNamingTheFile) {
  std::string good = StateStore::Encode(Example());
  // Flip each byte in turn: none may load as a valid (possibly empty) state.
  for (size_t i = 0; i < good.size(); ++i) {
    std::string bad = good;
    bad[i] ^= 0x5a;
    EXPECT_FALSE(StateStore::Decode(bad).ok()) << "byte " << i;
  }
  // Truncation at every length, too.
  for (size_t n = 0; n < good.size(); ++n) {
    EXPECT_FALSE(StateStore::Decode(good.substr(0, n)).ok()) << "length " << n;
  }
  auto store = StateStore::Open(dir_);
  {
    std::ofstream f(store->path(), std::ios::binary);
    f << good.substr(0, good.size() / 2);
  }
  auto state = store->Load();
  ASSERT_FALSE(state.ok());
  EXPECT_EQ(state.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(state.status().message()), HasSubstr(store->path()));
}

TEST_F(StateStoreTest, LeftoverTemporaryFileDoesNotBlockStart) {
  auto store = StateStore::Open(dir_);
  ASSERT_TRUE(store->Save(Example()).ok());
  // A crash between writing the temporary file and the rename leaves it.
  std::ofstream(store->path() + ".tmp") << "half written";
  auto state = store->Load();
  ASSERT_TRUE(state.ok());
  EXPECT_EQ(*state, Example());
  ASSERT_TRUE(store->Save(Example()).ok());
}

// Issue 13, item 7: `rm -rf` of the state directory and a `mkdir` of it under
// a running agent.
TEST_F(StateStoreTest, SaveFailsWhenTheDirectoryWasRemoved) {
  auto store = StateStore::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  ASSERT_TRUE(store->Save(Example()).ok());
  std::filesystem::remove_all(dir_);
  absl::Status s = store->Save(Example());
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(dir_));
  EXPECT_THAT(std::string(s.message()), HasSubstr("was removed"));
  EXPECT_FALSE(std::filesystem::exists(dir_)) << "Save recreated the directory";
}

TEST_F(StateStoreTest, SaveFailsWhenTheDirectoryWasReplacedAndWritesNothingThere) {
  auto store = StateStore::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  ASSERT_TRUE(store->Save(Example()).ok());
  std::filesystem::remove_all(dir_);
  ASSERT_TRUE(std::filesystem::create_directory(dir_));

  absl::Status s = store->Save(Example());
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(dir_));
  EXPECT_THAT(std::string(s.message()), HasSubstr("was removed"));
  EXPECT_TRUE(store->CheckDirectory().code() == absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(std::filesystem::is_empty(dir_)) << "Save wrote into the new directory";

  // A second agent on the new directory takes its lock and sees no state.
  auto second = StateStore::Open(dir_);
  ASSERT_TRUE(second.ok()) << second.status();
  auto state = second->Load();
  ASSERT_TRUE(state.ok()) << state.status();
  EXPECT_TRUE(state->vms.empty());
  // And the first still refuses, while the second saves.
  EXPECT_FALSE(store->Save(Example()).ok());
  ASSERT_TRUE(second->Save(StoredState{}).ok());
  EXPECT_FALSE(store->Save(Example()).ok());
  state = second->Load();
  ASSERT_TRUE(state.ok()) << state.status();
  EXPECT_TRUE(state->vms.empty()) << "the first store's write reached the new directory";
}

TEST_F(StateStoreTest, SaveFailsWhenTheDirectoryWasMovedAway) {
  auto store = StateStore::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  std::string moved = dir_ + ".moved";
  std::filesystem::rename(dir_, moved);
  absl::Status s = store->Save(Example());
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(dir_));
  ASSERT_TRUE(std::filesystem::create_directory(dir_));
  s = store->Save(Example());
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("was replaced"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("move the directory it locked back"));
  EXPECT_TRUE(std::filesystem::is_empty(dir_));
  // Put back where it was, it is the locked directory again.
  std::filesystem::remove(dir_);
  std::filesystem::rename(moved, dir_);
  ASSERT_TRUE(store->Save(Example()).ok());
  auto state = store->Load();
  ASSERT_TRUE(state.ok()) << state.status();
  EXPECT_EQ(*state, Example());
}

}  // namespace
}  // namespace vmnet
