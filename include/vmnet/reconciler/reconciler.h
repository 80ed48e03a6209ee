// The one component that owns the kernel. On one thread it loops:
//
//   read the kernel   events, proxy dumps, full re-reads -> KernelModel
//   take requests     attach/detach -> DesiredState, made durable as a batch
//   diff              plan.h: desired state x model -> kernel writes
//   apply             one batch of writes, many in flight; the model follows
//   publish           VM states, Watch events, announcements, the readers'
//                     VmDirectory, then the answers to the requests
//
// Requests from the API are posted to that thread and answered from it;
// readers (GetVm, ListVms, scrapes) read the VmDirectory and never wait for
// the thread, a disk write or the kernel.
//
// Thread safety: Attach, Detach, Vms, FindVm, VmOf*, counters() and ready()
// may be called from any thread. Everything else happens on the reconciler
// thread.
#pragma once

#include <sys/eventfd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <variant>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "vmnet/announce/address_announcer.h"
#include "vmnet/base/clock.h"
#include "vmnet/base/mutex.h"
#include "vmnet/kernel/kernel.h"
#include "vmnet/reconciler/dad_tracker.h"
#include "vmnet/reconciler/desired_state.h"
#include "vmnet/reconciler/kernel_model.h"
#include "vmnet/reconciler/plan.h"
#include "vmnet/reconciler/vm_directory.h"
#include "vmnet/state/state_store.h"
#include "vmnet/vm/vm.h"

namespace vmnet {

struct ReconcilerOptions {
  HostConfig host;
  // Announces VM addresses when they become reachable through this host;
  // null: no announcements (and no duplicate detection).
  AddressAnnouncer* announcer = nullptr;
  // Duplicate-address detection before an address is published (--dad).
  bool dad = false;
  SpecRules rules;
  // How often proxy entries are dumped to find their drift (they raise no
  // kernel events).
  std::chrono::milliseconds proxy_check_interval{500};
  // How often everything is re-dumped and compared, to catch what events
  // missed.
  std::chrono::milliseconds full_resync_interval{std::chrono::minutes(5)};
  size_t max_vms = 16384;
  // Requests queued for the reconciler thread at once; more are refused.
  size_t max_pending_requests = 10000;
  // Every deadline (retries, intervals) is read from this clock; tests
  // inject a fake one. Null: the real clock.
  Clock* clock = nullptr;
};

// Upper bounds (seconds) of the reconcile-duration histogram's buckets.
inline constexpr std::array<double, 14> kReconcileBuckets = {
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};

struct ReconcilerCounters {
  uint64_t kernel_writes = 0;
  uint64_t kernel_write_failures = 0;
  uint64_t full_resyncs = 0;
  uint64_t event_overflows = 0;
  uint64_t drift_repairs = 0;  // events: one per VM repaired
  uint64_t announcements = 0;  // items handed to the announcer
  uint64_t dad_conflicts = 0;  // addresses another machine answered for
  // By kernel::ObjectKind.
  std::array<uint64_t, kernel::kObjectKinds> writes_ok{};
  std::array<uint64_t, kernel::kObjectKinds> writes_failed{};
  std::array<uint64_t, kernel::kObjectKinds> objects_repaired{};
  // Passes that had work, and their duration.
  uint64_t reconcile_passes = 0;
  double reconcile_seconds_sum = 0;
  std::array<uint64_t, kReconcileBuckets.size()> reconcile_buckets{};  // not cumulative

  void RecordPass(double seconds);
};

class Reconciler {
 public:
  // `kernel`, `store` and `observer` must outlive the reconciler.
  Reconciler(kernel::Kernel* kernel, StateStore* store, VmObserver* observer,
             ReconcilerOptions options);
  ~Reconciler();

  // Loads the desired state, subscribes to kernel events (the kernel does
  // that when it is created), dumps the kernel, writes only the differences
  // and starts the reconciler thread. A damaged state file or an unreadable
  // kernel fails the start.
  absl::Status Start();
  // Stops the thread; requests still queued are answered UNAVAILABLE. The
  // kernel state is left as it is.
  void Stop();

  // True once the first full sync is done.
  bool ready() const { return ready_.load(); }

  using AttachDone = std::function<void(absl::StatusOr<VmView>)>;
  using DetachDone = std::function<void(absl::Status)>;
  // Records the spec durably, then programs the kernel; `done` runs on the
  // reconciler thread when the kernel holds the state (or the VM is
  // pending or failed), or with the error that refused the request. An
  // error about one address is an AddressError (vm_spec.h).
  void Attach(VmSpec spec, bool validate_only, std::string request_id, AttachDone done);
  void Detach(std::string vm_id, bool allow_missing, std::string request_id,
              DetachDone done);

  // The VMs as of the end of the last pass (the VmDirectory).
  std::vector<VmView> Vms() const { return directory_.All(); }
  std::optional<VmView> FindVm(const std::string& vm_id) const {
    return directory_.Find(vm_id);
  }
  // Which VM owns an address, or an interface; empty when none.
  std::string VmOfAddress(const IpAddress& address) const {
    return directory_.VmOfAddress(address);
  }
  std::string VmOfInterface(const std::string& interface) const {
    return directory_.VmOfInterface(interface);
  }
  ReconcilerCounters counters() const;

 private:
  struct AttachCommand {
    VmSpec spec;
    bool validate_only = false;
    std::string request_id;
    AttachDone done;
  };
  struct DetachCommand {
    std::string vm_id;
    bool allow_missing = false;
    std::string request_id;
    DetachDone done;
  };
  // A duplicate-address probe of `probed` ended (the announcer's thread
  // posts it).
  struct ProbeResult {
    std::string vm_id;
    std::vector<IpAddress> probed;
    std::vector<DadTracker::Conflict> conflicts;
  };
  // A proxy dump, read on the proxy thread; `generation` is the one the
  // check was started in (a full re-read since makes it stale).
  struct ProxyDump {
    uint64_t generation = 0;
    absl::StatusOr<KernelModel::ProxySet> proxies;
  };
  using Command = std::variant<AttachCommand, DetachCommand, ProbeResult, ProxyDump>;

