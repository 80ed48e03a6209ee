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

#include "absl/container/flat_hash_map.h"
#include "absl/container/node_hash_map.h"
#include "absl/strings/string_view.h"
#include "vmnet/base/mutex.h"
#include "vmnet/reconciler/desired_state.h"
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
  mutable vmnet::Mutex mu_;
  // A node per VM (see DesiredState::vms_): slots of a pointer, not of a
  // whole entry. Each view holds the desired state's spec, shared.
  absl::node_hash_map<std::string, VmView> vms_ ABSL_GUARDED_BY(mu_);
  // Point into the entries' specs, as DesiredState's indexes do.
  absl::flat_hash_map<IpAddress, const VmSpec*> vm_of_address_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<absl::string_view, const VmSpec*> vm_of_interface_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace vmnet
