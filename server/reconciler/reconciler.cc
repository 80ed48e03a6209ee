#include "vmnet/reconciler/reconciler.h"

#include <poll.h>
#include <unistd.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "vmnet/log/log.h"

namespace vmnet {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

constexpr milliseconds kFirstBackoff{100};
constexpr milliseconds kMaxBackoff{30000};
// A resync asked for by an unexpected kernel answer is rate limited.
constexpr milliseconds kMinResyncGap{1000};
// Revisions are leased ahead in blocks, so that the lease is persisted
// rarely and a restart still starts above every revision ever issued.
constexpr uint64_t kRevisionLease = 1 << 20;

absl::Status ShuttingDown() {
  return absl::UnavailableError("vmnetd is shutting down; retry");
}

std::string WritesText(const std::vector<kernel::Write>& writes) {
  return absl::StrJoin(writes, "; ", [](std::string* out, const kernel::Write& w) {
    out->append(kernel::ToString(w));
  });
}

// Host-wide IPv6 settings change how the host itself behaves: each is
// logged once when made.
void LogHostSetting(const kernel::SetIpv6Conf& conf) {
  using Key = kernel::SetIpv6Conf::Key;
  if (conf.key == Key::kAcceptRa && conf.value == 2) {
    VMNET_LOG(Warning)
        << "event=host_setting setting=net.ipv6.conf." << conf.name
        << ".accept_ra old=1 new=2 reason=\"IPv6 forwarding is turned on; "
           "with accept_ra 1 the kernel would stop accepting this uplink's "
           "router advertisements\"";
  } else if (conf.ifindex == 0 || conf.key == Key::kProxyNdp) {
    VMNET_LOG(Info) << "event=host_setting setting=net.ipv6.conf." << conf.name << "."
                    << kernel::Ipv6ConfKeyName(conf.key) << " new=" << conf.value;
  }
}

}  // namespace

Reconciler::Reconciler(kernel::Kernel* kernel, StateStore* store, VmObserver* observer,
                       ReconcilerOptions options)
    : kernel_(kernel), store_(store), observer_(observer), options_(std::move(options)) {
  wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
}

Reconciler::~Reconciler() {
  Stop();
  if (wake_fd_ >= 0) close(wake_fd_);
}

absl::Status Reconciler::Start() {
  auto stored = store_->Load();
  if (!stored.ok()) return stored.status();
  {
    vmnet::MutexLock lock(&mu_);
    for (StoredVm& vm : stored->vms) {
      VmRecord record;
      record.revision = vm.revision;
      record.spec = std::move(vm.spec);
      std::string vm_id = record.spec.vm_id;
      SetRecord(vm_id, std::move(record));
    }
    revision_lease_ = stored->revision_lease;
  }
  observer_->StartRevisionsAt(std::max<uint64_t>(stored->revision_lease, 1));
  if (auto s = FullResync(/*initial=*/true); !s.ok()) return s;
  {
    vmnet::ReaderMutexLock lock(&mu_);
    for (const auto& [id, r] : vms_) observer_->Seed(ViewOf(r));
  }
  ready_ = true;
  thread_ = std::thread([this] { Run(); });
  return absl::OkStatus();
}

void Reconciler::Stop() {
  if (stopping_.exchange(true)) return;
  Wake();
  if (thread_.joinable()) thread_.join();
  // Answer what never reached the thread.
  std::deque<Command> left;
  {
    vmnet::MutexLock lock(&queue_mu_);
    left.swap(queue_);
  }
  for (Command& c : left) Refuse(c, ShuttingDown());
}

void Reconciler::Refuse(Command& command, const absl::Status& status) {
  if (command.attach_done) command.attach_done(status);
  if (command.detach_done) command.detach_done(status);
}

void Reconciler::Wake() {
  uint64_t one = 1;
  // A full eventfd counter still wakes the thread; nothing to handle.
  [[maybe_unused]] ssize_t n = write(wake_fd_, &one, sizeof(one));
}

void Reconciler::Post(Command command) {
  if (stopping_.load()) {
    Refuse(command, ShuttingDown());
    return;
  }
  {
    vmnet::MutexLock lock(&queue_mu_);
    // A probe's result is never refused: it is the agent's own, and the VM
    // waits for it.
    if (queue_.size() < options_.max_pending_requests ||
        command.kind == Command::Kind::kProbeDone) {
      queue_.push_back(std::move(command));
      command.attach_done = nullptr;
      command.detach_done = nullptr;
    }
  }
  // Refused outside the lock: the callback may take its time. (A queued
  // command's callbacks were moved out, so this answers nothing then.)
  Refuse(command, absl::ResourceExhaustedError(absl::StrCat(
                      "vmnetd has ", options_.max_pending_requests,
                      " requests queued, the limit (--max-pending-requests); retry with "
                      "backoff")));
  Wake();
}

