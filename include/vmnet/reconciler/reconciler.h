// The one component that owns the kernel. It holds the desired state (made
// durable before anything is acknowledged), keeps a model of the kernel from
// dumps and events, and drives the kernel toward the desired state on one
// thread: requests from the API are posted to that thread and answered from
// it.
//
// Thread safety: Attach, Detach, Vms, FindVm and ready() may be called from
// any thread. Everything else happens on the reconciler thread.
#pragma once

#include <sys/eventfd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "vmnet/announce/address_announcer.h"
#include "vmnet/base/mutex.h"
#include "vmnet/kernel/kernel.h"
#include "vmnet/reconciler/kernel_model.h"
#include "vmnet/reconciler/plan.h"
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
  // pending or failed), or with the error that refused the request.
  // `request_index` maps each (sorted) address of the spec to its index in
  // the request, for error messages; empty: the sorted order.
  void Attach(VmSpec spec, std::vector<size_t> request_index, bool validate_only,
              std::string request_id, AttachDone done);
  void Attach(VmSpec spec, bool validate_only, std::string request_id, AttachDone done) {
    Attach(std::move(spec), {}, validate_only, std::move(request_id), std::move(done));
  }
  void Detach(std::string vm_id, bool allow_missing, std::string request_id,
              DetachDone done);

  std::vector<VmView> Vms() const;
  std::optional<VmView> FindVm(const std::string& vm_id) const;
  // Which VM owns an address, or an interface; empty when none.
  std::string VmOfAddress(const IpAddress& address) const;
  std::string VmOfInterface(const std::string& interface) const;
  ReconcilerCounters counters() const;

 private:
  struct Command {
    // kProbeDone: a duplicate-address probe of spec.addresses finished.
    enum class Kind { kAttach, kDetach, kProbeDone } kind = Kind::kAttach;
    VmSpec spec;  // attach: the spec; detach: only vm_id
    std::vector<size_t> request_index;
    bool validate_only = false;
    bool allow_missing = false;
    std::string request_id;
    AttachDone attach_done;
    DetachDone detach_done;
    std::vector<AddressAnnouncer::Conflict> conflicts;  // kProbeDone
  };

  struct VmRecord {
    VmSpec spec;
    VmState state = VmState::kPending;
    std::string message;
    uint64_t revision = 0;
    // The backoff of the next retry after a failed write (retries_).
    std::chrono::milliseconds backoff{0};
    // --dad: the addresses no other machine answered for (sorted), whether
    // a probe is out, and why the VM failed it.
    std::vector<IpAddress> verified;
    bool probing = false;
    std::string dad_failure;
  };

  // A finished request, answered after the iteration's kernel writes.
  struct Reply {
    AttachDone attach_done;
    DetachDone detach_done;
    std::string vm_id;
    absl::Status status;
  };

  void Run();
  void Post(Command command);
  // Answers a command that will not be processed.
  static void Refuse(Command& command, const absl::Status& status);
  void Wake();

  // One pass of the loop: events, commands, reconcile, replies.
  void Iterate();
  void DrainKernelEvents();
  void CheckProxies();
  absl::Status FullResync(bool initial);
  void ProcessCommands(std::deque<Command> commands, std::vector<Reply>* replies);
  absl::Status CheckAgainstHost(const VmSpec& spec,
                                const std::vector<size_t>& request_index) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  absl::Status Persist() ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void ReconcileDirty();
  void MarkDirtyByAddress(const IpAddress& address) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MarkDirtyByEvent(const kernel::Event& event) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MarkAllDirty() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  VmView ViewOf(const VmRecord& record) const;
  void Publish(VmEventType type, VmRecord* record, const std::string& detail)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void PublishOutcome(const std::string& vm_id, VmState old_state,
                      const std::string& old_message, bool was_programmed,
                      const std::vector<kernel::Write>& writes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void UndoMutations() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SetRecord(const std::string& vm_id, std::optional<VmRecord> record)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::chrono::milliseconds NextWakeup() const;
  void ProbeDone(const std::string& vm_id, const std::vector<IpAddress>& probed,
                 const std::vector<AddressAnnouncer::Conflict>& conflicts)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // --dad: the part of the spec that may be published now, starting a
  // probe of the rest. Sets `pending` when something waits for a probe.
  VmSpec PublishableSpec(const std::string& vm_id, VmRecord& record, bool* pending)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Announce(const VmRecord& record, bool everything,
                const std::vector<kernel::Write>& done)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  kernel::Kernel* const kernel_;
  StateStore* const store_;
  VmObserver* const observer_;
  const ReconcilerOptions options_;

  int wake_fd_ = -1;
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> ready_{false};

  vmnet::Mutex queue_mu_;
  std::deque<Command> queue_ ABSL_GUARDED_BY(queue_mu_);

  // Written only by the reconciler thread (under mu_); read by API threads.
  mutable vmnet::Mutex mu_;
  absl::flat_hash_map<std::string, VmRecord> vms_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<IpAddress, std::string> vm_of_address_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, std::string> vm_of_interface_ ABSL_GUARDED_BY(mu_);
  ReconcilerCounters counters_ ABSL_GUARDED_BY(mu_);
  // VMs with an IPv6 address: the host's IPv6 settings are made for them.
  size_t ipv6_vms_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t revision_lease_ ABSL_GUARDED_BY(mu_) = 0;

  // Reconciler thread only.
  KernelModel model_;
  absl::flat_hash_set<std::string> dirty_;
  // Failed VMs by the time of their next attempt: each pass looks only at
  // the due ones, not at every VM.
  std::set<std::pair<std::chrono::steady_clock::time_point, std::string>> retries_;
  // Specs removed or replaced since the last reconcile: what they
  // installed must go. Keyed by vm_id; the oldest spec wins.
  absl::flat_hash_map<std::string, VmSpec> removed_;
  // VMs whose spec changed in this iteration, with the event to publish
  // once their kernel state is known.
  absl::flat_hash_map<std::string, VmEventType> spec_changed_;
  // What this iteration's commands changed, to undo if it cannot be made
  // durable.
  std::vector<std::pair<std::string, std::optional<VmRecord>>> undo_;
  bool sweep_orphans_ = false;
  bool initial_sync_ = false;
  bool resync_wanted_ = false;
  std::chrono::steady_clock::time_point next_proxy_check_{};
  std::chrono::steady_clock::time_point next_full_resync_{};
  std::chrono::steady_clock::time_point last_resync_{};
};

}  // namespace vmnet
