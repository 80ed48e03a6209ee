// DesiredState is a value type: these tests drive it directly, with no
// thread, over a real StateStore in a temporary directory.
#include "vmnet/reconciler/desired_state.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>

namespace vmnet {
namespace {

VmSpec Spec(const std::string& vm_id, const std::string& interface,
            std::vector<std::string> addresses) {
  auto spec = ParseVmSpec(vm_id, interface, addresses, "", SpecRules{});
  EXPECT_TRUE(spec.ok()) << spec.status();
  return *spec;
}

class DesiredStateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vmnet-desired-state-test.XXXXXX";
    dir_ = mkdtemp(tmpl);
    Reopen();
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // A restart: the store and the state read back from disk.
  void Reopen() {
    state_.reset();
    store_.reset();
    auto store = StateStore::Open(dir_);
    ASSERT_TRUE(store.ok()) << store.status();
    store_.emplace(std::move(*store));
    auto state = DesiredState::Load(&*store_);
    ASSERT_TRUE(state.ok()) << state.status();
    state_.emplace(std::move(*state));
  }

  std::string dir_;
  std::optional<StateStore> store_;
  std::optional<DesiredState> state_;
};

TEST_F(DesiredStateTest, ACommittedBatchIsWhatARestartFinds) {
  state_->Put("vm-1", Spec("vm-1", "vme1a", {"198.51.100.201", "2001:db8::201"}));
  state_->Put("vm-2", Spec("vm-2", "vme2a", {"198.51.100.202"}));
  ASSERT_TRUE(state_->Commit().ok());
  Reopen();
  ASSERT_EQ(state_->size(), 2u);
  EXPECT_EQ(*state_->Find("vm-1")->spec,
            Spec("vm-1", "vme1a", {"198.51.100.201", "2001:db8::201"}));
  EXPECT_EQ(state_->VmOfAddress(*IpAddress::Parse("2001:db8::201")), "vm-1");
  EXPECT_EQ(state_->VmOfInterface("vme2a"), "vm-2");
  EXPECT_EQ(state_->ipv6_vms(), 1u);
}

TEST_F(DesiredStateTest, AnUncommittedBatchIsNotOnDisk) {
  state_->Put("vm-1", Spec("vm-1", "vme1a", {"198.51.100.201"}));
  EXPECT_FALSE(state_->batch_empty());
  Reopen();
  EXPECT_EQ(state_->size(), 0u);
}

TEST_F(DesiredStateTest, ABatchThatCannotBeMadeDurableIsUndoneWhole) {
  state_->Put("vm-1", Spec("vm-1", "vme1a", {"198.51.100.201"}));
  ASSERT_TRUE(state_->Commit().ok());
  // The batch moves vm-1's address to vm-2 and changes vm-1; the disk fails.
  state_->Remove("vm-1");
  state_->Put("vm-2", Spec("vm-2", "vme2a", {"198.51.100.201"}));
  state_->Put("vm-1", Spec("vm-1", "vme1b", {"198.51.100.209"}));
  ASSERT_EQ(state_->batch().size(), 3u);
  std::filesystem::remove_all(dir_);
  EXPECT_FALSE(state_->Commit().ok());
  EXPECT_TRUE(state_->batch_empty());
  ASSERT_EQ(state_->size(), 1u);
  EXPECT_EQ(*state_->Find("vm-1")->spec, Spec("vm-1", "vme1a", {"198.51.100.201"}));
  EXPECT_EQ(state_->Find("vm-2"), nullptr);
  EXPECT_EQ(state_->VmOfAddress(*IpAddress::Parse("198.51.100.201")), "vm-1");
  EXPECT_EQ(state_->VmOfAddress(*IpAddress::Parse("198.51.100.209")), "");
  EXPECT_EQ(state_->VmOfInterface("vme1b"), "");
  EXPECT_EQ(state_->VmOfInterface("vme2a"), "");
}

TEST_F(DesiredStateTest, RemoveFreesTheIndexes) {
  state_->Put("vm-1", Spec("vm-1", "vme1a", {"2001:db8::201"}));
  state_->Remove("vm-1");
  ASSERT_TRUE(state_->Commit().ok());
  EXPECT_EQ(state_->Find("vm-1"), nullptr);
  EXPECT_EQ(state_->VmOfAddress(*IpAddress::Parse("2001:db8::201")), "");
  EXPECT_EQ(state_->VmOfInterface("vme1a"), "");
  EXPECT_EQ(state_->ipv6_vms(), 0u);
}

// The indexes point into the specs: a spec replaced in a batch moves its
// entries to the new spec, and an address or interface it gave up can be
// taken by another VM in the same batch; the undo of a failed batch puts
// every entry back on the spec it names.
TEST_F(DesiredStateTest, ReplacedSpecsMoveTheirIndexEntries) {
  state_->Put("vm-1", Spec("vm-1", "vme1a", {"198.51.100.201"}));
  ASSERT_TRUE(state_->Commit().ok());
  state_->Put("vm-1", Spec("vm-1", "vme1b", {"198.51.100.202"}));
  state_->Put("vm-2", Spec("vm-2", "vme1a", {"198.51.100.201"}));
  EXPECT_EQ(state_->VmOfAddress(*IpAddress::Parse("198.51.100.201")), "vm-2");
  EXPECT_EQ(state_->VmOfAddress(*IpAddress::Parse("198.51.100.202")), "vm-1");
  EXPECT_EQ(state_->VmOfInterface("vme1a"), "vm-2");
  EXPECT_EQ(state_->VmOfInterface("vme1b"), "vm-1");
  // The directory disappears: the batch cannot be durable and is undone.
  std::filesystem::remove_all(dir_);
  ASSERT_FALSE(state_->Commit().ok());
  EXPECT_EQ(state_->VmOfAddress(*IpAddress::Parse("198.51.100.201")), "vm-1");
  EXPECT_EQ(state_->VmOfAddress(*IpAddress::Parse("198.51.100.202")), "");
  EXPECT_EQ(state_->VmOfInterface("vme1a"), "vm-1");
  EXPECT_EQ(state_->VmOfInterface("vme1b"), "");
  EXPECT_EQ(state_->Find("vm-2"), nullptr);
  EXPECT_EQ(state_->Find("vm-1")->spec->interface, "vme1a");
}

TEST_F(DesiredStateTest, RevisionsIncreaseStrictlyAcrossRestarts) {
  uint64_t last = 0;
  for (int run = 0; run < 3; ++run) {
    EXPECT_GT(state_->first_revision(), last);
    for (int i = 0; i < 5; ++i) {
      uint64_t r = state_->IssueRevision();
      EXPECT_GT(r, last);
      last = r;
    }
    Reopen();  // the lease, not each revision, was persisted
  }
}

TEST_F(DesiredStateTest, TheRevisionOfAVmsLastChangeIsKept) {
  state_->Put("vm-1", Spec("vm-1", "vme1a", {"198.51.100.201"}));
  ASSERT_TRUE(state_->Commit().ok());
  // The first revision renews the lease, which persists the VM's revision.
  uint64_t revision = state_->IssueRevision(state_->FindMutable("vm-1"));
  EXPECT_EQ(state_->Find("vm-1")->revision, revision);
  Reopen();
  EXPECT_EQ(state_->Find("vm-1")->revision, revision);
}

}  // namespace
}  // namespace vmnet
