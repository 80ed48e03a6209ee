// Prometheus metrics, all computed at scrape time: a custom Collectable reads
// the per-VM link counters with one netlink link dump and the agent's
// counters from the reconciler. No polling thread, no timestamps. Collect()
// may run on several threads at once (overlapping scrapes).
//
// Exported:
//   vmnet_vm_{receive,transmit}_{bytes,packets,errors,dropped}_total{vm_id,interface}
//       from the VM's point of view: what the VM received is what its
//       host-side link transmitted.
//   vmnet_vm_dropped_packets_total{vm_id,interface,reason}: port security's drops
//   vmnet_vm_info{vm_id,interface,mac_address} 1
//   vmnet_vm_state{vm_id,interface,state} 1 for the current state, 0 otherwise
//   vmnet_vms{state}, vmnet_watchers, vmnet_build_info{version}
//   vmnet_reconcile_passes_total, vmnet_reconcile_duration_seconds (histogram)
//   vmnet_kernel_writes_total{object,result}, vmnet_drift_repairs_total{object}
//   vmnet_netlink_overflows_total, vmnet_full_resyncs_total
//   vmnet_grpc_requests_total{method,code}
#pragma once

#include <array>
#include <atomic>
#include <map>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "prometheus/collectable.h"
#include "vmnet/base/mutex.h"
#include "vmnet/events/event_log.h"
#include "vmnet/kernel/kernel.h"
#include "vmnet/reconciler/reconciler.h"

namespace vmnet {

// Counts finished gRPC requests by method and status code. Thread-safe; the
// key space is bounded (methods times the 17 codes).
class RequestStats {
 public:
  void Record(const std::string& method, int code);
  std::map<std::pair<std::string, int>, uint64_t> Snapshot() const;

 private:
  mutable vmnet::Mutex mu_;
  std::map<std::pair<std::string, int>, uint64_t> counts_ ABSL_GUARDED_BY(mu_);
};

class MetricsCollector : public prometheus::Collectable {
 public:
  // Everything must outlive the collector.
  MetricsCollector(const Reconciler* reconciler, kernel::Kernel* kernel,
                   const EventLog* events, const RequestStats* requests,
                   std::string version);

  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  void CollectVms(std::vector<prometheus::MetricFamily>* out) const;
  void CollectBandwidth(const std::vector<VmView>& vms,
                        const absl::flat_hash_map<int, std::string>& link_names,
                        std::vector<prometheus::MetricFamily>* out) const;
  void CollectAgent(std::vector<prometheus::MetricFamily>* out) const;

  const Reconciler* const reconciler_;
  kernel::Kernel* const kernel_;
  const EventLog* const events_;
  const RequestStats* const requests_;
  const std::string version_;
};

}  // namespace vmnet
