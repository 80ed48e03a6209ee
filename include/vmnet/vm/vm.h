// The VM vocabulary every layer shares: a VM's state, the VM as the agent
// reports it, and the changes it publishes. The API, the event log, the
// metrics and the reconciler all speak these types; none of them needs the
// others' headers for them.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "vmnet/state/vm_spec.h"

namespace vmnet {

// kPending: the VM's link does not exist yet (or its addresses are being
// checked for duplicates). kProgrammed: the kernel holds its spec.
// kFailed: something stands in the way; the VM's message names it.
enum class VmState { kPending, kProgrammed, kFailed };
const char* VmStateName(VmState state);  // "pending", "programmed", "failed"

// A VM as the API reports it: its spec, state, why, and the revision of its
// last change.
struct VmView {
  // Never null. The desired state's own spec, shared: a view (one per
  // publish, per directory update, per reader's copy) does not copy it.
  std::shared_ptr<const VmSpec> spec;
  VmState state = VmState::kPending;
  std::string message;
  uint64_t revision = 0;
};

enum class VmEventType { kAdded, kChanged, kRemoved, kDriftRepaired };

// Receives every VM change, on the reconciler thread, in order, each with
// the revision the desired state issued for it (strictly increasing).
class VmObserver {
 public:
  virtual ~VmObserver() = default;
  // Called once before the first Publish: the first revision this run
  // issues (strictly above every revision issued before a restart).
  virtual void StartRevisionsAt(uint64_t first) = 0;
  // A VM as the first sync after a start found it, with the revision of its
  // last change: known to snapshots, not announced as a change.
  virtual void Seed(const VmView& vm) = 0;
  // `vm.revision` is the change's revision.
  virtual void Publish(VmEventType type, const VmView& vm, const std::string& detail) = 0;
  // The end of a reconcile pass: what was published since the last call may
  // be delivered together (the Watch log sends it to watchers then).
  virtual void EndPass() {}
};

}  // namespace vmnet