void Reconciler::Attach(VmSpec spec, std::vector<size_t> request_index,
                        bool validate_only, std::string request_id, AttachDone done) {
  Command c;
  c.kind = Command::Kind::kAttach;
  c.spec = std::move(spec);
  c.request_index = std::move(request_index);
  c.validate_only = validate_only;
  c.request_id = std::move(request_id);
  c.attach_done = std::move(done);
  Post(std::move(c));
}

void Reconciler::Detach(std::string vm_id, bool allow_missing, std::string request_id,
                        DetachDone done) {
  Command c;
  c.kind = Command::Kind::kDetach;
  c.spec.vm_id = std::move(vm_id);
  c.allow_missing = allow_missing;
  c.request_id = std::move(request_id);
  c.detach_done = std::move(done);
  Post(std::move(c));
}

VmView Reconciler::ViewOf(const VmRecord& r) const {
  return VmView{r.spec, r.state, r.message, r.revision};
}

std::vector<VmView> Reconciler::Vms() const {
  vmnet::ReaderMutexLock lock(&mu_);
  std::vector<VmView> out;
  out.reserve(vms_.size());
  for (const auto& [id, r] : vms_) out.push_back(ViewOf(r));
  return out;
}

std::optional<VmView> Reconciler::FindVm(const std::string& vm_id) const {
  vmnet::ReaderMutexLock lock(&mu_);
  auto it = vms_.find(vm_id);
  if (it == vms_.end()) return std::nullopt;
  return ViewOf(it->second);
}

std::string Reconciler::VmOfAddress(const IpAddress& address) const {
  vmnet::ReaderMutexLock lock(&mu_);
  auto it = vm_of_address_.find(address);
  return it == vm_of_address_.end() ? "" : it->second;
}

std::string Reconciler::VmOfInterface(const std::string& interface) const {
  vmnet::ReaderMutexLock lock(&mu_);
  auto it = vm_of_interface_.find(interface);
  return it == vm_of_interface_.end() ? "" : it->second;
}

ReconcilerCounters Reconciler::counters() const {
  vmnet::ReaderMutexLock lock(&mu_);
  return counters_;
}

void Reconciler::SetRecord(const std::string& vm_id, std::optional<VmRecord> record) {
  if (auto old = vms_.find(vm_id); old != vms_.end()) {
    if (old->second.spec.has_ipv6()) --ipv6_vms_;
    for (const IpAddress& a : old->second.spec.addresses) vm_of_address_.erase(a);
    vm_of_interface_.erase(old->second.spec.interface);
    vms_.erase(old);
  }
  if (!record) return;
  if (record->spec.has_ipv6()) ++ipv6_vms_;
  for (const IpAddress& a : record->spec.addresses) vm_of_address_[a] = vm_id;
  vm_of_interface_[record->spec.interface] = vm_id;
  vms_.emplace(vm_id, std::move(*record));
}

void Reconciler::Run() {
  while (!stopping_.load()) Iterate();
}

milliseconds Reconciler::NextWakeup() const {
  auto now = Clock::now();
  auto next = std::min(next_proxy_check_, next_full_resync_);
  if (!retries_.empty()) next = std::min(next, retries_.begin()->first);
  if (resync_wanted_) next = std::min(next, last_resync_ + kMinResyncGap);
  if (next <= now) return milliseconds(0);
  return std::chrono::duration_cast<milliseconds>(next - now) + milliseconds(1);
}

