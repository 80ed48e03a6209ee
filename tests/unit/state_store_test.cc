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

// ---- The journal ----

class StateJournalTest : public StateStoreTest {
 protected:
  static StoredVm Vm(const char* id, const char* link, const char* address,
                     uint64_t revision) {
    return {*ParseVmSpec(id, link, {address}, "", SpecRules{}), revision};
  }
  static absl::Status Append(StateStore& store, const std::vector<StoredVm>& vms,
                             const std::vector<std::string>& removed, uint64_t lease) {
    std::vector<StoredVmRef> refs;
    for (const StoredVm& vm : vms) refs.push_back({&vm.spec, vm.revision});
    return store.Append(refs, removed, lease);
  }
  std::string journal_path() const { return dir_ + "/journal.bin"; }
  std::string Read(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(f)),
                       std::istreambuf_iterator<char>());
  }
  void Write(const std::string& path, const std::string& bytes) {
    std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
  }
  // Example() with vm-1 at revision 11, vm-2 removed, vm-3 added; lease 99.
  StoredState AfterBoth() {
    StoredState s;
    s.revision_lease = 99;
    s.vms.push_back(Example().vms[0]);
    s.vms[0].revision = 11;
    s.vms.push_back(Vm("vm-3", "vme3a", "198.51.100.203", 12));
    return s;
  }
  void AppendBoth(StateStore& store) {
    StoredVm vm1 = Example().vms[0];
    vm1.revision = 11;
    ASSERT_TRUE(
        Append(store, {vm1, Vm("vm-3", "vme3a", "198.51.100.203", 12)}, {}, 42).ok());
    ASSERT_TRUE(Append(store, {}, {"vm-2"}, 99).ok());
  }
};

TEST_F(StateJournalTest, CommitsAppendAndLoadOverTheStateFile) {
  {
    auto store = StateStore::Open(dir_);
    EXPECT_TRUE(store->WantsSave()) << "no state file yet";
    ASSERT_TRUE(store->Save(Example()).ok());
    std::string state_file = Read(store->path());
    EXPECT_FALSE(store->WantsSave());
    AppendBoth(*store);
    EXPECT_EQ(Read(store->path()), state_file) << "an append rewrote the state file";
    EXPECT_GT(store->journal_bytes(), 0u);
    EXPECT_FALSE(store->WantsSave()) << "a small journal is no reason to rewrite";
  }
  auto store = StateStore::Open(dir_);
  auto state = store->Load();
  ASSERT_TRUE(state.ok()) << state.status();
  EXPECT_EQ(*state, AfterBoth());
}

TEST_F(StateJournalTest, SaveEmptiesTheJournal) {
  {
    auto store = StateStore::Open(dir_);
    ASSERT_TRUE(store->Save(Example()).ok());
    AppendBoth(*store);
    ASSERT_TRUE(store->Save(AfterBoth()).ok());
    EXPECT_EQ(store->journal_bytes(), 0u);
    EXPECT_EQ(Read(journal_path()), "");
  }
  auto state = StateStore::Open(dir_)->Load();
  ASSERT_TRUE(state.ok()) << state.status();
  EXPECT_EQ(*state, AfterBoth());
}

// A crash after the new state file's rename and before the journal was
// emptied: its frames are applied again over a file that holds them.
TEST_F(StateJournalTest, AJournalReplayedOverTheFileThatHoldsItChangesNothing) {
  {
    auto store = StateStore::Open(dir_);
    ASSERT_TRUE(store->Save(Example()).ok());
    AppendBoth(*store);
    std::string journal = Read(journal_path());
    ASSERT_TRUE(store->Save(AfterBoth()).ok());
    Write(journal_path(), journal);
  }
  auto state = StateStore::Open(dir_)->Load();
  ASSERT_TRUE(state.ok()) << state.status();
  EXPECT_EQ(*state, AfterBoth());
}

// A crash in the middle of an append: the torn frame was never
// acknowledged; it is dropped, and cut off so that later frames count.
TEST_F(StateJournalTest, ATornLastFrameIsDroppedAndCutOffAtOpen) {
  size_t first_frame = 0;
  {
    auto store = StateStore::Open(dir_);
    ASSERT_TRUE(store->Save(Example()).ok());
    StoredVm vm1 = Example().vms[0];
    vm1.revision = 11;
    ASSERT_TRUE(Append(*store, {vm1}, {}, 42).ok());
    first_frame = store->journal_bytes();
    ASSERT_TRUE(Append(*store, {}, {"vm-2"}, 99).ok());
  }
  std::string journal = Read(journal_path());
  for (size_t cut : {first_frame + 1, first_frame + 15, journal.size() - 1}) {
    Write(journal_path(), journal.substr(0, cut));
    auto store = StateStore::Open(dir_);
    ASSERT_TRUE(store.ok()) << store.status();
    EXPECT_EQ(Read(journal_path()).size(), first_frame) << "cut at " << cut;
    auto state = store->Load();
    ASSERT_TRUE(state.ok()) << state.status();
    ASSERT_EQ(state->vms.size(), 2u) << "cut at " << cut;
    EXPECT_EQ(state->vms[0].revision, 11u);
  }
  {
    auto store = StateStore::Open(dir_);
    ASSERT_TRUE(
        Append(*store, {Vm("vm-3", "vme3a", "198.51.100.203", 12)}, {"vm-2"}, 99).ok());
  }
  auto state = StateStore::Open(dir_)->Load();
  ASSERT_TRUE(state.ok()) << state.status();
  EXPECT_EQ(*state, AfterBoth());
}

// A bad frame with frames after it is not a torn append: damage, reported
// naming the journal, never a silently older state.
TEST_F(StateJournalTest, ADamagedFrameBeforeOthersIsReportedNamingTheJournal) {
  {
    auto store = StateStore::Open(dir_);
    ASSERT_TRUE(store->Save(Example()).ok());
    AppendBoth(*store);
  }
  std::string journal = Read(journal_path());
  journal[20] ^= 0x5a;
  Write(journal_path(), journal);
  auto store = StateStore::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  auto state = store->Load();
  ASSERT_FALSE(state.ok());
  EXPECT_EQ(state.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(state.status().message()), HasSubstr(journal_path()));
  EXPECT_THAT(std::string(state.status().message()), HasSubstr("damaged"));
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
