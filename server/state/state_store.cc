#include "vmnet/state/state_store.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <set>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "google/protobuf/wire_format_lite.h"
#include "server/state/state_file.pb.h"
#include "vmnet/log/log.h"

namespace vmnet {
namespace {

constexpr char kStateFile[] = "state.bin";
constexpr char kTempFile[] = "state.bin.tmp";
constexpr char kJournalFile[] = "journal.bin";
constexpr char kLockFile[] = "lock";

constexpr char kMagic[8] = {'V', 'M', 'N', 'E', 'T', 'S', 'T', '1'};
constexpr size_t kHeader = sizeof(kMagic) + 8;  // magic, length, crc32
// Far above 100,000 VMs with many addresses each; a larger file is damage.
constexpr uint32_t kMaxPayload = 1u << 30;

absl::Status ErrnoError(absl::string_view what, const std::string& path) {
  return absl::InternalError(absl::StrCat(what, " ", path, ": ", strerror(errno)));
}

void PutU32(std::string* out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

uint32_t GetU32(const char* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(p[i]);
  return v;
}

absl::Status WriteAll(int fd, absl::string_view data, const std::string& path) {
  while (!data.empty()) {
    ssize_t n = write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError("write", path);
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
  return absl::OkStatus();
}

// One frame at the start of `bytes` (magic, length, crc32, then a
// StateFile): its message, and in *size the bytes it takes. `*size` is set
// whenever the header can be read, even when the rest is bad.
absl::StatusOr<state::StateFile> ParseFrame(absl::string_view bytes, size_t* size) {
  *size = SIZE_MAX;
  if (bytes.size() < kHeader) return absl::DataLossError("truncated header");
  uint32_t length = GetU32(bytes.data() + 8);
  uint32_t checksum = GetU32(bytes.data() + 12);
  if (length <= kMaxPayload) *size = kHeader + length;
  if (std::memcmp(bytes.data(), kMagic, sizeof(kMagic)) != 0) {
    return absl::DataLossError("not a vmnetd state file (bad header)");
  }
  if (length > kMaxPayload || bytes.size() < kHeader + length) {
    return absl::DataLossError("truncated or oversized state file");
  }
  absl::string_view payload = bytes.substr(kHeader, length);
  if (crc32(0, reinterpret_cast<const Bytef*>(payload.data()),
            static_cast<uInt>(payload.size())) != checksum) {
    return absl::DataLossError("state file checksum mismatch");
  }
  state::StateFile file;
  if (!file.ParseFromArray(payload.data(), static_cast<int>(payload.size()))) {
    return absl::DataLossError("state file does not parse");
  }
  return file;
}

// The journal's frames, up to the first bad one. A bad frame that is the
// file's last (it reaches or passes its end) is a torn append: `torn`, and
// `valid` is where it starts. A bad frame with bytes after it is damage.
struct JournalScan {
  std::vector<state::StateFile> frames;
  size_t valid = 0;
  bool torn = false;
  absl::Status damage;
};

JournalScan ScanJournal(absl::string_view journal) {
  JournalScan scan;
  while (scan.valid < journal.size()) {
    absl::string_view rest = journal.substr(scan.valid);
    size_t size = 0;
    auto frame = ParseFrame(rest, &size);
    if (frame.ok()) {
      scan.frames.push_back(std::move(*frame));
      scan.valid += size;
      continue;
    }
    scan.torn = true;
    if (size < rest.size()) {
      scan.damage = absl::DataLossError(absl::StrCat(
          "the frame at byte ", scan.valid, " is damaged (", frame.status().message(),
          ") and ", rest.size() - size, " bytes follow it"));
    }
    break;
  }
  return scan;
}

}  // namespace

StateStore::StateStore(std::string dir, int dir_fd, int lock_fd)
    : dir_(std::move(dir)),
      path_(absl::StrCat(dir_, "/", kStateFile)),
      journal_path_(absl::StrCat(dir_, "/", kJournalFile)),
      dir_fd_(dir_fd),
      lock_fd_(lock_fd) {}

StateStore::StateStore(StateStore&& other) noexcept
    : dir_(std::move(other.dir_)),
      path_(std::move(other.path_)),
      journal_path_(std::move(other.journal_path_)),
      dir_fd_(std::exchange(other.dir_fd_, -1)),
      lock_fd_(std::exchange(other.lock_fd_, -1)),
      journal_fd_(std::exchange(other.journal_fd_, -1)),
      journal_bytes_(other.journal_bytes_),
      state_bytes_(other.state_bytes_),
      journal_broken_(other.journal_broken_) {}

StateStore::~StateStore() {
  if (journal_fd_ >= 0) close(journal_fd_);
  if (lock_fd_ >= 0) close(lock_fd_);
  if (dir_fd_ >= 0) close(dir_fd_);
}

absl::StatusOr<StateStore> StateStore::Open(const std::string& dir) {
  if (mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return ErrnoError("create state directory", dir);
  }
  // Everything from here on is relative to this open directory, never to
  // its path: the lock is then on the directory the state is written to.
  int dir_fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0) return ErrnoError("open state directory", dir);
  std::string lock_path = absl::StrCat(dir, "/", kLockFile);
  int fd = openat(dir_fd, kLockFile, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) {
    absl::Status s = ErrnoError("open", lock_path);
    close(dir_fd);
    return s;
  }
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    close(fd);
    close(dir_fd);
    return absl::FailedPreconditionError(absl::StrCat(
        "state directory ", dir, " is locked by another vmnetd (", lock_path, ")"));
  }
  StateStore store(dir, dir_fd, fd);
  // Removed or replaced between the open and the lock: start on nothing.
  if (absl::Status s = store.CheckDirectory(); !s.ok()) return s;
  struct stat st;
  if (fstatat(dir_fd, kStateFile, &st, AT_SYMLINK_NOFOLLOW) == 0) {
    store.state_bytes_ = static_cast<size_t>(st.st_size);
  }
  const std::string& journal_path = store.journal_path_;
  auto journal = store.ReadFile(kJournalFile, journal_path);
  if (!journal.ok()) return journal.status();
  JournalScan scan = ScanJournal(*journal);
  store.journal_bytes_ = scan.valid;
  if (scan.torn && scan.damage.ok()) {
    // A frame whose append never finished (and so was never acknowledged):
    // cut off, so that the next append does not follow it.
    VMNET_LOG(Warning) << "event=state_journal_torn journal=" << journal_path
                       << " valid_bytes=" << scan.valid
                       << " dropped_bytes=" << journal->size() - scan.valid;
    if (absl::Status s = store.OpenJournal(); !s.ok()) return s;
    if (ftruncate(store.journal_fd_, static_cast<off_t>(scan.valid)) != 0 ||
        fdatasync(store.journal_fd_) != 0) {
      return ErrnoError("cut the torn end of", journal_path);
    }
  }
  return store;
}

absl::StatusOr<std::string> StateStore::ReadFile(const char* name,
                                                 const std::string& path) const {
  std::string bytes;
  int fd = openat(dir_fd_, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return bytes;
    return absl::FailedPreconditionError(
        absl::StrCat("cannot read ", path, ": ", strerror(errno)));
  }
  char buf[1 << 16];
  while (true) {
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      close(fd);
      return absl::FailedPreconditionError(
          absl::StrCat("cannot read ", path, ": ", strerror(err)));
    }
    if (n == 0) break;
    bytes.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return bytes;
}

absl::Status StateStore::OpenJournal() {
  if (journal_fd_ >= 0) return absl::OkStatus();
  int flags = O_WRONLY | O_APPEND | O_NOFOLLOW | O_CLOEXEC;
  journal_fd_ = openat(dir_fd_, kJournalFile, flags | O_CREAT | O_EXCL, 0600);
  if (journal_fd_ >= 0) {
    // A new file: its name must be durable before anything in it counts.
    if (fsync(dir_fd_) != 0) return ErrnoError("fsync", dir_);
    return absl::OkStatus();
  }
  if (errno != EEXIST) return ErrnoError("create", journal_path_);
  journal_fd_ = openat(dir_fd_, kJournalFile, flags);
  if (journal_fd_ < 0) return ErrnoError("open", journal_path_);
  return absl::OkStatus();
}

absl::Status StateStore::Lost(absl::Status s) const {
  VMNET_LOG(Error) << "event=state_dir_lost state_dir=" << dir_ << " error=\""
                   << s.message() << "\"";
  return s;
}

absl::Status StateStore::CheckDirectory() const {
  struct stat held;
  if (fstat(dir_fd_, &held) != 0) return ErrnoError("fstat state directory", dir_);
  struct stat now;
  int stat_errno = stat(dir_.c_str(), &now) == 0 ? 0 : errno;
  bool same = stat_errno == 0 && now.st_dev == held.st_dev && now.st_ino == held.st_ino;
  if (same && held.st_nlink > 0) return absl::OkStatus();
  std::string what;
  // What the operator can do: the locked directory, moved elsewhere, can be
  // moved back; a removed one is gone with the state file in it.
  std::string remedy =
      "restart vmnetd (it then starts on the directory at that path) and attach its VMs "
      "again";
  if (held.st_nlink == 0) {
    what =
        stat_errno == ENOENT
            ? "was removed"
            : "was removed (the directory now at that path is a new one, not the one it "
              "locked)";
  } else {
    what = stat_errno == 0
               ? "was replaced (the directory now at that path is not the one it locked, "
                 "which was moved away)"
               : absl::StrCat("is no longer at its path (", strerror(stat_errno),
                              "; the directory it locked was moved away)");
    remedy = absl::StrCat("move the directory it locked back to ", dir_, ", or ", remedy);
  }
  return absl::FailedPreconditionError(
      absl::StrCat("state directory ", dir_, " ", what,
                   " while this vmnetd was running: no change can be made durable there, "
                   "so AttachVm and "
                   "DetachVm are refused; the VMs it acknowledged are in no state file "
                   "at that path. To "
                   "recover, ",
                   remedy));
}

namespace {

std::vector<StoredVmRef> RefsTo(const StoredState& state) {
  std::vector<StoredVmRef> refs;
  refs.reserve(state.vms.size());
  for (const StoredVm& vm : state.vms) refs.push_back({&vm.spec, vm.revision});
  return refs;
}

}  // namespace

std::string StateStore::Encode(const StoredState& state) {
  return Encode(RefsTo(state), state.revision_lease);
}

std::string StateStore::Encode(absl::Span<const StoredVmRef> vms, uint64_t revision_lease,
                               absl::Span<const std::string> removed) {
  using google::protobuf::internal::WireFormatLite;
  // The bytes StateFile::SerializeAsString would make (fields in number
  // order), written one record at a time into the file's own string: no
  // tree of 10,000 messages, no second copy of the payload. The header is
  // filled in at the end.
  std::string out(kMagic, sizeof(kMagic));
  out.resize(kHeader);
  {
    google::protobuf::io::StringOutputStream stream(&out);
    google::protobuf::io::CodedOutputStream coded(&stream);
    state::VmRecord r;  // reused: its strings keep their capacity
    for (const StoredVmRef& vm : vms) {
      const VmSpec& spec = *vm.spec;
      r.Clear();
      r.set_vm_id(spec.vm_id);
      r.set_interface(spec.interface);
      for (const IpAddress& a : spec.addresses) r.add_ip_addresses(a.ToString());
      if (spec.mac) r.set_mac_address(spec.mac->ToString());
      for (const IpPrefix& p : spec.allowed_source_prefixes) {
        r.add_allowed_source_prefixes(p.ToString());
      }
      r.set_ingress_bits_per_second(spec.bandwidth.ingress_bits_per_second);
      r.set_egress_bits_per_second(spec.bandwidth.egress_bits_per_second);
      r.set_burst_bytes(spec.bandwidth.burst_bytes);
      r.set_egress_packets_per_second(spec.bandwidth.egress_packets_per_second);
      r.set_revision(vm.revision);
      coded.WriteTag(WireFormatLite::MakeTag(state::StateFile::kVmsFieldNumber,
                                             WireFormatLite::WIRETYPE_LENGTH_DELIMITED));
      coded.WriteVarint32(static_cast<uint32_t>(r.ByteSizeLong()));  // caches the sizes
      r.SerializeWithCachedSizes(&coded);
    }
    if (revision_lease != 0) {
      WireFormatLite::WriteUInt64(state::StateFile::kRevisionLeaseFieldNumber,
                                  revision_lease, &coded);
    }
    for (const std::string& vm_id : removed) {
      WireFormatLite::WriteString(state::StateFile::kRemovedVmIdsFieldNumber, vm_id,
                                  &coded);
    }
  }  // flushed: `out` ends with the payload
  absl::string_view payload = absl::string_view(out).substr(kHeader);
  uint32_t crc =
      static_cast<uint32_t>(crc32(0, reinterpret_cast<const Bytef*>(payload.data()),
                                  static_cast<uInt>(payload.size())));
  std::string header;
  PutU32(&header, static_cast<uint32_t>(payload.size()));
  PutU32(&header, crc);
  out.replace(sizeof(kMagic), 8, header);
  return out;
}

namespace {

absl::StatusOr<StoredState> Validate(const state::StateFile& file);

}  // namespace

absl::StatusOr<StoredState> StateStore::Decode(absl::string_view bytes) {
  size_t size = 0;
  auto file = ParseFrame(bytes, &size);
  if (!file.ok()) return file.status();
  if (size != bytes.size())
    return absl::DataLossError("truncated or oversized state file");
  return Validate(*file);
}

absl::StatusOr<StoredState> StateStore::Decode(absl::string_view state,
                                               absl::string_view journal) {
  state::StateFile file;
  if (!state.empty()) {
    size_t size = 0;
    auto parsed = ParseFrame(state, &size);
    if (!parsed.ok()) return parsed.status();
    if (size != state.size()) {
      return absl::DataLossError("truncated or oversized state file");
    }
    file = std::move(*parsed);
  }
  JournalScan scan = ScanJournal(journal);
  if (!scan.damage.ok()) {
    return absl::DataLossError(absl::StrCat("journal: ", scan.damage.message()));
  }
  if (scan.frames.empty()) return Validate(file);
  // Each frame sets whole records: the last frame that names a VM wins.
  std::map<std::string, state::VmRecord> vms;
  for (state::VmRecord& r : *file.mutable_vms()) {
    std::string id = r.vm_id();
    vms[id] = std::move(r);
  }
  uint64_t lease = file.revision_lease();
  for (state::StateFile& frame : scan.frames) {
    for (const std::string& id : frame.removed_vm_ids()) vms.erase(id);
    for (state::VmRecord& r : *frame.mutable_vms()) {
      std::string id = r.vm_id();
      vms[id] = std::move(r);
    }
    lease = std::max(lease, frame.revision_lease());
  }
  state::StateFile merged;
  merged.set_revision_lease(lease);
  for (auto& [id, r] : vms) *merged.add_vms() = std::move(r);
  return Validate(merged);
}

namespace {

absl::StatusOr<StoredState> Validate(const state::StateFile& file) {
  StoredState state;
  state.revision_lease = file.revision_lease();
  // Records were validated when accepted; validate again, so that a file
  // edited by hand cannot smuggle in what the API would refuse.
  SpecRules permissive;
  permissive.interface_pattern = std::regex(".*");
  permissive.max_addresses = 1u << 20;
  // A stored packet-rate limit loads whatever --port-security is now
  // (without it, the limit is kept but not enforced).
  permissive.port_security = true;
  std::set<std::string> vm_ids, interfaces;
  std::set<IpAddress> addresses_seen;
  for (const state::VmRecord& r : file.vms()) {
    if (!vm_ids.insert(r.vm_id()).second || !interfaces.insert(r.interface()).second) {
      return absl::DataLossError(
          absl::StrCat("VM \"", r.vm_id(), "\" or its interface appears twice"));
    }
    std::vector<std::string> addresses(r.ip_addresses().begin(), r.ip_addresses().end());
    auto spec =
        ParseVmSpec(r.vm_id(), r.interface(), addresses, r.mac_address(), permissive);
    if (!spec.ok()) {
      return absl::DataLossError(
          absl::StrCat("invalid VM record: ", spec.status().message()));
    }
    std::vector<std::string> prefixes(r.allowed_source_prefixes().begin(),
                                      r.allowed_source_prefixes().end());
    auto allowed = ParseSourcePrefixes(prefixes, permissive);
    if (!allowed.ok()) {
      return absl::DataLossError(
          absl::StrCat("invalid VM record: ", allowed.status().message()));
    }
    spec->allowed_source_prefixes = std::move(*allowed);
    auto bandwidth =
        ParseBandwidth(r.ingress_bits_per_second(), r.egress_bits_per_second(),
                       r.burst_bytes(), r.egress_packets_per_second(), permissive);
    if (!bandwidth.ok()) {
      return absl::DataLossError(
          absl::StrCat("invalid VM record: ", bandwidth.status().message()));
    }
    spec->bandwidth = *bandwidth;
    for (const IpAddress& a : spec->addresses) {
      if (!addresses_seen.insert(a).second) {
        return absl::DataLossError(
            absl::StrCat("address ", a.ToString(), " belongs to two VMs"));
      }
    }
    state.vms.push_back({std::move(*spec), r.revision()});
  }
  return state;
}

}  // namespace

absl::StatusOr<StoredState> StateStore::Load() const {
  if (absl::Status s = CheckDirectory(); !s.ok()) return s;
  auto bytes = ReadFile(kStateFile, path_);
  if (!bytes.ok()) return bytes.status();
  auto journal = ReadFile(kJournalFile, journal_path_);
  if (!journal.ok()) return journal.status();
  struct stat st;
  bool state_exists = fstatat(dir_fd_, kStateFile, &st, AT_SYMLINK_NOFOLLOW) == 0;
  if (bytes->empty() && state_exists) {
    return absl::FailedPreconditionError(absl::StrCat(
        "state file ", path_, " is damaged: it is empty. Move it and ", journal_path_,
        " aside to start with an empty state (the kernel objects of VMs not in the state "
        "are then removed)"));
  }
  auto state = Decode(*bytes, *journal);
  if (!state.ok()) {
    bool in_journal = absl::StartsWith(state.status().message(), "journal: ");
    return absl::FailedPreconditionError(absl::StrCat(
        in_journal ? "state journal " : "state file ", in_journal ? journal_path_ : path_,
        " is damaged: ", state.status().message(), ". Move ", path_, " and ",
        journal_path_,
        " aside to start with an empty state (the kernel objects of "
        "VMs not in the state are then removed)"));
  }
  return state;
}

absl::Status StateStore::Save(const StoredState& state) {
  return Save(RefsTo(state), state.revision_lease);
}

absl::Status StateStore::Save(absl::Span<const StoredVmRef> vms,
                              uint64_t revision_lease) {
  // Checked before the write (nothing is written into a new directory at the
  // path, nor into the removed one) and after it (the directory may have
  // been moved away while it was written): either way the caller changes
  // nothing and acknowledges nothing.
  if (absl::Status s = CheckDirectory(); !s.ok()) return Lost(s);
  std::string tmp = absl::StrCat(dir_, "/", kTempFile);
  int fd = openat(dir_fd_, kTempFile,
                  O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) {
    absl::Status s = ErrnoError("create", tmp);
    if (absl::Status check = CheckDirectory(); !check.ok()) return Lost(check);
    return s;
  }
  std::string encoded = Encode(vms, revision_lease);
  size_t encoded_size = encoded.size();
  absl::Status s = WriteAll(fd, encoded, tmp);
  if (s.ok() && fsync(fd) != 0) s = ErrnoError("fsync", tmp);
  close(fd);
  if (s.ok() && renameat(dir_fd_, kTempFile, dir_fd_, kStateFile) != 0) {
    s = ErrnoError("rename to", path_);
  }
  if (s.ok() && fsync(dir_fd_) != 0) s = ErrnoError("fsync", dir_);
  if (absl::Status check = CheckDirectory(); !check.ok()) return Lost(check);
  if (!s.ok()) return s;
  state_bytes_ = encoded_size;
  // The new file holds what the journal held: empty it. Were this lost in a
  // crash, its frames would be applied again to the new file, which holds
  // them already: no change. A journal that cannot be emptied is left to the
  // next Save (appending after a torn frame would make it damage).
  if (journal_bytes_ == 0 && !journal_broken_) return s;
  journal_broken_ = true;
  if (absl::Status open = OpenJournal(); !open.ok()) {
    VMNET_LOG(Warning) << "event=state_journal_not_emptied error=\"" << open.message()
                       << "\"";
  } else if (ftruncate(journal_fd_, 0) != 0 || fdatasync(journal_fd_) != 0) {
    VMNET_LOG(Warning) << "event=state_journal_not_emptied journal=" << journal_path_
                       << " error=\"" << strerror(errno) << "\"";
  } else {
    journal_bytes_ = 0;
    journal_broken_ = false;
  }
  return s;
}

bool StateStore::WantsSave() const {
  return state_bytes_ == 0 || journal_broken_ ||
         journal_bytes_ > std::max(kMinJournalBytes, state_bytes_);
}

absl::Status StateStore::Append(absl::Span<const StoredVmRef> vms,
                                absl::Span<const std::string> removed,
                                uint64_t revision_lease) {
  if (journal_broken_) {
    return absl::InternalError(
        "the journal's end is unknown after a failed append: Save");
  }
  if (absl::Status s = CheckDirectory(); !s.ok()) return Lost(s);
  if (absl::Status s = OpenJournal(); !s.ok()) return s;
  std::string frame = Encode(vms, revision_lease, removed);
  absl::Status s = WriteAll(journal_fd_, frame, journal_path_);
  if (s.ok() && fdatasync(journal_fd_) != 0) s = ErrnoError("fdatasync", journal_path_);
  if (!s.ok()) {
    // Part of the frame may be in the file: cut it off, or have the next
    // commit rewrite the state file and empty the journal.
    if (ftruncate(journal_fd_, static_cast<off_t>(journal_bytes_)) != 0 ||
        fdatasync(journal_fd_) != 0) {
      journal_broken_ = true;
    }
    return s;
  }
  journal_bytes_ += frame.size();
  if (absl::Status check = CheckDirectory(); !check.ok()) return Lost(check);
  return absl::OkStatus();
}

}  // namespace vmnet