void Reconciler::Iterate() {
  pollfd fds[2] = {{wake_fd_, POLLIN, 0}, {kernel_->event_fd(), POLLIN, 0}};
  int timeout = static_cast<int>(std::min<int64_t>(NextWakeup().count(), 60000));
  if (poll(fds, 2, timeout) < 0 && errno != EINTR) {
    VMNET_LOG(Error) << "event=poll_failed errno=" << errno;
  }
  if (stopping_.load()) return;
  uint64_t ignored;
  [[maybe_unused]] ssize_t n = read(wake_fd_, &ignored, sizeof(ignored));

  DrainKernelEvents();
  auto now = Clock::now();
  if (now >= next_proxy_check_) CheckProxies();
  if (now >= next_full_resync_ ||
      (resync_wanted_ && now >= last_resync_ + kMinResyncGap)) {
    if (auto s = FullResync(false); !s.ok()) {
      VMNET_LOG(Warning) << "event=resync_failed error=\"" << s.message() << "\"";
    }
  }

  std::deque<Command> commands;
  {
    vmnet::MutexLock lock(&queue_mu_);
    commands.swap(queue_);
  }
  std::vector<Reply> replies;
  ProcessCommands(std::move(commands), &replies);
  // Failed VMs whose backoff is over. An entry may be stale (the VM
  // recovered, changed or went); planning it again is harmless.
  while (!retries_.empty() && retries_.begin()->first <= now) {
    dirty_.insert(retries_.begin()->second);
    retries_.erase(retries_.begin());
  }
  ReconcileDirty();

  // Answer after the kernel writes: an attach returns when the kernel holds
  // the state.
  for (Reply& reply : replies) {
    if (reply.detach_done) {
      reply.detach_done(reply.status);
    } else if (!reply.status.ok()) {
      reply.attach_done(reply.status);
    } else {
      auto vm = FindVm(reply.vm_id);
      if (vm) {
        reply.attach_done(*vm);
      } else {
        reply.attach_done(absl::AbortedError(
            absl::StrCat("VM ", reply.vm_id, " was detached concurrently")));
      }
    }
  }
}

void Reconciler::DrainKernelEvents() {
  std::vector<kernel::Event> events;
  absl::Status s = kernel_->ReadEvents(&events);
  vmnet::MutexLock lock(&mu_);
  for (const kernel::Event& e : events) {
    model_.Apply(e);
    MarkDirtyByEvent(e);
  }
  if (absl::IsResourceExhausted(s)) {
    ++counters_.event_overflows;
    VMNET_LOG(Warning) << "event=netlink_overflow action=full_resync";
    resync_wanted_ = true;
    last_resync_ = {};  // an overflow is not rate limited
  } else if (!s.ok()) {
    VMNET_LOG(Error) << "event=netlink_read_failed error=\"" << s.message() << "\"";
    resync_wanted_ = true;
  }
}

void Reconciler::MarkDirtyByAddress(const IpAddress& address) {
  if (auto it = vm_of_address_.find(address); it != vm_of_address_.end()) {
    dirty_.insert(it->second);
  }
}

void Reconciler::MarkAllDirty() {
  for (const auto& [id, r] : vms_) dirty_.insert(id);
}

void Reconciler::MarkDirtyByEvent(const kernel::Event& event) {
  auto by_ifindex = [&](int ifindex) {
    if (const kernel::Link* l = model_.LinkByIndex(ifindex)) {
      if (auto it = vm_of_interface_.find(l->name); it != vm_of_interface_.end()) {
        dirty_.insert(it->second);
      }
    }
  };
  if (auto* e = std::get_if<kernel::LinkEvent>(&event)) {
    if (auto it = vm_of_interface_.find(e->link.name); it != vm_of_interface_.end()) {
      dirty_.insert(it->second);
    }
    // An uplink that changes (appears, goes down) affects every VM's proxy
    // entries.
    for (const std::string& uplink : options_.host.uplinks) {
      if (uplink == e->link.name) MarkAllDirty();
    }
  } else if (auto* e = std::get_if<kernel::AddressEvent>(&event)) {
    by_ifindex(e->address.ifindex);
  } else if (auto* e = std::get_if<kernel::RouteEvent>(&event)) {
    if (e->route.destination.length == e->route.destination.address.bit_length()) {
      MarkDirtyByAddress(e->route.destination.address);
    }
  } else if (auto* e = std::get_if<kernel::NeighborEvent>(&event)) {
    MarkDirtyByAddress(e->neighbor.address);
  }
}

void Reconciler::CheckProxies() {
  next_proxy_check_ = Clock::now() + options_.proxy_check_interval;
  auto proxies = kernel_->DumpProxyNeighbors();
  if (!proxies.ok()) {
    VMNET_LOG(Warning) << "event=proxy_dump_failed error=\"" << proxies.status().message()
                       << "\"";
    return;
  }
  std::vector<IpAddress> changed = model_.ReplaceProxies(*proxies);
  vmnet::MutexLock lock(&mu_);
  for (const IpAddress& a : changed) MarkDirtyByAddress(a);
}

