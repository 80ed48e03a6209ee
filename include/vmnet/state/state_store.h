// The durable desired state in --state-dir: one file, replaced atomically
// (write a temporary file, fsync it, rename it over the old one, fsync the
// directory). A crash at any moment leaves either the old file or the new
// one, never a mix. The file carries a checksum, so a damaged file is
// reported, never mistaken for an empty state.
//
// The directory is opened once; the lock, the reads and the writes are all
// relative to that open directory, never to its path. Before and after each
// write the store checks that the directory at the configured path is still
// the one it locked: when it was removed (rm -rf) or replaced (by a mkdir or a
// rename), nothing more is made durable and every Save fails with
// FAILED_PRECONDITION naming the path, so that no acknowledgement is given
// that a restart could lose, and a second agent started on the new directory
// is the only one that acknowledges.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "vmnet/state/vm_spec.h"

namespace vmnet {

struct StoredVm {
  VmSpec spec;
  uint64_t revision = 0;  // of the VM's last change
  bool operator==(const StoredVm&) const = default;
};

// A VM to save, by reference to a spec held elsewhere (the desired
// state's): a save copies no spec. Every commit of an attach storm saves
// every VM, and copies of 10,000 specs made and freed at each one were
// holes left between the storm's live allocations (issue 16).
struct StoredVmRef {
  const VmSpec* spec;
  uint64_t revision = 0;
};

struct StoredState {
  std::vector<StoredVm> vms;
  uint64_t revision_lease = 0;
  bool operator==(const StoredState&) const = default;
};

class StateStore {
 public:
  // Opens the directory and takes an exclusive lock on a file in it (a second
  // agent on the same directory fails to start). Creates the directory if
  // missing.
  static absl::StatusOr<StateStore> Open(const std::string& dir);
  StateStore(StateStore&& other) noexcept;
  StateStore& operator=(StateStore&&) = delete;
  ~StateStore();

  // The stored state; an empty state when the directory holds none yet.
  // FAILED_PRECONDITION naming the file when it is unreadable or damaged.
  absl::StatusOr<StoredState> Load() const;
  // Writes `state` durably. FAILED_PRECONDITION, logged at error level as
  // event=state_dir_lost, when the directory this store locked is no longer
  // the one at its path (see above); nothing is then written to the path.
  absl::Status Save(const StoredState& state);
  // The same, for VMs held elsewhere; they are written in the order given.
  absl::Status Save(absl::Span<const StoredVmRef> vms, uint64_t revision_lease);

  // OK while the directory at the path is the one this store locked;
  // otherwise the FAILED_PRECONDITION that Save answers.
  absl::Status CheckDirectory() const;

  const std::string& path() const { return path_; }

  // The file format, exposed for tests and the fuzzer.
  static std::string Encode(const StoredState& state);
  static std::string Encode(absl::Span<const StoredVmRef> vms, uint64_t revision_lease);
  static absl::StatusOr<StoredState> Decode(absl::string_view bytes);

 private:
  StateStore(std::string dir, int dir_fd, int lock_fd);
  std::string dir_;
  std::string path_;
  int dir_fd_ = -1;   // the directory locked, opened once
  int lock_fd_ = -1;  // "lock" in it, flock()ed
};

}  // namespace vmnet
