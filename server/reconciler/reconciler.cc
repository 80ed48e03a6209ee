#include "vmnet/reconciler/reconciler.h"

#include <poll.h>
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "vmnet/base/failpoint.h"
#include "vmnet/log/log.h"

namespace vmnet {

using std::chrono::milliseconds;

namespace {

constexpr milliseconds kFirstBackoff{100};
constexpr milliseconds kMaxBackoff{30000};
// A resync asked for by an unexpected kernel answer is rate limited.
constexpr milliseconds kMinResyncGap{1000};
// VM links whose settings one proxy check reads again (one GETLINK each,
// pipelined): every IPv6 VM's accept_ra is checked each proxy-check
// interval up to this many VMs, and every ceil(n / 512) intervals beyond.
constexpr size_t kLinkSettingsPerCheck = 512;

absl::Status ShuttingDown() {
  return absl::UnavailableError("vmnetd is shutting down; retry");
}

std::string WritesText(const std::vector<kernel::Write>& writes) {
  return absl::StrJoin(writes, "; ", [](std::string* out, const kernel::Write& w) {
    out->append(kernel::ToString(w));
  });
}

// "7 kernel writes (link=1 address=1 route=2 proxy_neighbor=2 port_security=1)":
// what an attach or a spec change took, by kind (the kinds of
// vmnet_kernel_writes_total). Not each write: the event is retained in the
// Watch history, and at 10,000 VMs every byte of its detail is 10 KB of the
// agent's memory; GetVm and the lists show the objects themselves.
std::string WritesSummary(const std::vector<kernel::Write>& writes) {
  std::array<int, kernel::kObjectKinds> by_kind{};
  for (const kernel::Write& w : writes) ++by_kind[static_cast<int>(kernel::KindOf(w))];
  std::string out = absl::StrCat(
      writes.size(), writes.size() == 1 ? " kernel write (" : " kernel writes (");
  const char* separator = "";
  for (int kind = 0; kind < kernel::kObjectKinds; ++kind) {
    if (by_kind[kind] == 0) continue;
    absl::StrAppend(&out, separator,
                    kernel::ObjectKindName(static_cast<kernel::ObjectKind>(kind)), "=",
                    by_kind[kind]);
    separator = " ";
  }
  out += ")";
  return out;
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

void ReconcilerCounters::RecordPass(double seconds) {
  ++reconcile_passes;
  reconcile_seconds_sum += seconds;
  for (size_t b = 0; b < kReconcileBuckets.size(); ++b) {
    if (seconds <= kReconcileBuckets[b]) {
      ++reconcile_buckets[b];
      break;
    }
  }
}

Reconciler::Reconciler(kernel::Kernel* kernel, StateStore* store, VmObserver* observer,
                       ReconcilerOptions options)
    : kernel_(kernel),
      store_(store),
      observer_(observer),
      options_(std::move(options)),
      clock_(options_.clock != nullptr ? options_.clock : Clock::Real()) {
  wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  clock_->AddWaker(this, [this] { Wake(); });
}

Reconciler::~Reconciler() {
  Stop();
  clock_->RemoveWaker(this);
  if (wake_fd_ >= 0) close(wake_fd_);
}

absl::Status Reconciler::Start() {
  auto desired = DesiredState::Load(store_);
  if (!desired.ok()) return desired.status();
  desired_.emplace(std::move(*desired));
  observer_->StartRevisionsAt(desired_->first_revision());
  if (auto s = FullResync(/*initial=*/true); !s.ok()) return s;
  observer_->EndPass();
  for (const auto& [id, r] : desired_->vms()) observer_->Seed(r.View());
  ready_ = true;
  proxy_thread_ = std::thread([this] { RunProxyDumps(); });
  thread_ = std::thread([this] { Run(); });
  return absl::OkStatus();
}

void Reconciler::Stop() {
  if (stopping_.exchange(true)) return;
  Wake();
  if (thread_.joinable()) thread_.join();
  StopProxyDumps();
  // Answer what never reached the thread.
  std::deque<Command> left;
  {
    vmnet::MutexLock lock(&queue_mu_);
    left.swap(queue_);
  }
  for (Command& c : left) Refuse(c, ShuttingDown());
}

void Reconciler::Refuse(Command& command, const absl::Status& status) {
  if (auto* c = std::get_if<AttachCommand>(&command); c && c->done) c->done(status);
  if (auto* c = std::get_if<DetachCommand>(&command); c && c->done) c->done(status);
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
  bool queued = false;
  {
    vmnet::MutexLock lock(&queue_mu_);
    // A probe's result or a proxy dump is never refused: it is the agent's
    // own, and a VM or the next proxy check waits for it.
    if (queue_.size() < options_.max_pending_requests ||
        std::holds_alternative<ProbeResult>(command) ||
        std::holds_alternative<ProxyDump>(command)) {
      queue_.push_back(std::move(command));
      queued = true;
    }
  }
  // Refused outside the lock: the callback may take its time.
  if (!queued) {
    Refuse(command, absl::ResourceExhaustedError(absl::StrCat(
                        "vmnetd has ", options_.max_pending_requests,
                        " requests queued, the limit (--max-pending-requests); retry "
                        "with backoff")));
  }
  Wake();
}

void Reconciler::Attach(VmSpec spec, bool validate_only, std::string request_id,
                        AttachDone done) {
  Post(AttachCommand{std::move(spec), validate_only, std::move(request_id),
                     std::move(done)});
}

void Reconciler::Detach(std::string vm_id, bool allow_missing, std::string request_id,
                        DetachDone done) {
  Post(DetachCommand{std::move(vm_id), allow_missing, std::move(request_id),
                     std::move(done)});
}

ReconcilerCounters Reconciler::counters() const {
  vmnet::ReaderMutexLock lock(&counters_mu_);
  return counters_;
}

void Reconciler::Run() {
  // Named for `top -H` and /proc/PID/task/*/comm (the e2e tests stall this thread).
  pthread_setname_np(pthread_self(), "vmnet-reconcile");
  while (!stopping_.load()) Iterate();
}

milliseconds Reconciler::NextWakeup() const {
  auto now = Now();
  auto next = std::min(next_proxy_check_, next_full_resync_);
  if (!retries_.empty()) next = std::min(next, retries_.begin()->first);
  if (resync_wanted_) next = std::min(next, last_resync_ + kMinResyncGap);
  if (next <= now) return milliseconds(0);
  return std::chrono::duration_cast<milliseconds>(next - now) + milliseconds(1);
}

void Reconciler::WaitForWork() {
  pollfd fds[2] = {{wake_fd_, POLLIN, 0}, {kernel_->event_fd(), POLLIN, 0}};
  int timeout = static_cast<int>(std::min<int64_t>(NextWakeup().count(), 60000));
  if (poll(fds, 2, timeout) < 0 && errno != EINTR) {
    VMNET_LOG(Error) << "event=poll_failed errno=" << errno;
  }
  uint64_t ignored;
  [[maybe_unused]] ssize_t n = read(wake_fd_, &ignored, sizeof(ignored));
}

void Reconciler::Iterate() {
  WaitForWork();
  if (stopping_.load()) return;

  // Read the kernel.
  DrainKernelEvents();
  auto now = Now();
  if (now >= next_proxy_check_) StartProxyCheck();
  if (now >= next_full_resync_ ||
      (resync_wanted_ && now >= last_resync_ + kMinResyncGap)) {
    if (auto s = FullResync(false); !s.ok()) {
      VMNET_LOG(Warning) << "event=resync_failed error=\"" << s.message() << "\"";
    }
  }

  // Take requests into the desired state.
  std::vector<Reply> replies;
  TakeCommands(&replies);
  // Failed VMs whose backoff is over. An entry may be stale (the VM
  // recovered, changed or went); planning it again is harmless.
  while (!retries_.empty() && retries_.begin()->first <= now) {
    dirty_.insert(retries_.begin()->second);
    retries_.erase(retries_.begin());
  }

  // Diff, apply, publish; then answer: an attach returns when the kernel
  // holds the state. The pass's events go to Watch streams together.
  Reconcile();
  observer_->EndPass();
  Answer(replies);
}

void Reconciler::Answer(std::vector<Reply>& replies) {
  for (Reply& reply : replies) {
    if (reply.detach_done) {
      reply.detach_done(reply.status);
    } else if (!reply.status.ok()) {
      reply.attach_done(reply.status);
    } else if (auto vm = directory_.Find(reply.vm_id)) {
      reply.attach_done(*vm);
    } else {
      reply.attach_done(absl::AbortedError(
          absl::StrCat("VM ", reply.vm_id, " was detached concurrently")));
    }
  }
}

// ---- Read the kernel ----

void Reconciler::DrainKernelEvents() {
  std::vector<kernel::Event> events;
  absl::Status s = kernel_->ReadEvents(&events);
  for (const kernel::Event& e : events) MarkDirty(model_.Apply(e));
  if (absl::IsResourceExhausted(s)) {
    {
      vmnet::MutexLock lock(&counters_mu_);
      ++counters_.event_overflows;
    }
    VMNET_LOG(Warning) << "event=netlink_overflow action=full_resync";
    resync_wanted_ = true;
    last_resync_ = {};  // an overflow is not rate limited
  } else if (!s.ok()) {
    VMNET_LOG(Error) << "event=netlink_read_failed error=\"" << s.message() << "\"";
    resync_wanted_ = true;
  }
}

void Reconciler::MarkAllDirty() {
  for (const auto& [id, r] : desired_->vms()) dirty_.insert(r.spec->vm_id);
}

void Reconciler::MarkDirty(const KernelModel::Touched& touched) {
  if (touched.everything) MarkAllDirty();
  if (touched.sweep_orphans) sweep_orphans_ = true;
  for (const std::string& link : touched.links) {
    if (std::string vm = desired_->VmOfInterface(link); !vm.empty()) dirty_.insert(vm);
    // An uplink that changes (appears, goes down) affects every VM's proxy
    // entries.
    for (const std::string& uplink : options_.host.uplinks) {
      if (uplink == link) MarkAllDirty();
    }
  }
  // An uplink back up: the LAN lost what was announced while it was down
  // (the proxy entries put back meanwhile could not be announced).
  for (const std::string& link : touched.came_up) {
    if (std::find(options_.host.uplinks.begin(), options_.host.uplinks.end(), link) !=
        options_.host.uplinks.end()) {
      announce_everything_ = true;
    }
  }
  for (const IpAddress& address : touched.addresses) {
    if (std::string vm = desired_->VmOfAddress(address); !vm.empty()) dirty_.insert(vm);
  }
}

void Reconciler::StartProxyCheck() {
  next_proxy_check_ = Now() + options_.proxy_check_interval;
  CheckLinkSettings();
  if (proxy_check_running_) return;  // a slow dump: this round is skipped
  proxy_check_running_ = true;
  proxies_written_.clear();
  {
    std::lock_guard lock(proxy_mu_);
    proxy_wanted_ = resync_generation_;
  }
  proxy_cv_.notify_one();
}

void Reconciler::RunProxyDumps() {
  pthread_setname_np(pthread_self(), "vmnet-proxies");
  for (;;) {
    uint64_t generation;
    {
      std::unique_lock lock(proxy_mu_);
      proxy_cv_.wait(lock, [this] { return proxy_stop_ || proxy_wanted_.has_value(); });
      if (proxy_stop_) return;
      generation = *proxy_wanted_;
      proxy_wanted_.reset();
    }
    auto proxies = kernel_->DumpProxyNeighbors();
    ProxyDump dump{generation, KernelModel::ProxySet()};
    if (proxies.ok()) {
      dump.proxies = KernelModel::MakeProxySet(*proxies);
    } else {
      dump.proxies = proxies.status();
    }
    Post(std::move(dump));
  }
}

void Reconciler::StopProxyDumps() {
  {
    std::lock_guard lock(proxy_mu_);
    proxy_stop_ = true;
  }
  proxy_cv_.notify_one();
  if (proxy_thread_.joinable()) proxy_thread_.join();
}

void Reconciler::ProxyDumpDone(ProxyDump& dump) {
  proxy_check_running_ = false;
  if (!dump.proxies.ok()) {
    VMNET_LOG(Warning) << "event=proxy_dump_failed error=\""
                       << dump.proxies.status().message() << "\"";
    return;
  }
  // Read before the last full re-read: the model is newer.
  if (dump.generation != resync_generation_) return;
  KernelModel::Touched touched;
  touched.addresses = model_.ReplaceProxies(*dump.proxies, proxies_written_);
  proxies_written_.clear();
  MarkDirty(touched);
}

void Reconciler::CheckLinkSettings() {
  if (settings_round_.empty()) {
    for (const auto& [id, r] : desired_->vms()) {
      if (r.spec->has_ipv6()) settings_round_.push_back(r.spec->interface);
    }
  }
  std::vector<int> ifindexes;
  while (!settings_round_.empty() && ifindexes.size() < kLinkSettingsPerCheck) {
    if (const kernel::LinkInfo* link = model_.LinkByName(settings_round_.back())) {
      ifindexes.push_back(link->ifindex);
    }
    settings_round_.pop_back();
  }
  if (ifindexes.empty()) return;
  auto links = kernel_->ReadLinks(ifindexes);
  if (!links.ok()) {
    VMNET_LOG(Warning) << "event=link_read_failed error=\"" << links.status().message()
                       << "\"";
    return;
  }
  for (kernel::Link& link : *links) {
    const kernel::LinkInfo* known = model_.LinkByIndex(link.ifindex);
    if (known != nullptr && known->name == link.name && known->up == link.up &&
        known->ipv4_forwarding == link.ipv4_forwarding && known->ipv6 == link.ipv6) {
      continue;
    }
    MarkDirty(model_.Apply(kernel::LinkEvent{false, std::move(link)}));
  }
}

absl::Status Reconciler::FullResync(bool initial) {
  ++resync_generation_;  // a proxy dump being read is older than this one
  last_resync_ = Now();
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
  if (!initial) {
    vmnet::MutexLock lock(&counters_mu_);
    ++counters_.full_resyncs;
  }
  MarkAllDirty();
  sweep_orphans_ = true;
  if (initial && options_.dad) {
    // What this host published before a restart passed its check then.
    for (const auto& [vm_id, r] : desired_->vms()) {
      for (const IpAddress& a : r.spec->addresses) {
        for (const std::string& name : options_.host.uplinks) {
          const kernel::LinkInfo* uplink = model_.LinkByName(name);
          const kernel::Neighbor* proxy =
              uplink == nullptr ? nullptr : model_.FindNeighbor(uplink->ifindex, a, true);
          if (proxy != nullptr && proxy->protocol == options_.host.protocol) {
            dad_.MarkVerified(r.spec->vm_id, a);
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
    Reconcile();
    initial_sync_ = false;
  }
  return absl::OkStatus();
}

// ---- Take requests ----

absl::Status Reconciler::CheckAttach(const VmSpec& spec) const {
  // Conflicts with other VMs first, then with the host, then limits.
  if (std::string holder = desired_->VmOfInterface(spec.interface);
      !holder.empty() && holder != spec.vm_id) {
    return absl::AlreadyExistsError(absl::StrCat("interface: \"", spec.interface,
                                                 "\" is held by VM \"", holder, "\""));
  }
  for (const IpAddress& a : spec.addresses) {
    if (std::string holder = desired_->VmOfAddress(a);
        !holder.empty() && holder != spec.vm_id) {
      return AddressError(absl::StatusCode::kAlreadyExists, a,
                          absl::StrCat("is held by VM \"", holder, "\""));
    }
    if (std::string holder = desired_->VmAllowingAddress(a);
        !holder.empty() && holder != spec.vm_id) {
      return AddressError(absl::StatusCode::kAlreadyExists, a,
                          absl::StrCat("is an allowed source of VM \"", holder,
                                       "\" (its allowed_source_prefixes); a VM may not "
                                       "send as another"));
    }
  }
  for (size_t i = 0; i < spec.allowed_source_prefixes.size(); ++i) {
    const IpPrefix& p = spec.allowed_source_prefixes[i];
    if (p.length != p.address.bit_length()) continue;
    if (std::string holder = desired_->VmOfAddress(p.address);
        !holder.empty() && holder != spec.vm_id) {
      return absl::InvalidArgumentError(absl::StrCat(
          "allowed_source_prefixes[", i, "]: \"", p.ToString(),
          "\" is the address of VM \"", holder, "\"; a VM may not send as another"));
    }
  }
  for (const std::string& uplink : options_.host.uplinks) {
    if (spec.interface == uplink) {
      return absl::InvalidArgumentError(absl::StrCat(
          "interface: \"", spec.interface, "\" is an uplink of this host (--uplinks)"));
    }
  }
  if (const kernel::LinkInfo* link = model_.LinkByName(spec.interface);
      link && link->loopback) {
    return absl::InvalidArgumentError(absl::StrCat(
        "interface: \"", spec.interface, "\" is a loopback interface, not a VM's link"));
  }
  for (const IpAddress& a : spec.addresses) {
    if (model_.IsLocalAddress(a)) {
      return AddressError(absl::StatusCode::kInvalidArgument, a,
                          "is one of the host's own addresses");
    }
    if (model_.IsConnectedBroadcast(a)) {
      return AddressError(
          absl::StatusCode::kInvalidArgument, a,
          "is the broadcast address of a subnet the host is connected to");
    }
  }
  if (desired_->Find(spec.vm_id) == nullptr && desired_->size() >= options_.max_vms) {
    return absl::ResourceExhaustedError(absl::StrCat("this host holds ", desired_->size(),
                                                     " VMs, the limit (--max-vms)"));
  }
  return absl::OkStatus();
}

void Reconciler::TakeCommands(std::vector<Reply>* replies) {
  std::deque<Command> commands;
  {
    vmnet::MutexLock lock(&queue_mu_);
    commands.swap(queue_);
  }
  std::vector<VmView> detached;
  std::vector<size_t> mutating;  // replies that wait on durability
  for (Command& command : commands) {
    if (auto* probe = std::get_if<ProbeResult>(&command)) {
      ProbeDone(*probe);
      continue;
    }
    if (auto* dump = std::get_if<ProxyDump>(&command)) {
      ProxyDumpDone(*dump);
      continue;
    }
    if (auto* c = std::get_if<DetachCommand>(&command)) {
      Reply reply{nullptr, std::move(c->done), c->vm_id, absl::OkStatus()};
      const VmRecord* existing = desired_->Find(c->vm_id);
      if (existing == nullptr) {
        if (!c->allow_missing) {
          reply.status = absl::NotFoundError(
              absl::StrCat("vm_id: no VM \"", c->vm_id,
                           "\" is attached (set allow_missing to ignore)"));
        }
        replies->push_back(std::move(reply));
        continue;
      }
      removed_.try_emplace(c->vm_id, *existing->spec);
      detached.push_back(existing->View());
      desired_->Remove(c->vm_id);
      dirty_.erase(c->vm_id);
      spec_changed_.erase(c->vm_id);
      VMNET_LOG(Info) << "event=detach vm_id=" << c->vm_id
                      << " request_id=" << c->request_id;
      mutating.push_back(replies->size());
      replies->push_back(std::move(reply));
      continue;
    }
    auto& c = std::get<AttachCommand>(command);
    const VmSpec& spec = c.spec;
    const std::string& vm_id = spec.vm_id;
    Reply reply{std::move(c.done), nullptr, vm_id, CheckAttach(spec)};
    if (!reply.status.ok()) {
      replies->push_back(std::move(reply));
      continue;
    }
    const VmRecord* existing = desired_->Find(vm_id);
    if (c.validate_only) {
      // Answer with what the VM would be, changing nothing.
      VmRecord would = existing != nullptr ? *existing : VmRecord{};
      would.spec = std::make_shared<const VmSpec>(spec);
      VmPlan plan = PlanVm(spec, model_, options_.host);
      would.state = plan.state;
      would.message = plan.message;
      reply.attach_done(would.View());
      continue;
    }
    if (existing != nullptr && *existing->spec == spec) {
      // The same spec again: a no-op, except that it retries a duplicate
      // address check that failed.
      if (dad_.ClearFailure(vm_id)) dirty_.insert(vm_id);
      replies->push_back(std::move(reply));
      continue;
    }
    if (existing != nullptr) removed_.try_emplace(vm_id, *existing->spec);
    spec_changed_[vm_id] =
        existing != nullptr ? VmEventType::kChanged : VmEventType::kAdded;
    desired_->Put(vm_id, spec);
    dad_.ClearFailure(vm_id);
    dirty_.insert(vm_id);
    VMNET_LOG(Info) << "event=attach vm_id=" << vm_id << " interface="
                    << spec.interface << " addresses=" << spec.addresses.size()
                    << " request_id=" << c.request_id;
    mutating.push_back(replies->size());
    replies->push_back(std::move(reply));
  }
  if (desired_->batch_empty()) return;

  // Durable before anything is acknowledged, or not changed at all.
  auto batch = desired_->batch();
  if (absl::Status s = desired_->Commit(); !s.ok()) {
    VMNET_LOG(Error) << "event=persist_failed error=\"" << s.message() << "\"";
    for (const auto& [vm_id, before] : batch) {
      removed_.erase(vm_id);
      spec_changed_.erase(vm_id);
      if (before) {
        dirty_.insert(vm_id);
      } else {
        dirty_.erase(vm_id);
      }
    }
    // The store's code is kept: FAILED_PRECONDITION when the state directory
    // was removed or replaced (the operator must act), INTERNAL otherwise.
    absl::StatusCode code = s.code() == absl::StatusCode::kFailedPrecondition
                                ? absl::StatusCode::kFailedPrecondition
                                : absl::StatusCode::kInternal;
    for (size_t i : mutating) {
      (*replies)[i].status = absl::Status(
          code, absl::StrCat("the desired state could not be made durable, nothing was "
                             "changed: ",
                             s.message()));
    }
    return;
  }
  CrashPoint("after_state_saved");
  for (VmView& view : detached) {
    dad_.Forget(view.spec->vm_id);
    changed_views_.insert(view.spec->vm_id);
    view.revision = desired_->IssueRevision();
    observer_->Publish(VmEventType::kRemoved, view, "detached");
  }
}

void Reconciler::ProbeDone(const ProbeResult& result) {
  const VmRecord* record = desired_->Find(result.vm_id);
  if (record == nullptr) return;
  dirty_.insert(result.vm_id);
  size_t conflicts = dad_.ProbeDone(*record->spec, result.probed, result.conflicts);
  if (conflicts > 0) {
    {
      vmnet::MutexLock lock(&counters_mu_);
      counters_.dad_conflicts += conflicts;
    }
    VMNET_LOG(Warning) << "event=duplicate_address vm_id=" << result.vm_id << " detail=\""
                       << dad_.Failure(result.vm_id) << "\"";
  }
}

// ---- Diff, apply, publish ----

void Reconciler::Reconcile() {
  auto started = std::chrono::steady_clock::now();  // a measurement, not a deadline
  // What replaced or detached specs installed goes first, so that the
  // plans below see the kernel without it.
  std::vector<kernel::Write> removals = PlanRemovals();
  for (const absl::Status& s : ApplyWrites(removals)) {
    // What failed to go is found again by the re-read (orphans).
    if (!s.ok()) resync_wanted_ = true;
  }

  std::vector<kernel::Write> writes;
  std::vector<PlannedVm> planned = PlanDirty(&writes);
  std::vector<absl::Status> results = ApplyWrites(writes);
  for (const PlannedVm& p : planned) RecordOutcome(p, writes, results);
  announce_everything_ = false;  // every VM was planned (an uplink marks them all)

  // VMs whose spec changed but needed no planning still get their event.
  for (auto& [vm_id, type] : spec_changed_) {
    if (VmRecord* r = desired_->FindMutable(vm_id)) Publish(type, *r, "spec changed");
  }
  spec_changed_.clear();

  if (!planned.empty() || !removals.empty()) {
    double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    vmnet::MutexLock lock(&counters_mu_);
    counters_.RecordPass(seconds);
  }
  for (const std::string& vm_id : changed_views_) {
    directory_.Update(vm_id, desired_->Find(vm_id));
  }
  changed_views_.clear();
}

std::vector<kernel::Write> Reconciler::PlanRemovals() {
  std::vector<kernel::Write> removals;
  for (const auto& [vm_id, old_spec] : removed_) {
    const VmRecord* now = desired_->Find(vm_id);
    auto w = PlanRemoval(old_spec, now != nullptr ? now->spec.get() : nullptr, model_,
                         options_.host);
    removals.insert(removals.end(), w.begin(), w.end());
  }
  removed_.clear();
  if (sweep_orphans_) {
    std::vector<const VmSpec*> desired;
    desired.reserve(desired_->size());
    for (const auto& [vm_id, r] : desired_->vms()) desired.push_back(r.spec.get());
    auto w = PlanOrphans(model_, options_.host, desired);
    removals.insert(removals.end(), w.begin(), w.end());
    sweep_orphans_ = false;
  }
  return removals;
}

std::vector<Reconciler::PlannedVm> Reconciler::PlanDirty(
    std::vector<kernel::Write>* writes) {
  *writes = PlanUplinks(model_, options_.host, desired_->ipv6_vms() > 0);
  if (ReplansEveryVm(*writes)) MarkAllDirty();
  std::vector<PlannedVm> planned;
  for (const std::string& vm_id : dirty_) {
    const VmRecord* record = desired_->Find(vm_id);
    if (record == nullptr) continue;
    VmPlan plan = PlanWithDad(*record);
    size_t first = writes->size();
    writes->insert(writes->end(), plan.writes.begin(), plan.writes.end());
    planned.push_back({vm_id, std::move(plan), first, writes->size() - first});
  }
  dirty_.clear();
  return planned;
}

std::vector<absl::Status> Reconciler::ApplyWrites(
    const std::vector<kernel::Write>& writes) {
  if (writes.empty()) return {};
  std::vector<absl::Status> results = kernel_->Apply(writes);
  std::array<uint64_t, kernel::kObjectKinds> ok{}, failed{};
  uint64_t failures = 0;
  for (size_t i = 0; i < writes.size(); ++i) {
    kernel::ObjectKind object = kernel::KindOf(writes[i]);
    int kind = static_cast<int>(object);
    if (object == kernel::ObjectKind::kProxyNeighbor && proxy_check_running_) {
      proxies_written_.insert(kernel::NeighborOf(writes[i])->address);
    }
    if (results[i].ok()) {
      ++ok[kind];
      model_.ApplyWrite(writes[i]);
      if (const auto* conf = std::get_if<kernel::SetIpv6Conf>(&writes[i]))
        LogHostSetting(*conf);
      continue;
    }
    ++failed[kind];
    ++failures;
    VMNET_LOG(Debug) << "event=kernel_write_failed error=\"" << results[i].message()
                     << "\"";
    // The model disagreed with the kernel: re-read it soon.
    if (absl::IsAlreadyExists(results[i]) || absl::IsNotFound(results[i]) ||
        absl::IsUnavailable(results[i])) {
      resync_wanted_ = true;
    }
  }
  vmnet::MutexLock lock(&counters_mu_);
  counters_.kernel_writes += writes.size();
  counters_.kernel_write_failures += failures;
  for (int k = 0; k < kernel::kObjectKinds; ++k) {
    counters_.writes_ok[k] += ok[k];
    counters_.writes_failed[k] += failed[k];
  }
  return results;
}

VmPlan Reconciler::PlanWithDad(const VmRecord& record) {
  if (!options_.dad || options_.announcer == nullptr) {
    return PlanVm(*record.spec, model_, options_.host);
  }
  const std::string& vm_id = record.spec->vm_id;
  DadTracker::Publishable split = dad_.Split(*record.spec);
  if (split.start_probe) {
    std::vector<AddressAnnouncer::ProbeLink> links;
    for (const std::string& name : options_.host.uplinks) {
      if (const kernel::LinkInfo* uplink = model_.LinkByName(name);
          uplink && uplink->up) {
        links.push_back({uplink->ifindex, uplink->name, uplink->mac});
      }
    }
    dad_.ProbeStarted(vm_id);
    options_.announcer->Probe(std::move(links), split.unverified,
                              [this, vm_id, probed = split.unverified](
                                  std::vector<AddressAnnouncer::Conflict> conflicts) {
                                ProbeResult result{vm_id, probed, {}};
                                for (AddressAnnouncer::Conflict& c : conflicts) {
                                  result.conflicts.push_back(
                                      {c.address, std::move(c.interface), c.answered_by});
                                }
                                Post(std::move(result));
                              });
  }
  VmPlan plan = PlanVm(split.spec, model_, options_.host);
  if (std::string failure = dad_.Failure(vm_id); !failure.empty()) {
    plan.state = VmState::kFailed;
    plan.message = std::move(failure);
  } else if (!split.unverified.empty() && plan.state == VmState::kProgrammed) {
    plan.state = VmState::kPending;
    plan.message =
        "checking on the uplinks that no other machine holds its addresses (--dad)";
  }
  return plan;
}

void Reconciler::RecordOutcome(const PlannedVm& p,
                               const std::vector<kernel::Write>& writes,
                               const std::vector<absl::Status>& results) {
  VmRecord* record = desired_->FindMutable(p.vm_id);
  if (record == nullptr) return;
  VmRecord& r = *record;
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
    bool everything = old_state != VmState::kProgrammed ||
                      spec_changed_.contains(p.vm_id) || announce_everything_;
    Announce(r, everything, done);
  }
  bool dad_failed = !dad_.Failure(p.vm_id).empty();
  if (r.state == VmState::kFailed && dad_failed) {
    // Not retried: only a new AttachVm checks the addresses again.
    if (old_message != r.message) {
      VMNET_LOG(Warning) << "event=vm_failed vm_id=" << p.vm_id << " error=\""
                         << r.message << "\"";
    }
  } else if (r.state == VmState::kFailed) {
    r.backoff =
        std::min(kMaxBackoff, std::max(kFirstBackoff, milliseconds(r.backoff) * 2));
    retries_.emplace(Now() + r.backoff, p.vm_id);
    if (old_message != r.message) {
      VMNET_LOG(Warning) << "event=vm_failed vm_id=" << p.vm_id << " error=\""
                         << r.message << "\" retry_in_ms=" << r.backoff.count();
    }
  } else {
    r.backoff = milliseconds(0);
  }
  changed_views_.insert(p.vm_id);
  PublishOutcome(r, old_state, old_message, done);
}

void Reconciler::Announce(const VmRecord& record, bool everything,
                          const std::vector<kernel::Write>& done) {
  // What a repair brought back, the LAN and the VM may have given up on:
  // an address whose proxy entry was published again (an uplink that came
  // back) or whose route was (the VM's link went down and up); a gateway
  // address put back on the VM's link.
  std::set<IpAddress> back;
  bool gateway_back = false, gateway6_back = false;
  for (const kernel::Write& w : done) {
    if (std::holds_alternative<kernel::SetLinkUp>(w)) everything = true;
    if (const auto* set = std::get_if<kernel::SetNeighbor>(&w);
        set && set->neighbor.proxy) {
      back.insert(set->neighbor.address);
    } else if (const auto* route = std::get_if<kernel::AddRoute>(&w)) {
      back.insert(route->route.destination.address);
    } else if (const auto* address = std::get_if<kernel::AddAddress>(&w)) {
      gateway_back |= address->address.prefix.address == options_.host.gateway;
      gateway6_back |= address->address.prefix.address == options_.host.gateway6;
    }
  }
  std::vector<IpAddress> addresses;
  if (everything) {
    addresses = record.spec->addresses;
  } else {
    for (const IpAddress& a : record.spec->addresses) {
      if (back.contains(a)) addresses.push_back(a);
    }
  }
  std::vector<Announcement> items;
  for (const std::string& name : options_.host.uplinks) {
    const kernel::LinkInfo* uplink = model_.LinkByName(name);
    if (uplink == nullptr || !uplink->up) continue;
    for (const IpAddress& a : addresses) {
      items.push_back({uplink->ifindex, uplink->name, uplink->mac, a,
                       a.is_v6() ? model_.LinkLocal6(uplink->ifindex) : IpAddress(),
                       false});
    }
  }
  // The gateway on the VM's link: a VM that moved here learns this host's
  // MAC for it at once.
  const kernel::LinkInfo* link = model_.LinkByName(record.spec->interface);
  if ((everything || gateway_back) && link != nullptr) {
    items.push_back(
        {link->ifindex, link->name, link->mac, options_.host.gateway, {}, false});
  }
  if ((everything || gateway6_back) && link != nullptr) {
    if (record.spec->has_ipv6()) {
      items.push_back({link->ifindex, link->name, link->mac, options_.host.gateway6,
                       options_.host.gateway6, true});
    }
  }
  if (items.empty()) return;
  {
    vmnet::MutexLock lock(&counters_mu_);
    counters_.announcements += items.size();
  }
  options_.announcer->Announce(std::move(items));
}

void Reconciler::Publish(VmEventType type, VmRecord& record, const std::string& detail) {
  desired_->IssueRevision(&record);
  observer_->Publish(type, record.View(), detail);
  changed_views_.insert(record.spec->vm_id);
}

void Reconciler::PublishOutcome(VmRecord& r, VmState old_state,
                                const std::string& old_message,
                                const std::vector<kernel::Write>& writes) {
  const std::string& vm_id = r.spec->vm_id;
  if (auto it = spec_changed_.find(vm_id); it != spec_changed_.end()) {
    std::string detail = it->second == VmEventType::kAdded ? "attached" : "spec changed";
    if (!writes.empty()) {
      absl::StrAppend(&detail, ": ", WritesSummary(writes));
      VMNET_LOG(Debug) << "event=vm_writes vm_id=" << vm_id << " writes=\""
                       << WritesText(writes) << "\"";
    }
    Publish(it->second, r, detail);
    spec_changed_.erase(it);
    return;
  }
  if (old_state == VmState::kProgrammed && r.state == VmState::kProgrammed &&
      !writes.empty()) {
    {
      vmnet::MutexLock lock(&counters_mu_);
      ++counters_.drift_repairs;
      for (const kernel::Write& w : writes) {
        ++counters_.objects_repaired[static_cast<int>(kernel::KindOf(w))];
      }
    }
    std::string detail = absl::StrCat("repaired: ", WritesText(writes));
    VMNET_LOG(Info) << "event=drift_repaired vm_id=" << vm_id << " detail=\"" << detail
                    << "\"";
    Publish(VmEventType::kDriftRepaired, r, detail);
    return;
  }
  if (initial_sync_) return;
  if (r.state != old_state || r.message != old_message) {
    std::string detail =
        absl::StrCat(VmStateName(old_state), " -> ", VmStateName(r.state));
    if (!r.message.empty()) absl::StrAppend(&detail, ": ", r.message.str());
    VMNET_LOG(Info) << "event=vm_state vm_id=" << vm_id
                    << " state=" << VmStateName(r.state);
    Publish(VmEventType::kChanged, r, detail);
  }
}

}  // namespace vmnet