absl::Status Reconciler::FullResync(bool initial) {
  last_resync_ = Clock::now();
  next_full_resync_ = last_resync_ + options_.full_resync_interval;
  next_proxy_check_ = last_resync_ + options_.proxy_check_interval;
  // Events queued before the dump are older than it: drop them, and apply
  // only what arrives after.
  std::vector<kernel::Event> stale;
  (void)kernel_->ReadEvents(&stale);
  auto snapshot = kernel_->Dump();
  if (!snapshot.ok()) return snapshot.status();
  model_.Reset(std::move(*snapshot));
  resync_wanted_ = false;
  {
    vmnet::MutexLock lock(&mu_);
    if (!initial) ++counters_.full_resyncs;
    MarkAllDirty();
  }
  sweep_orphans_ = true;
  if (initial && options_.dad) {
    // What this host published before a restart passed its check then.
    vmnet::MutexLock lock(&mu_);
    for (auto& [vm_id, r] : vms_) {
      for (const IpAddress& a : r.spec.addresses) {
        for (const std::string& name : options_.host.uplinks) {
          const kernel::Link* uplink = model_.LinkByName(name);
          const kernel::Neighbor* proxy =
              uplink == nullptr ? nullptr : model_.FindNeighbor(uplink->ifindex, a, true);
          if (proxy != nullptr && proxy->protocol == options_.host.protocol) {
            r.verified.push_back(a);
            break;
          }
        }
      }
    }
  }
  if (initial) {
    // The first sync finds each VM's state; it is not a change to announce
    // (watchers of the new epoch start with a snapshot).
    initial_sync_ = true;
    ReconcileDirty();
    initial_sync_ = false;
  }
  return absl::OkStatus();
}

absl::Status Reconciler::CheckAgainstHost(
    const VmSpec& spec, const std::vector<size_t>& request_index) const {
  for (const std::string& uplink : options_.host.uplinks) {
    if (spec.interface == uplink) {
      return absl::InvalidArgumentError(absl::StrCat(
          "interface: \"", spec.interface, "\" is an uplink of this host (--uplinks)"));
    }
  }
  if (const kernel::Link* link = model_.LinkByName(spec.interface);
      link && link->loopback) {
    return absl::InvalidArgumentError(absl::StrCat(
        "interface: \"", spec.interface, "\" is a loopback interface, not a VM's link"));
  }
  for (size_t i = 0; i < spec.addresses.size(); ++i) {
    const IpAddress& a = spec.addresses[i];
    if (model_.IsLocalAddress(a)) {
      return absl::InvalidArgumentError(
          absl::StrCat(AddressField(request_index, i), ": \"", a.ToString(),
                       "\" is one of the host's own addresses"));
    }
    if (model_.IsConnectedBroadcast(a)) {
      return absl::InvalidArgumentError(absl::StrCat(
          AddressField(request_index, i), ": \"", a.ToString(),
          "\" is the broadcast address of a subnet the host is connected to"));
    }
  }
  return absl::OkStatus();
}

