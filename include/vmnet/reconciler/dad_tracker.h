// --dad: which of a VM's addresses no other machine answered for, which wait
// for a probe, and the VMs that failed their check. Only VMs with something
// to track have an entry, so a host without --dad pays nothing per VM.
//
// A value type, owned by the reconciler thread.
#pragma once

#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "vmnet/net/address.h"
#include "vmnet/state/vm_spec.h"

namespace vmnet {

class DadTracker {
 public:
  // What of `spec` may be published now: the addresses already verified.
  // `unverified` receives the others; `start_probe` is true when a probe of
  // them must be started now (none is out for this VM yet).
  struct Publishable {
    VmSpec spec;
    std::vector<IpAddress> unverified;
    bool start_probe = false;
  };
  Publishable Split(const VmSpec& spec);
  // Marks the probe of the VM's unverified addresses as out.
  void ProbeStarted(const std::string& vm_id);

  // A probe of `probed` ended. Conflicts about addresses the VM still wants
  // fail the VM (Failure() then names them, and the result is the number of
  // such addresses); otherwise the probed addresses it still wants are
  // verified.
  struct Conflict {
    IpAddress address;
    std::string interface;
    MacAddress answered_by;
  };
  size_t ProbeDone(const VmSpec& spec, const std::vector<IpAddress>& probed,
                   const std::vector<Conflict>& conflicts);

  // Why the VM failed its check; empty when it did not.
  std::string Failure(const std::string& vm_id) const;
  // A new AttachVm checks again: the failure is forgotten (verified
  // addresses stay verified).
  bool ClearFailure(const std::string& vm_id);
  // Addresses this host published before a restart passed their check then.
  void MarkVerified(const std::string& vm_id, const IpAddress& address);
  void Forget(const std::string& vm_id) { vms_.erase(vm_id); }

 private:
  struct Entry {
    std::vector<IpAddress> verified;  // sorted
    bool probing = false;
    std::string failure;
  };
  absl::flat_hash_map<std::string, Entry> vms_;
};

}  // namespace vmnet
