// The durable desired state in --state-dir: a state file and a journal.
//
// The state file holds every VM; it is replaced atomically (write a
// temporary file, fsync it, rename it over the old one, fsync the
// directory), so a crash at any moment leaves either the old file or the new
// one, never a mix. Rewriting it costs the whole state, about 1 MB and 3 ms
// at 10,000 VMs, which an attach storm paid at every reconcile pass
// (BENCHMARKS.md, "Bandwidth limits"). So a commit appends to the journal
// instead: one frame with the VMs it changed, whole, and the ones it
// removed, then fdatasync (0.3 ms). Load reads the state file and applies
// the journal's frames in order. When the journal outgrows the state file,
// the next commit is a Save: a new state file, then the journal emptied. A
// crash between the two leaves frames the new file already holds; applying
// them again changes nothing (each frame sets whole records), so that is
// safe. A crash in the middle of an append leaves a torn last frame that was
// never acknowledged: it is dropped (Open cuts it off). A bad frame with
// frames after it is damage, reported like a damaged state file. Every
// frame and the state file carry a checksum, so damage is reported, never
// mistaken for an empty state.
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
  // Empties the journal after (see above).
  absl::Status Save(absl::Span<const StoredVmRef> vms, uint64_t revision_lease);
  // Makes one commit durable through the journal: `vms` are set whole (a
  // new spec or revision), `removed` are gone, and the lease is
  // `revision_lease`. The same errors as Save.
  absl::Status Append(absl::Span<const StoredVmRef> vms,
                      absl::Span<const std::string> removed, uint64_t revision_lease);
  // Whether the next commit should be a Save rather than an Append: there
  // is no state file yet, the journal holds more than the state file (or an
  // append failed, so the journal's end is unknown).
  bool WantsSave() const;
  // The journal's size in bytes (for tests).
  size_t journal_bytes() const { return journal_bytes_; }

  // OK while the directory at the path is the one this store locked;
  // otherwise the FAILED_PRECONDITION that Save answers.
  absl::Status CheckDirectory() const;

  const std::string& path() const { return path_; }

  // The file format, exposed for tests and the fuzzer.
  static std::string Encode(const StoredState& state);
  static std::string Encode(absl::Span<const StoredVmRef> vms, uint64_t revision_lease,
                            absl::Span<const std::string> removed = {});
  static absl::StatusOr<StoredState> Decode(absl::string_view bytes);
  // The journal appended to the state file `state` (empty: none): what Load
  // returns for these two files.
  static absl::StatusOr<StoredState> Decode(absl::string_view state,
                                            absl::string_view journal);

  // A journal smaller than this is never a reason to rewrite the state file.
  static constexpr size_t kMinJournalBytes = 1 << 20;

 private:
  StateStore(std::string dir, int dir_fd, int lock_fd);
  std::string dir_;
  std::string path_;
  std::string journal_path_;
  absl::StatusOr<std::string> ReadFile(const char* name, const std::string& path) const;
  // Opens the journal for appending (creating it, durably) if not open.
  absl::Status OpenJournal();
  // `s` (the directory was removed or replaced), logged as event=state_dir_lost.
  absl::Status Lost(absl::Status s) const;

  int dir_fd_ = -1;   // the directory locked, opened once
  int lock_fd_ = -1;  // "lock" in it, flock()ed
  int journal_fd_ = -1;
  size_t journal_bytes_ = 0;     // its valid frames
  size_t state_bytes_ = 0;       // the state file's size, as last read or written
  bool journal_broken_ = false;  // an append failed: its end is unknown
};

}  // namespace vmnet