void Reconciler::ProcessCommands(std::deque<Command> commands,
                                 std::vector<Reply>* replies) {
  vmnet::MutexLock lock(&mu_);
  undo_.clear();
  std::vector<std::pair<std::string, VmView>> removed_views;
  std::vector<size_t> mutating;  // replies that wait on persistence
  for (Command& c : commands) {
    Reply reply{std::move(c.attach_done), std::move(c.detach_done), c.spec.vm_id,
                absl::OkStatus()};
    const std::string& vm_id = c.spec.vm_id;
    auto existing = vms_.find(vm_id);
    if (c.kind == Command::Kind::kProbeDone) {
      ProbeDone(vm_id, c.spec.addresses, c.conflicts);
      continue;
    }
    if (c.kind == Command::Kind::kDetach) {
      if (existing == vms_.end()) {
        if (!c.allow_missing) {
          reply.status = absl::NotFoundError(absl::StrCat(
              "vm_id: no VM \"", vm_id, "\" is attached (set allow_missing to ignore)"));
        }
        replies->push_back(std::move(reply));
        continue;
      }
      removed_.try_emplace(vm_id, existing->second.spec);
      removed_views.emplace_back(vm_id, ViewOf(existing->second));
      undo_.emplace_back(vm_id, existing->second);
      SetRecord(vm_id, std::nullopt);
      dirty_.erase(vm_id);
      spec_changed_.erase(vm_id);
      VMNET_LOG(Info) << "event=detach vm_id=" << vm_id << " request_id=" << c.request_id;
      mutating.push_back(replies->size());
      replies->push_back(std::move(reply));
      continue;
    }
    // Attach: conflicts with other VMs, then the host, then limits.
    const VmSpec& spec = c.spec;
    absl::Status status;
    if (auto it = vm_of_interface_.find(spec.interface);
        it != vm_of_interface_.end() && it->second != vm_id) {
      status = absl::AlreadyExistsError(absl::StrCat(
          "interface: \"", spec.interface, "\" is held by VM \"", it->second, "\""));
    }
    for (size_t i = 0; status.ok() && i < spec.addresses.size(); ++i) {
      auto it = vm_of_address_.find(spec.addresses[i]);
      if (it != vm_of_address_.end() && it->second != vm_id) {
        status = absl::AlreadyExistsError(absl::StrCat(
            AddressField(c.request_index, i), ": \"", spec.addresses[i].ToString(),
            "\" is held by VM \"", it->second, "\""));
      }
    }
    if (status.ok()) status = CheckAgainstHost(spec, c.request_index);
    if (status.ok() && existing == vms_.end() && vms_.size() >= options_.max_vms) {
      status = absl::ResourceExhaustedError(
          absl::StrCat("this host holds ", vms_.size(), " VMs, the limit (--max-vms)"));
    }
    if (!status.ok() || c.validate_only) {
      reply.status = status;
      if (status.ok()) {
        // Answer with what the VM would be, changing nothing.
        VmRecord would;
        if (existing != vms_.end()) would = existing->second;
        would.spec = spec;
        VmPlan plan = PlanVm(spec, model_, options_.host);
        would.state = plan.state;
        would.message = plan.message;
        reply.attach_done(ViewOf(would));
        continue;
      }
      replies->push_back(std::move(reply));
      continue;
    }
    if (existing != vms_.end() && existing->second.spec == spec) {
      // The same spec again: a no-op, except that it retries a duplicate
      // address check that failed.
      if (!existing->second.dad_failure.empty()) {
        existing->second.dad_failure.clear();
        dirty_.insert(vm_id);
      }
      replies->push_back(std::move(reply));
      continue;
    }
    std::optional<VmRecord> previous;
    VmRecord record;
    if (existing != vms_.end()) {
      previous = existing->second;
      removed_.try_emplace(vm_id, existing->second.spec);
      record = existing->second;
    }
    undo_.emplace_back(vm_id, previous);
    record.spec = spec;
    record.backoff = milliseconds(0);
    record.dad_failure.clear();
    SetRecord(vm_id, std::move(record));
    dirty_.insert(vm_id);
    spec_changed_[vm_id] = previous ? VmEventType::kChanged : VmEventType::kAdded;
    VMNET_LOG(Info) << "event=attach vm_id=" << vm_id << " interface="
                    << spec.interface << " addresses=" << spec.addresses.size()
                    << " request_id=" << c.request_id;
    mutating.push_back(replies->size());
    replies->push_back(std::move(reply));
  }
  if (undo_.empty()) return;
  if (absl::Status s = Persist(); !s.ok()) {
    VMNET_LOG(Error) << "event=persist_failed error=\"" << s.message() << "\"";
    UndoMutations();
    for (size_t i : mutating) {
      (*replies)[i].status = absl::InternalError(absl::StrCat(
          "the desired state could not be made durable, nothing was changed: ",
          s.message()));
    }
    return;
  }
  for (auto& [vm_id, view] : removed_views) {
    uint64_t revision = observer_->Publish(VmEventType::kRemoved, view, "detached");
    (void)revision;
  }
}

void Reconciler::UndoMutations() {
  for (auto it = undo_.rbegin(); it != undo_.rend(); ++it) {
    SetRecord(it->first, it->second);
    removed_.erase(it->first);
    spec_changed_.erase(it->first);
    if (it->second) {
      dirty_.insert(it->first);
    } else {
      dirty_.erase(it->first);
    }
  }
  undo_.clear();
}

absl::Status Reconciler::Persist() {
  StoredState state;
  state.vms.reserve(vms_.size());
  for (const auto& [id, r] : vms_) state.vms.push_back({r.spec, r.revision});
  std::sort(state.vms.begin(), state.vms.end(), [](const StoredVm& a, const StoredVm& b) {
    return a.spec.vm_id < b.spec.vm_id;
  });
  state.revision_lease = revision_lease_;
  return store_->Save(state);
}

