// What API threads and scrapes read of the VMs: each VM as of the end of the
// reconciler's last pass, and who holds each address and interface. The
// reconciler thread updates it after each pass with the VMs that changed;
// its lock is never held across a disk write or a kernel call, so a GetVm
// during an attach storm waits for nothing but a few map updates.
//
// Thread safety: all methods may be called from any thread.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/node_hash_set.h"
#include "absl/hash/hash.h"
#include "absl/strings/string_view.h"
#include "vmnet/base/mutex.h"
#include "vmnet/reconciler/desired_state.h"
#include "vmnet/reconciler/spec_index.h"
#include "vmnet/vm/vm.h"

namespace vmnet {

class VmDirectory {
 public:
  // Replaces the VM's entry with the record's spec (shared, not copied),
  // state, message and revision; nullptr removes it.
  void Update(const std::string& vm_id, const VmRecord* record);

  std::vector<VmView> All() const;
  std::optional<VmView> Find(const std::string& vm_id) const;
  // Empty when no VM holds it.
  std::string VmOfAddress(const IpAddress& address) const;
  std::string VmOfInterface(const std::string& interface) const;

 private:
  // A VM as a VmView holds it, in 40 bytes: the message (empty for most
  // VMs) is a pointer, and the key is the spec's own vm_id.
  struct Entry {
    std::shared_ptr<const VmSpec> spec;
    StateMessage message;
    uint64_t revision;
    VmState state;
    VmView View() const { return VmView{spec, state, message, revision}; }
  };
  struct EntryHash {
    using is_transparent = void;
    size_t operator()(absl::string_view vm_id) const {
      return absl::Hash<absl::string_view>()(vm_id);
    }
    size_t operator()(const Entry& e) const { return (*this)(e.spec->vm_id); }
  };
  struct EntryEq {
    using is_transparent = void;
    static absl::string_view Of(absl::string_view vm_id) { return vm_id; }
    static absl::string_view Of(const Entry& e) { return e.spec->vm_id; }
    bool operator()(const auto& a, const auto& b) const { return Of(a) == Of(b); }
  };

  mutable vmnet::Mutex mu_;
  // A node per VM (see DesiredState::vms_): slots of a pointer, not of a
  // whole entry. Each entry holds the desired state's spec, shared.
  absl::node_hash_set<Entry, EntryHash, EntryEq> vms_ ABSL_GUARDED_BY(mu_);
  // Point into the entries' specs, as DesiredState's indexes do.
  SpecAddressIndex vm_of_address_ ABSL_GUARDED_BY(mu_);
  SpecInterfaceIndex vm_of_interface_ ABSL_GUARDED_BY(mu_);
};

}  // namespace vmnet
