#include "vmnet/state/state_store.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <cstring>
#include <set>

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

}  // namespace

StateStore::StateStore(std::string dir, int dir_fd, int lock_fd)
    : dir_(std::move(dir)),
      path_(absl::StrCat(dir_, "/", kStateFile)),
      dir_fd_(dir_fd),
      lock_fd_(lock_fd) {}

StateStore::StateStore(StateStore&& other) noexcept
    : dir_(std::move(other.dir_)),
      path_(std::move(other.path_)),
      dir_fd_(other.dir_fd_),
      lock_fd_(other.lock_fd_) {
  other.dir_fd_ = -1;
  other.lock_fd_ = -1;
}

StateStore::~StateStore() {
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
  return store;
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

std::string StateStore::Encode(absl::Span<const StoredVmRef> vms,
                               uint64_t revision_lease) {
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

absl::StatusOr<StoredState> StateStore::Decode(absl::string_view bytes) {
  if (bytes.size() < kHeader || std::memcmp(bytes.data(), kMagic, sizeof(kMagic)) != 0) {
    return absl::DataLossError("not a vmnetd state file (bad header)");
  }
  uint32_t length = GetU32(bytes.data() + 8);
  uint32_t checksum = GetU32(bytes.data() + 12);
  if (length > kMaxPayload || bytes.size() - kHeader != length) {
    return absl::DataLossError("truncated or oversized state file");
  }
  absl::string_view payload = bytes.substr(kHeader);
  if (crc32(0, reinterpret_cast<const Bytef*>(payload.data()),
            static_cast<uInt>(payload.size())) != checksum) {
    return absl::DataLossError("state file checksum mismatch");
  }
  state::StateFile file;
  if (!file.ParseFromArray(payload.data(), static_cast<int>(payload.size()))) {
    return absl::DataLossError("state file does not parse");
  }
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

absl::StatusOr<StoredState> StateStore::Load() const {
  if (absl::Status s = CheckDirectory(); !s.ok()) return s;
  int fd = openat(dir_fd_, kStateFile, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return StoredState{};
    return absl::FailedPreconditionError(
        absl::StrCat("cannot read state file ", path_, ": ", strerror(errno)));
  }
  std::string bytes;
  char buf[1 << 16];
  while (true) {
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      close(fd);
      return absl::FailedPreconditionError(
          absl::StrCat("cannot read state file ", path_, ": ", strerror(err)));
    }
    if (n == 0) break;
    bytes.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  auto state = Decode(bytes);
  if (!state.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "state file ", path_, " is damaged: ", state.status().message(),
        ". Move it aside to start with an empty state (the kernel objects of "
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
  auto lost = [this](const absl::Status& s) {
    VMNET_LOG(Error) << "event=state_dir_lost state_dir=" << dir_ << " error=\""
                     << s.message() << "\"";
    return s;
  };
  if (absl::Status s = CheckDirectory(); !s.ok()) return lost(s);
  std::string tmp = absl::StrCat(dir_, "/", kTempFile);
  int fd = openat(dir_fd_, kTempFile,
                  O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) {
    absl::Status s = ErrnoError("create", tmp);
    if (absl::Status check = CheckDirectory(); !check.ok()) return lost(check);
    return s;
  }
  absl::Status s = WriteAll(fd, Encode(vms, revision_lease), tmp);
  if (s.ok() && fsync(fd) != 0) s = ErrnoError("fsync", tmp);
  close(fd);
  if (s.ok() && renameat(dir_fd_, kTempFile, dir_fd_, kStateFile) != 0) {
    s = ErrnoError("rename to", path_);
  }
  if (s.ok() && fsync(dir_fd_) != 0) s = ErrnoError("fsync", dir_);
  if (absl::Status check = CheckDirectory(); !check.ok()) return lost(check);
  return s;
}

}  // namespace vmnet