void Reconciler::Publish(VmEventType type, VmRecord* record, const std::string& detail) {
  record->revision = observer_->Publish(type, ViewOf(*record), detail);
  if (record->revision + kRevisionLease / 2 >= revision_lease_) {
    revision_lease_ = record->revision + kRevisionLease;
    if (absl::Status s = Persist(); !s.ok()) {
      VMNET_LOG(Error) << "event=persist_failed what=revision_lease error=\""
                       << s.message() << "\"";
    }
  }
}

void Reconciler::ReconcileDirty() {
  auto started = Clock::now();
  // Phase 1: remove what replaced or detached specs installed, so that the
  // plans below see the kernel without it.
  std::vector<kernel::Write> removals;
  {
    vmnet::ReaderMutexLock lock(&mu_);
    for (const auto& [vm_id, old_spec] : removed_) {
      auto it = vms_.find(vm_id);
      const VmSpec* now = it == vms_.end() ? nullptr : &it->second.spec;
      auto w = PlanRemoval(old_spec, now, model_, options_.host);
      removals.insert(removals.end(), w.begin(), w.end());
    }
    if (sweep_orphans_) {
      absl::flat_hash_map<IpAddress, AddressOwner> owner;
      for (const auto& [vm_id, r] : vms_) {
        for (const IpAddress& a : r.spec.addresses) {
          owner[a] = {r.spec.interface, r.spec.mac.has_value()};
        }
      }
      auto w = PlanOrphans(model_, options_.host, owner, vm_of_interface_);
      removals.insert(removals.end(), w.begin(), w.end());
    }
  }
  removed_.clear();
  sweep_orphans_ = false;
  uint64_t failures = 0;
  std::array<uint64_t, kernel::kObjectKinds> ok_by_kind{}, failed_by_kind{};
  if (!removals.empty()) {
    std::vector<absl::Status> results = kernel_->Apply(removals);
    for (size_t i = 0; i < removals.size(); ++i) {
      int kind = static_cast<int>(kernel::KindOf(removals[i]));
      if (results[i].ok()) {
        ++ok_by_kind[kind];
        model_.ApplyWrite(removals[i]);
      } else {
        ++failed_by_kind[kind];
        ++failures;
        VMNET_LOG(Warning) << "event=kernel_write_failed error=\"" << results[i].message()
                           << "\"";
      }
    }
  }

  // Phase 2: bring every dirty VM to its spec, all writes in one batch.
  struct Planned {
    std::string vm_id;
    VmPlan plan;
    size_t first, count;
  };
  std::vector<Planned> planned;
  std::vector<kernel::Write> writes;
  {
    vmnet::MutexLock lock(&mu_);
    writes = PlanUplinks(model_, options_.host, ipv6_vms_ > 0);
    for (const std::string& vm_id : dirty_) {
      auto it = vms_.find(vm_id);
      if (it == vms_.end()) continue;
      bool probing = false;
      VmPlan plan =
          PlanVm(PublishableSpec(vm_id, it->second, &probing), model_, options_.host);
      if (!it->second.dad_failure.empty()) {
        plan.state = VmState::kFailed;
        plan.message = it->second.dad_failure;
      } else if (probing && plan.state == VmState::kProgrammed) {
        plan.state = VmState::kPending;
        plan.message =
            "checking on the uplinks that no other machine holds its addresses (--dad)";
      }
      size_t first = writes.size();
      writes.insert(writes.end(), plan.writes.begin(), plan.writes.end());
      planned.push_back({vm_id, std::move(plan), first, writes.size() - first});
    }
  }
  dirty_.clear();
  std::vector<absl::Status> results;
  if (!writes.empty()) results = kernel_->Apply(writes);
  for (size_t i = 0; i < writes.size(); ++i) {
    int kind = static_cast<int>(kernel::KindOf(writes[i]));
    if (results[i].ok()) {
      ++ok_by_kind[kind];
      model_.ApplyWrite(writes[i]);
      if (const auto* conf = std::get_if<kernel::SetIpv6Conf>(&writes[i]))
        LogHostSetting(*conf);
    } else {
      ++failed_by_kind[kind];
      ++failures;
      // The model disagreed with the kernel: re-read it soon.
      if (absl::IsAlreadyExists(results[i]) || absl::IsNotFound(results[i])) {
        resync_wanted_ = true;
      }
    }
  }

  vmnet::MutexLock lock(&mu_);
  counters_.kernel_writes += removals.size() + writes.size();
  counters_.kernel_write_failures += failures;
  for (int k = 0; k < kernel::kObjectKinds; ++k) {
    counters_.writes_ok[k] += ok_by_kind[k];
    counters_.writes_failed[k] += failed_by_kind[k];
  }
  auto now = Clock::now();
  for (Planned& p : planned) {
    auto it = vms_.find(p.vm_id);
    if (it == vms_.end()) continue;
    VmRecord& r = it->second;
    VmState old_state = r.state;
    std::string old_message = r.message;
    r.state = p.plan.state;
    r.message = p.plan.message;
    std::vector<kernel::Write> done;
    for (size_t i = p.first; i < p.first + p.count; ++i) {
      if (results[i].ok()) {
        done.push_back(writes[i]);
      } else if (r.state != VmState::kFailed) {
        r.state = VmState::kFailed;
        r.message = std::string(results[i].message());
      }
    }
    if (r.state == VmState::kProgrammed && options_.announcer != nullptr) {
      bool everything =
          old_state != VmState::kProgrammed || spec_changed_.contains(p.vm_id);
      Announce(r, everything, done);
    }
    if (r.state == VmState::kFailed && !r.dad_failure.empty()) {
      // Not retried: only a new AttachVm checks the addresses again.
      if (old_message != r.message) {
        VMNET_LOG(Warning) << "event=vm_failed vm_id=" << p.vm_id << " error=\""
                           << r.message << "\"";
      }
    } else if (r.state == VmState::kFailed) {
      r.backoff = std::min(kMaxBackoff, std::max(kFirstBackoff, r.backoff * 2));
      retries_.emplace(now + r.backoff, p.vm_id);
      if (old_message != r.message) {
        VMNET_LOG(Warning) << "event=vm_failed vm_id=" << p.vm_id << " error=\""
                           << r.message << "\" retry_in_ms=" << r.backoff.count();
      }
    } else {
      r.backoff = milliseconds(0);
    }
    PublishOutcome(p.vm_id, old_state, old_message, old_state == VmState::kProgrammed,
                   done);
  }
  // VMs whose spec changed but needed no planning (validate paths) still
  // get their event.
  for (auto& [vm_id, type] : spec_changed_) {
    auto it = vms_.find(vm_id);
    if (it != vms_.end()) Publish(type, &it->second, "spec changed");
  }
  spec_changed_.clear();
  if (!planned.empty() || !removals.empty()) {
    double seconds = std::chrono::duration<double>(Clock::now() - started).count();
    ++counters_.reconcile_passes;
    counters_.reconcile_seconds_sum += seconds;
    for (size_t b = 0; b < kReconcileBuckets.size(); ++b) {
      if (seconds <= kReconcileBuckets[b]) {
        ++counters_.reconcile_buckets[b];
        break;
      }
    }
  }
}

