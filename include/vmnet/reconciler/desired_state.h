// The VMs this host must hold, as the control plane declared them: each VM's
// spec with its state, message and revision; the indexes that find the VM of
// an address or an interface; changes made in batches that become durable
// together or not at all; and the revisions, issued strictly increasing
// across restarts.
//
// A value type: no threads and no locks. The reconciler thread owns one;
// readers on other threads see a VmDirectory (vm_directory.h) instead.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/node_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "vmnet/state/state_store.h"
#include "vmnet/vm/vm.h"

namespace vmnet {

struct VmRecord {
  // Never null. Immutable and shared: the VmDirectory holds the same copy,
  // and the indexes below point into it.
  std::shared_ptr<const VmSpec> spec;
  VmState state = VmState::kPending;
  std::string message;
  uint64_t revision = 0;  // of the VM's last change
  // The wait before the next retry after a failed write.
  std::chrono::milliseconds backoff{0};

  VmView View() const { return VmView{spec, state, message, revision}; }
};

class DesiredState {
 public:
  // Revisions are leased ahead in blocks, so that the lease is persisted
  // rarely and a restart still starts above every revision ever issued.
  static constexpr uint64_t kRevisionLease = 1 << 20;

  // What `store` holds; the store must outlive the state. FAILED_PRECONDITION
  // naming the file when it is damaged.
  static absl::StatusOr<DesiredState> Load(StateStore* store);

  const VmRecord* Find(const std::string& vm_id) const;
  // For the reconciler's outcomes (state, message, backoff): not durable.
  VmRecord* FindMutable(const std::string& vm_id);
  // The VM that holds an address or an interface; empty when none.
  std::string VmOfAddress(const IpAddress& address) const;
  std::string VmOfInterface(const std::string& interface) const;
  // The VM whose allowed_source_prefixes name exactly this address (a /32
  // or /128); empty when none.
  std::string VmAllowingAddress(const IpAddress& address) const;
  size_t size() const { return vms_.size(); }
  // VMs with an IPv6 address: the host's IPv6 settings are made for them.
  size_t ipv6_vms() const { return ipv6_vms_; }
  const absl::node_hash_map<std::string, VmRecord>& vms() const { return vms_; }

  // A batch: Put and Remove change the records at once and remember how to
  // undo it; Commit makes the whole batch durable, or undoes it and returns
  // why it could not.
  void Put(const std::string& vm_id, VmSpec spec);
  void Remove(const std::string& vm_id);
  bool batch_empty() const { return undo_.empty(); }
  absl::Status Commit();
  // The VMs the batch changed, oldest first, with what each held before
  // (nullopt: it did not exist).
  const std::vector<std::pair<std::string, std::optional<VmRecord>>>& batch() const {
    return undo_;
  }

  // The revision of the next change: strictly above every revision issued
  // before, this run or any earlier one. With `vm` (a record of this
  // state), it becomes the VM's revision. Persists a new lease when the
  // current one runs low, VM revisions with it (a failure to is logged; the
  // lease still holds half a block).
  uint64_t IssueRevision(VmRecord* vm = nullptr);
  // The first revision this run issues (the event log starts there).
  uint64_t first_revision() const { return first_revision_; }

 private:
  explicit DesiredState(StateStore* store) : store_(store) {}
  void Set(const std::string& vm_id, std::optional<VmRecord> record);
  absl::Status Persist() const;

  StateStore* store_;
  // A node per VM: a flat map's slots would be a whole VmRecord each, with a
  // third to a half of them empty after each doubling.
  absl::node_hash_map<std::string, VmRecord> vms_;
  // The indexes point into the records' specs (an interface key views the
  // spec's own string): a slot is 24 to 32 bytes instead of two strings.
  // Set erases a record's index entries before the record.
  absl::flat_hash_map<IpAddress, const VmSpec*> vm_of_address_;
  absl::flat_hash_map<absl::string_view, const VmSpec*> vm_of_interface_;
  absl::flat_hash_map<IpAddress, const VmSpec*> vm_allowing_address_;
  size_t ipv6_vms_ = 0;
  std::vector<std::pair<std::string, std::optional<VmRecord>>> undo_;
  uint64_t revision_lease_ = 0;
  uint64_t last_revision_ = 0;
  uint64_t first_revision_ = 1;
};

}  // namespace vmnet
