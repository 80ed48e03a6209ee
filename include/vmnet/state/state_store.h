// The durable desired state in --state-dir: one file, replaced atomically
// (write a temporary file, fsync it, rename it over the old one, fsync the
// directory). A crash at any moment leaves either the old file or the new
// one, never a mix. The file carries a checksum, so a damaged file is
// reported, never mistaken for an empty state.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "vmnet/state/vm_spec.h"

namespace vmnet {

struct StoredVm {
  VmSpec spec;
  uint64_t revision = 0;  // of the VM's last change
  bool operator==(const StoredVm&) const = default;
};

struct StoredState {
  std::vector<StoredVm> vms;
  uint64_t revision_lease = 0;
  bool operator==(const StoredState&) const = default;
};

class StateStore {
 public:
  // Takes an exclusive lock on the directory (a second agent on the same
  // state fails to start). Creates the directory if missing.
  static absl::StatusOr<StateStore> Open(const std::string& dir);
  StateStore(StateStore&& other) noexcept;
  StateStore& operator=(StateStore&&) = delete;
  ~StateStore();

  // The stored state; an empty state when the directory holds none yet.
  // FAILED_PRECONDITION naming the file when it is unreadable or damaged.
  absl::StatusOr<StoredState> Load() const;
  absl::Status Save(const StoredState& state);

  const std::string& path() const { return path_; }

  // The file format, exposed for tests and the fuzzer.
  static std::string Encode(const StoredState& state);
  static absl::StatusOr<StoredState> Decode(absl::string_view bytes);

 private:
  StateStore(std::string dir, int lock_fd);
  std::string dir_;
  std::string path_;
  int lock_fd_ = -1;
};

}  // namespace vmnet