VmSpec Reconciler::PublishableSpec(const std::string& vm_id, VmRecord& record,
                                   bool* pending) {
  if (!options_.dad || options_.announcer == nullptr) return record.spec;
  VmSpec publishable = record.spec;
  publishable.addresses.clear();
  if (!record.dad_failure.empty()) return publishable;
  std::vector<IpAddress> unverified;
  for (const IpAddress& a : record.spec.addresses) {
    if (std::binary_search(record.verified.begin(), record.verified.end(), a)) {
      publishable.addresses.push_back(a);
    } else {
      unverified.push_back(a);
    }
  }
  if (unverified.empty()) return publishable;
  *pending = true;
  if (record.probing) return publishable;
  std::vector<AddressAnnouncer::ProbeLink> links;
  for (const std::string& name : options_.host.uplinks) {
    if (const kernel::Link* uplink = model_.LinkByName(name); uplink && uplink->up) {
      links.push_back({uplink->ifindex, uplink->name, uplink->mac});
    }
  }
  record.probing = true;
  options_.announcer->Probe(
      std::move(links), unverified,
      [this, vm_id, unverified](std::vector<AddressAnnouncer::Conflict> conflicts) {
        Command c;
        c.kind = Command::Kind::kProbeDone;
        c.spec.vm_id = vm_id;
        c.spec.addresses = unverified;
        c.conflicts = std::move(conflicts);
        Post(std::move(c));
      });
  return publishable;
}

