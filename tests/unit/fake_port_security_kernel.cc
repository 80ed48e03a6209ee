#include "fake_port_security_kernel.h"

#include <errno.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "vmnet/kernel/netlink_kernel.h"

namespace vmnet::testing {

using kernel::NftElement;
using kernel::NftEvent;

FakePortSecurityKernel::FakePortSecurityKernel() {
  event_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
}

FakePortSecurityKernel::~FakePortSecurityKernel() { close(event_fd_); }

void FakePortSecurityKernel::Emit(NftEvent event) {
  events_.push_back(std::move(event));
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = write(event_fd_, &one, sizeof(one));
}

namespace {

// A link's packet-rate limits (there is at most one), any rate.
void ForgetLimits(std::set<NftElement>* elements, const std::string& ifname) {
  for (auto it = elements->begin(); it != elements->end();) {
    const auto* l = std::get_if<kernel::NftPacketRateLimit>(&*it);
    it = l != nullptr && l->ifname == ifname ? elements->erase(it) : std::next(it);
  }
}

bool HasLimit(const std::set<NftElement>& elements, const std::string& ifname) {
  for (const NftElement& e : elements) {
    const auto* l = std::get_if<kernel::NftPacketRateLimit>(&e);
    if (l != nullptr && l->ifname == ifname) return true;
  }
  return false;
}

bool Overlaps(const kernel::NftSourcePrefix& a, const kernel::NftSourcePrefix& b) {
  if (a.ifname != b.ifname || a.prefix.address.family() != b.prefix.address.family()) {
    return false;
  }
  // Host-length prefixes live in hash sets: no overlap is possible there.
  int bits = a.prefix.address.bit_length();
  if (a.prefix.length == bits || b.prefix.length == bits) return false;
  return a.prefix.Contains(b.prefix.address) || b.prefix.Contains(a.prefix.address);
}

}  // namespace

std::vector<absl::Status> FakePortSecurityKernel::Apply(
    absl::Span<const kernel::NftWrite> writes) {
  MutexLock lock(&mu_);
  std::vector<absl::Status> result(writes.size());
  if (writes.empty()) return result;
  // Work on copies; commit only when every write succeeds.
  bool has_base = base_.has_value();
  kernel::PortSecurityConfig config = base_.value_or(kernel::PortSecurityConfig{});
  bool intact = base_intact_;
  auto elements = elements_;
  std::vector<NftEvent> events;
  auto event = [&](NftEvent::Kind kind, std::optional<NftElement> e, std::string what) {
    NftEvent ev;
    ev.kind = kind;
    ev.element = std::move(e);
    ev.own = true;
    ev.what = std::move(what);
    events.push_back(std::move(ev));
  };
  int failed = -1;
  for (size_t i = 0; i < writes.size() && failed < 0; ++i) {
    const kernel::NftWrite& w = writes[i];
    std::string what = kernel::ToString(w);
    if (fail_errno_ != 0) {
      result[i] = kernel::ErrnoStatus(fail_errno_, what);
    } else if (const auto* ensure = std::get_if<kernel::EnsurePortSecurityBase>(&w)) {
      has_base = true;
      config = ensure->config;
      intact = true;
      elements.clear();
      event(NftEvent::Kind::kBaseChanged, std::nullopt, "add table inet vmnet");
    } else if (std::holds_alternative<kernel::DeletePortSecurityBase>(w)) {
      if (has_base)
        event(NftEvent::Kind::kBaseChanged, std::nullopt, "delete table inet vmnet");
      has_base = false;
      elements.clear();
    } else if (!has_base) {
      result[i] = kernel::ErrnoStatus(ENOENT, what);
    } else if (const auto* add = std::get_if<kernel::AddNftElement>(&w)) {
      const auto* src = std::get_if<kernel::NftSourcePrefix>(&add->element);
      bool overlap = false;
      for (const NftElement& e : elements) {
        const auto* other = std::get_if<kernel::NftSourcePrefix>(&e);
        if (src && other && *src != *other && Overlaps(*src, *other)) overlap = true;
      }
      const auto* limit = std::get_if<kernel::NftPacketRateLimit>(&add->element);
      if (limit != nullptr && !overlap) {
        // Like NftKernel: the link's limit is destroyed and re-created.
        ForgetLimits(&elements, limit->ifname);
      }
      if (overlap) {
        result[i] = kernel::ErrnoStatus(EEXIST, what);
      } else if (elements.insert(add->element).second) {
        event(NftEvent::Kind::kElementAdded, add->element, what);
      }
    } else {
      const auto& del = std::get<kernel::DeleteNftElement>(w);
      const auto* limit = std::get_if<kernel::NftPacketRateLimit>(&del.element);
      if (limit != nullptr && HasLimit(elements, limit->ifname)) {
        ForgetLimits(&elements, limit->ifname);
        event(NftEvent::Kind::kElementDeleted, del.element, what);
      } else if (elements.erase(del.element) > 0) {
        event(NftEvent::Kind::kElementDeleted, del.element, what);
      }
    }
    if (!result[i].ok()) failed = static_cast<int>(i);
  }
  if (failed >= 0) {
    for (size_t i = 0; i < writes.size(); ++i) {
      if (static_cast<int>(i) == failed) continue;
      result[i] = absl::AbortedError(
          absl::StrCat(kernel::ToString(writes[i]),
                       ": rolled back with its nftables transaction, because: ",
                       result[failed].ToString()));
    }
    return result;
  }
  ++transactions_;
  for (const kernel::NftWrite& w : writes) write_log_.push_back(kernel::ToString(w));
  if (has_base) {
    base_ = std::move(config);
  } else {
    base_.reset();
  }
  base_intact_ = intact;
  // A deleted VM link takes its counters with it.
  for (auto it = counters_.begin(); it != counters_.end();) {
    bool kept = it->first.second == kernel::DropReason::kEgressPacketRate
                    ? HasLimit(elements, it->first.first)
                    : elements.count(NftElement{kernel::NftVmLink{it->first.first}}) > 0;
    if (!kept) {
      it = counters_.erase(it);
    } else {
      ++it;
    }
  }
  elements_ = std::move(elements);
  for (auto& e : events) Emit(std::move(e));
  return result;
}

absl::StatusOr<kernel::NftSnapshot> FakePortSecurityKernel::Dump() {
  MutexLock lock(&mu_);
  kernel::NftSnapshot snap;
  if (base_) {
    snap.fingerprint = base_->Fingerprint();
    snap.base_intact = base_intact_;
    if (!base_intact_) snap.damage = "damaged by a test";
  } else {
    snap.damage = "table inet vmnet missing";
  }
  snap.elements.assign(elements_.begin(), elements_.end());
  return snap;
}

absl::Status FakePortSecurityKernel::ReadEvents(std::vector<NftEvent>* events) {
  MutexLock lock(&mu_);
  uint64_t ignored;
  [[maybe_unused]] ssize_t n = read(event_fd_, &ignored, sizeof(ignored));
  if (overflow_) {
    overflow_ = false;
    events_.clear();
    return absl::ResourceExhaustedError("fake: events were lost");
  }
  for (auto& e : events_) events->push_back(std::move(e));
  events_.clear();
  return absl::OkStatus();
}

absl::StatusOr<std::vector<kernel::DropCounter>>
FakePortSecurityKernel::ReadDropCounters() {
  MutexLock lock(&mu_);
  std::vector<kernel::DropCounter> out;
  for (const NftElement& e : elements_) {
    if (const auto* limit = std::get_if<kernel::NftPacketRateLimit>(&e)) {
      auto it = counters_.find({limit->ifname, kernel::DropReason::kEgressPacketRate});
      out.push_back(it != counters_.end()
                        ? it->second
                        : kernel::DropCounter{limit->ifname,
                                              kernel::DropReason::kEgressPacketRate, 0,
                                              0});
      continue;
    }
    const auto* link = std::get_if<kernel::NftVmLink>(&e);
    if (link == nullptr) continue;
    for (auto reason : {kernel::DropReason::kSpoofedSource,
                        kernel::DropReason::kSpoofedArpNd, kernel::DropReason::kToHost}) {
      auto it = counters_.find({link->ifname, reason});
      out.push_back(it != counters_.end()
                        ? it->second
                        : kernel::DropCounter{link->ifname, reason, 0, 0});
    }
  }
  return out;
}

std::vector<absl::StatusOr<kernel::ConntrackDeletion>>
FakePortSecurityKernel::DeleteConntrack(absl::Span<const IpAddress> addresses) {
  MutexLock lock(&mu_);
  std::vector<absl::StatusOr<kernel::ConntrackDeletion>> results;
  for (const IpAddress& address : addresses) {
    kernel::ConntrackDeletion result;
    if (conntrack_present_) {
      result.conntrack_present = true;
      conntrack_deletions_.push_back(address);
      auto it = conntrack_.find(address);
      if (it != conntrack_.end()) {
        result.deleted = it->second;
        conntrack_.erase(it);
      }
    }
    results.push_back(result);
  }
  return results;
}

void FakePortSecurityKernel::DeleteTable() {
  MutexLock lock(&mu_);
  if (!base_) return;
  base_.reset();
  elements_.clear();
  counters_.clear();
  Emit(NftEvent{NftEvent::Kind::kBaseChanged, std::nullopt, false,
                "delete table inet vmnet"});
}

void FakePortSecurityKernel::DamageBase() {
  MutexLock lock(&mu_);
  base_intact_ = false;
  Emit(NftEvent{NftEvent::Kind::kBaseChanged, std::nullopt, false,
                "delete rule in inet vmnet prerouting"});
}

void FakePortSecurityKernel::RemoveElement(const NftElement& element) {
  MutexLock lock(&mu_);
  if (elements_.erase(element) == 0) return;
  Emit(NftEvent{NftEvent::Kind::kElementDeleted, element, false,
                "delete element " + kernel::ToString(element)});
}

void FakePortSecurityKernel::Overflow() {
  MutexLock lock(&mu_);
  overflow_ = true;
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = write(event_fd_, &one, sizeof(one));
}

void FakePortSecurityKernel::FailWrites(int err) {
  MutexLock lock(&mu_);
  fail_errno_ = err;
}

void FakePortSecurityKernel::SetDropCounter(const std::string& ifname,
                                            kernel::DropReason reason, uint64_t packets,
                                            uint64_t bytes) {
  MutexLock lock(&mu_);
  counters_[{ifname, reason}] = {ifname, reason, packets, bytes};
}

void FakePortSecurityKernel::AddConntrackEntries(const IpAddress& address, int count) {
  MutexLock lock(&mu_);
  conntrack_[address] += count;
}

void FakePortSecurityKernel::SetConntrackPresent(bool present) {
  MutexLock lock(&mu_);
  conntrack_present_ = present;
}

std::optional<kernel::PortSecurityConfig> FakePortSecurityKernel::base() const {
  MutexLock lock(&mu_);
  return base_;
}

std::set<NftElement> FakePortSecurityKernel::elements() const {
  MutexLock lock(&mu_);
  return elements_;
}

std::vector<std::string> FakePortSecurityKernel::write_log() const {
  MutexLock lock(&mu_);
  return write_log_;
}

size_t FakePortSecurityKernel::transactions() const {
  MutexLock lock(&mu_);
  return transactions_;
}

std::vector<IpAddress> FakePortSecurityKernel::conntrack_deletions() const {
  MutexLock lock(&mu_);
  return conntrack_deletions_;
}

}  // namespace vmnet::testing