  // A finished request, answered after the pass's kernel writes.
  struct Reply {
    AttachDone attach_done;
    DetachDone detach_done;
    std::string vm_id;
    absl::Status status;
  };

  // A dirty VM's plan, and where its writes sit in the pass's batch.
  struct PlannedVm {
    std::string vm_id;
    VmPlan plan;
    size_t first = 0, count = 0;
  };

  void Run();
  void Post(Command command);
  // Answers a command that will not be processed.
  static void Refuse(Command& command, const absl::Status& status);
  void Wake();
  Clock::TimePoint Now() const { return clock_->Now(); }

  // One pass of the loop.
  void Iterate();
  void WaitForWork();
  // Read the kernel.
  void DrainKernelEvents();
  // The periodic proxy check: adding or deleting a proxy entry raises no
  // kernel event, so the entries are dumped every proxy_check_interval. The
  // dump runs on the proxy thread (at 10,000 VMs it takes 10 to 20 ms, which
  // a route deleted meanwhile would otherwise wait for); the reconciler's
  // thread starts it and compares its result with the model.
  void StartProxyCheck();
  void ProxyDumpDone(ProxyDump& dump);
  void RunProxyDumps();
  void StopProxyDumps();
  // Reads again the settings of up to kLinkSettingsPerCheck VM links (round
  // robin over the IPv6 VMs): accept_ra raises no event.
  void CheckLinkSettings();
  absl::Status FullResync(bool initial);
  void MarkDirty(const KernelModel::Touched& touched);
  void MarkAllDirty();
  // Take requests.
  void TakeCommands(std::vector<Reply>* replies);
  absl::Status CheckAttach(const VmSpec& spec) const;
  void ProbeDone(const ProbeResult& result);
  // Diff, apply, publish.
  void Reconcile();
  std::vector<kernel::Write> PlanRemovals();
  std::vector<PlannedVm> PlanDirty(std::vector<kernel::Write>* writes);
  // Applies a batch, keeps the model and the counters; one status per write.
  std::vector<absl::Status> ApplyWrites(const std::vector<kernel::Write>& writes);
  void RecordOutcome(const PlannedVm& planned, const std::vector<kernel::Write>& writes,
                     const std::vector<absl::Status>& results);
  VmPlan PlanWithDad(const VmRecord& record);
  void Announce(const VmRecord& record, bool everything,
                const std::vector<kernel::Write>& done);
  void PublishOutcome(VmRecord& record, VmState old_state, const std::string& old_message,
                      const std::vector<kernel::Write>& writes);
  void Publish(VmEventType type, VmRecord& record, const std::string& detail);
  void Answer(std::vector<Reply>& replies);
  std::chrono::milliseconds NextWakeup() const;

  kernel::Kernel* const kernel_;
  StateStore* const store_;
  VmObserver* const observer_;
  const ReconcilerOptions options_;
  Clock* const clock_;

  int wake_fd_ = -1;
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> ready_{false};

  // The proxy thread: dumps the proxy entries when asked, and posts them.
  std::thread proxy_thread_;
  std::mutex proxy_mu_;
  std::condition_variable proxy_cv_;
  std::optional<uint64_t> proxy_wanted_;  // guarded by proxy_mu_: a generation
  bool proxy_stop_ = false;               // guarded by proxy_mu_

  vmnet::Mutex queue_mu_;
  std::deque<Command> queue_ ABSL_GUARDED_BY(queue_mu_);

  // What other threads read: the VMs after each pass, and the counters.
  VmDirectory directory_;
  mutable vmnet::Mutex counters_mu_;
  ReconcilerCounters counters_ ABSL_GUARDED_BY(counters_mu_);

  // Reconciler thread only.
  std::optional<DesiredState> desired_;
  DadTracker dad_;
  KernelModel model_;
  absl::flat_hash_set<std::string> dirty_;
  // VMs whose view changed in this pass: the directory gets them after it.
  absl::flat_hash_set<std::string> changed_views_;
  // Failed VMs by the time of their next attempt: each pass looks only at
  // the due ones, not at every VM.
  std::set<std::pair<Clock::TimePoint, std::string>> retries_;
  // Specs removed or replaced since the last reconcile: what they
  // installed must go. Keyed by vm_id; the oldest spec wins.
  absl::flat_hash_map<std::string, VmSpec> removed_;
  // VMs whose spec changed in this pass, with the event to publish once
  // their kernel state is known; and the VMs detached.
  absl::flat_hash_map<std::string, VmEventType> spec_changed_;
  std::vector<VmView> detached_;
  bool sweep_orphans_ = false;
  // An uplink came back up: every VM programmed in this pass is announced.
  bool announce_everything_ = false;
  bool initial_sync_ = false;
  bool resync_wanted_ = false;
  Clock::TimePoint next_proxy_check_{};
  // A proxy dump is being read; the addresses whose proxy entries this
  // thread wrote since it began (the dump may predate them); full re-reads
  // so far (a dump started before the last one is stale).
  bool proxy_check_running_ = false;
  absl::flat_hash_set<IpAddress> proxies_written_;
  uint64_t resync_generation_ = 0;
  // The VM links CheckLinkSettings has still to read in this round.
  std::vector<std::string> settings_round_;
  Clock::TimePoint next_full_resync_{};
  Clock::TimePoint last_resync_{};
};

}  // namespace vmnet