void Reconciler::ProbeDone(const std::string& vm_id, const std::vector<IpAddress>& probed,
                           const std::vector<AddressAnnouncer::Conflict>& conflicts) {
  auto it = vms_.find(vm_id);
  if (it == vms_.end()) return;
  VmRecord& r = it->second;
  r.probing = false;
  dirty_.insert(vm_id);
  auto wanted = [&](const IpAddress& a) {
    return std::binary_search(r.spec.addresses.begin(), r.spec.addresses.end(), a);
  };
  std::vector<std::string> answers;
  for (const AddressAnnouncer::Conflict& c : conflicts) {
    if (!wanted(c.address)) continue;
    answers.push_back(absl::StrCat(c.address.ToString(), " is answered on ", c.interface,
                                   " by ", c.answered_by.ToString()));
  }
  if (!answers.empty()) {
    counters_.dad_conflicts += answers.size();
    r.dad_failure =
        absl::StrCat("another machine holds the address: ", absl::StrJoin(answers, "; "),
                     "; nothing was published (--dad). Attach again to retry");
    VMNET_LOG(Warning) << "event=duplicate_address vm_id=" << vm_id << " detail=\""
                       << absl::StrJoin(answers, "; ") << "\"";
    return;
  }
  for (const IpAddress& a : probed) {
    if (wanted(a)) r.verified.push_back(a);
  }
  std::sort(r.verified.begin(), r.verified.end());
  r.verified.erase(std::unique(r.verified.begin(), r.verified.end()), r.verified.end());
}

void Reconciler::Announce(const VmRecord& record, bool everything,
                          const std::vector<kernel::Write>& done) {
  std::vector<IpAddress> addresses;
  if (everything) {
    addresses = record.spec.addresses;
  } else {
    // A proxy entry published again (an uplink that came back, a repair).
    for (const kernel::Write& w : done) {
      if (const auto* set = std::get_if<kernel::SetNeighbor>(&w);
          set && set->neighbor.proxy) {
        addresses.push_back(set->neighbor.address);
      }
    }
  }
  std::vector<Announcement> items;
  for (const std::string& name : options_.host.uplinks) {
    const kernel::Link* uplink = model_.LinkByName(name);
    if (uplink == nullptr || !uplink->up) continue;
    for (const IpAddress& a : addresses) {
      items.push_back({uplink->ifindex, uplink->name, uplink->mac, a,
                       a.is_v6() ? model_.LinkLocal6(uplink->ifindex) : IpAddress(),
                       false});
    }
  }
  // The gateway on the VM's link: a VM that moved here learns this host's
  // MAC for it at once.
  const kernel::Link* link = model_.LinkByName(record.spec.interface);
  if (everything && link != nullptr) {
    items.push_back(
        {link->ifindex, link->name, link->mac, options_.host.gateway, {}, false});
    if (record.spec.has_ipv6()) {
      items.push_back({link->ifindex, link->name, link->mac, options_.host.gateway6,
                       options_.host.gateway6, true});
    }
  }
  if (items.empty()) return;
  counters_.announcements += items.size();
  options_.announcer->Announce(std::move(items));
}

void Reconciler::PublishOutcome(const std::string& vm_id, VmState old_state,
                                const std::string& old_message, bool was_programmed,
                                const std::vector<kernel::Write>& writes) {
  VmRecord& r = vms_.at(vm_id);
  if (auto it = spec_changed_.find(vm_id); it != spec_changed_.end()) {
    std::string detail = it->second == VmEventType::kAdded ? "attached" : "spec changed";
    if (!writes.empty()) absl::StrAppend(&detail, ": ", WritesText(writes));
    Publish(it->second, &r, detail);
    spec_changed_.erase(it);
    return;
  }
  if (was_programmed && r.state == VmState::kProgrammed && !writes.empty()) {
    ++counters_.drift_repairs;
    for (const kernel::Write& w : writes) {
      ++counters_.objects_repaired[static_cast<int>(kernel::KindOf(w))];
    }
    std::string detail = absl::StrCat("repaired: ", WritesText(writes));
    VMNET_LOG(Info) << "event=drift_repaired vm_id=" << vm_id << " detail=\"" << detail
                    << "\"";
    Publish(VmEventType::kDriftRepaired, &r, detail);
    return;
  }
  if (initial_sync_) return;
  if (r.state != old_state || r.message != old_message) {
    std::string detail =
        absl::StrCat(VmStateName(old_state), " -> ", VmStateName(r.state));
    if (!r.message.empty()) absl::StrAppend(&detail, ": ", r.message);
    VMNET_LOG(Info) << "event=vm_state vm_id=" << vm_id
                    << " state=" << VmStateName(r.state);
    Publish(VmEventType::kChanged, &r, detail);
  }
}

}  // namespace vmnet
