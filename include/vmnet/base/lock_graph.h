// gRPC's own locks are absl::Mutex, and Debian's Abseil is built without
// NDEBUG, so its deadlock detection is on: every acquire of every absl::Mutex
// in the process takes one process-wide spinlock and records the locks the
// thread holds in a graph, and every destroyed mutex is removed from it
// under the same lock. With 100 Watch streams that is about 1% of the
// agent's CPU, and a lock shared by all of gRPC's threads.
#pragma once

#include "absl/synchronization/mutex.h"

namespace vmnet {

// Turns that detection off in release builds (NDEBUG); debug builds, the
// sanitizers' among them, keep it. Call before any thread starts.
inline void SkipAbslLockGraph() {
#ifdef NDEBUG
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
#endif
}

}  // namespace vmnet
