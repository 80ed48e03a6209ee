#include "vmnet/metrics/metrics.h"

#include <algorithm>
#include <limits>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "prometheus/client_metric.h"
#include "prometheus/metric_family.h"
#include "prometheus/metric_type.h"

namespace vmnet {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

void RequestStats::Record(const std::string& method, int code) {
  vmnet::MutexLock lock(&mu_);
  ++counts_[{method, code}];
}

std::map<std::pair<std::string, int>, uint64_t> RequestStats::Snapshot() const {
  vmnet::MutexLock lock(&mu_);
  return counts_;
}

namespace {

// gRPC's status codes have absl's numbers and names.
std::string GrpcCodeName(int code) {
  return absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
}

MetricFamily Family(std::string name, std::string help, MetricType type) {
  MetricFamily f;
  f.name = std::move(name);
  f.help = std::move(help);
  f.type = type;
  return f;
}

ClientMetric Sample(std::vector<ClientMetric::Label> labels, double value,
                    MetricType type) {
  ClientMetric m;
  m.label = std::move(labels);
  if (type == MetricType::Counter) {
    m.counter.value = value;
  } else {
    m.gauge.value = value;
  }
  return m;
}

}  // namespace

MetricsCollector::MetricsCollector(const Reconciler* reconciler, kernel::Kernel* kernel,
                                   const EventLog* events, const RequestStats* requests,
                                   std::string version)
    : reconciler_(reconciler),
      kernel_(kernel),
      events_(events),
      requests_(requests),
      version_(std::move(version)) {}

std::vector<MetricFamily> MetricsCollector::Collect() const {
  std::vector<MetricFamily> out;
  CollectVms(&out);
  CollectAgent(&out);
  return out;
}

// The bandwidth limits' shapers (vmnetd's tbf qdiscs, handle ed:): what
// they dropped and how often they held packets back, per VM and direction
// (the VM's view: "receive" is the VM link's own shaper, "transmit" its ifb
// device's). One qdisc dump per scrape.
void MetricsCollector::CollectBandwidth(
    const std::vector<VmView>& vms,
    const absl::flat_hash_map<int, std::string>& link_names,
    std::vector<MetricFamily>* out) const {
  // No limited VM, no qdisc dump (and no series).
  if (std::none_of(vms.begin(), vms.end(),
                   [](const VmView& vm) { return vm.spec->bandwidth.limited(); })) {
    return;
  }
  auto qdiscs = kernel_->DumpQdiscs();
  if (!qdiscs.ok()) return;
  absl::flat_hash_map<std::string, const kernel::Qdisc*> shaper_of_link;
  for (const kernel::Qdisc& q : *qdiscs) {
    if (q.parent != kernel::kRootParent || q.handle != kernel::kQdiscHandle) continue;
    if (auto it = link_names.find(q.ifindex); it != link_names.end()) {
      shaper_of_link.emplace(it->second, &q);
    }
  }
  MetricFamily dropped =
      Family("vmnet_vm_rate_limited_dropped_packets_total",
             "Packets the VM's bandwidth limit dropped (its shaper's queue was full), by "
             "direction from the VM's point of view: receive (towards the VM), transmit "
             "(from it).",
             MetricType::Counter);
  MetricFamily delayed = Family(
      "vmnet_vm_rate_limited_overlimits_total",
      "Times the VM's bandwidth limit held packets back (tbf overlimits), by direction "
      "from the VM's point of view.",
      MetricType::Counter);
  for (const VmView& vm : vms) {
    if (!vm.spec->bandwidth.limited()) continue;
    for (const auto& [direction, link] :
         {std::pair<const char*, std::string>{"receive", vm.spec->interface},
          {"transmit", kernel::IfbName(vm.spec->interface)}}) {
      auto it = shaper_of_link.find(link);
      if (it == shaper_of_link.end()) continue;
      std::vector<ClientMetric::Label> labels = {{"vm_id", vm.spec->vm_id},
                                                 {"interface", vm.spec->interface},
                                                 {"direction", direction}};
      dropped.metric.push_back(
          Sample(labels, static_cast<double>(it->second->drops), MetricType::Counter));
      delayed.metric.push_back(Sample(labels, static_cast<double>(it->second->overlimits),
                                      MetricType::Counter));
    }
  }
  out->push_back(std::move(dropped));
  out->push_back(std::move(delayed));
}

void MetricsCollector::CollectVms(std::vector<MetricFamily>* out) const {
  std::vector<VmView> vms = reconciler_->Vms();
  absl::flat_hash_map<std::string, kernel::LinkStats> stats;
  absl::flat_hash_map<int, std::string> link_names;
  // One dump for every managed link. If it fails, the traffic series are
  // left out of this scrape (they go stale) rather than reported as zero.
  if (auto links = kernel_->DumpLinks(); links.ok()) {
    for (kernel::Link& l : *links) {
      link_names.emplace(l.ifindex, l.name);
      stats.emplace(std::move(l.name), l.stats);
    }
  }
  CollectBandwidth(vms, link_names, out);

  struct Counter {
    const char* name;
    const char* help;
    uint64_t kernel::LinkStats::*field;  // the host link's field
  };
  // The VM's point of view: the host link's transmit is the VM's receive.
  static const Counter kCounters[] = {
      {"vmnet_vm_receive_bytes_total",
       "Bytes the VM received (transmitted by its host-side link).",
       &kernel::LinkStats::tx_bytes},
      {"vmnet_vm_transmit_bytes_total",
       "Bytes the VM transmitted (received by its host-side link).",
       &kernel::LinkStats::rx_bytes},
      {"vmnet_vm_receive_packets_total",
       "Packets the VM received (transmitted by its host-side link).",
       &kernel::LinkStats::tx_packets},
      {"vmnet_vm_transmit_packets_total",
       "Packets the VM transmitted (received by its host-side link).",
       &kernel::LinkStats::rx_packets},
      {"vmnet_vm_receive_errors_total",
       "Errors on the way to the VM (transmit errors of its host-side link).",
       &kernel::LinkStats::tx_errors},
      {"vmnet_vm_transmit_errors_total",
       "Errors on the way from the VM (receive errors of its host-side link).",
       &kernel::LinkStats::rx_errors},
      {"vmnet_vm_receive_dropped_total",
       "Packets to the VM dropped (transmit drops of its host-side link).",
       &kernel::LinkStats::tx_dropped},
      {"vmnet_vm_transmit_dropped_total",
       "Packets from the VM dropped (receive drops of its host-side link).",
       &kernel::LinkStats::rx_dropped},
  };
  for (const Counter& c : kCounters) {
    // A recreated link starts its counters from zero: Prometheus sees a
    // counter reset, as it should.
    MetricFamily f = Family(c.name, c.help, MetricType::Counter);
    f.metric.reserve(vms.size());  // grown by doubling, it would hold up to twice that
    for (const VmView& vm : vms) {
      auto it = stats.find(vm.spec->interface);
      if (it == stats.end()) continue;  // no link: no traffic series
      f.metric.push_back(
          Sample({{"vm_id", vm.spec->vm_id}, {"interface", vm.spec->interface}},
                 static_cast<double>(it->second.*(c.field)), MetricType::Counter));
    }
    out->push_back(std::move(f));
  }

  // Port security's drops, read from the kernel's counters in the same
  // scrape (the VM's view: packets the VM sent that the host dropped).
  if (auto drops = kernel_->ReadDropCounters(); drops.ok()) {
    absl::flat_hash_map<std::string, const VmView*> vm_of_link;
    for (const VmView& vm : vms) vm_of_link.emplace(vm.spec->interface, &vm);
    MetricFamily f = Family("vmnet_vm_dropped_packets_total",
                            "Packets from the VM that port security dropped, by reason: "
                            "spoofed_source (a source address not the VM's), "
                            "spoofed_arp_nd (ARP or neighbour discovery claiming "
                            "another's address, router advertisements, redirects), "
                            "to_host (to the host's own addresses, not allowed).",
                            MetricType::Counter);
    MetricFamily packet_rate =
        Family("vmnet_vm_packet_rate_limited_dropped_packets_total",
               "Packets from the VM that its packet-rate limit "
               "(bandwidth.egress_packets_per_second) dropped; only VMs with one.",
               MetricType::Counter);
    for (const kernel::DropCounter& d : *drops) {
      auto it = vm_of_link.find(d.ifname);
      if (it == vm_of_link.end()) continue;
      if (d.reason == kernel::DropReason::kEgressPacketRate) {
        packet_rate.metric.push_back(
            Sample({{"vm_id", it->second->spec->vm_id}, {"interface", d.ifname}},
                   static_cast<double>(d.packets), MetricType::Counter));
        continue;
      }
      f.metric.push_back(Sample({{"vm_id", it->second->spec->vm_id},
                                 {"interface", d.ifname},
                                 {"reason", kernel::DropReasonName(d.reason)}},
                                static_cast<double>(d.packets), MetricType::Counter));
    }
    out->push_back(std::move(f));
    out->push_back(std::move(packet_rate));
  }

  MetricFamily info =
      Family("vmnet_vm_info", "Attributes of each attached VM; the value is always 1.",
             MetricType::Gauge);
  MetricFamily state =
      Family("vmnet_vm_state",
             "1 for the VM's current state (pending, programmed, failed), 0 otherwise.",
             MetricType::Gauge);
  info.metric.reserve(vms.size());
  state.metric.reserve(3 * vms.size());
  for (const VmView& vm : vms) {
    info.metric.push_back(
        Sample({{"vm_id", vm.spec->vm_id},
                {"interface", vm.spec->interface},
                {"mac_address", vm.spec->mac ? vm.spec->mac->ToString() : ""}},
               1, MetricType::Gauge));
    for (VmState s : {VmState::kPending, VmState::kProgrammed, VmState::kFailed}) {
      state.metric.push_back(Sample({{"vm_id", vm.spec->vm_id},
                                     {"interface", vm.spec->interface},
                                     {"state", VmStateName(s)}},
                                    vm.state == s ? 1 : 0, MetricType::Gauge));
    }
  }
  out->push_back(std::move(info));
  out->push_back(std::move(state));

  MetricFamily by_state =
      Family("vmnet_vms", "Attached VMs by state.", MetricType::Gauge);
  for (VmState s : {VmState::kPending, VmState::kProgrammed, VmState::kFailed}) {
    size_t n = 0;
    for (const VmView& vm : vms) n += vm.state == s;
    by_state.metric.push_back(
        Sample({{"state", VmStateName(s)}}, static_cast<double>(n), MetricType::Gauge));
  }
  out->push_back(std::move(by_state));
}

void MetricsCollector::CollectAgent(std::vector<MetricFamily>* out) const {
  ReconcilerCounters c = reconciler_->counters();

  MetricFamily passes =
      Family("vmnet_reconcile_passes_total", "Reconcile passes that had work to do.",
             MetricType::Counter);
  passes.metric.push_back(
      Sample({}, static_cast<double>(c.reconcile_passes), MetricType::Counter));
  out->push_back(std::move(passes));

  MetricFamily duration =
      Family("vmnet_reconcile_duration_seconds",
             "Duration of reconcile passes (plan, kernel writes, bookkeeping).",
             MetricType::Histogram);
  ClientMetric h;
  uint64_t cumulative = 0;
  for (size_t b = 0; b < kReconcileBuckets.size(); ++b) {
    cumulative += c.reconcile_buckets[b];
    h.histogram.bucket.push_back({cumulative, kReconcileBuckets[b]});
  }
  h.histogram.bucket.push_back(
      {c.reconcile_passes, std::numeric_limits<double>::infinity()});
  h.histogram.sample_count = c.reconcile_passes;
  h.histogram.sample_sum = c.reconcile_seconds_sum;
  duration.metric.push_back(std::move(h));
  out->push_back(std::move(duration));

  MetricFamily writes =
      Family("vmnet_kernel_writes_total", "Kernel writes by object kind and result.",
             MetricType::Counter);
  MetricFamily repairs = Family("vmnet_drift_repairs_total",
                                "Objects changed by someone else and put back, by kind.",
                                MetricType::Counter);
  for (int k = 0; k < kernel::kObjectKinds; ++k) {
    const char* object = kernel::ObjectKindName(static_cast<kernel::ObjectKind>(k));
    writes.metric.push_back(Sample({{"object", object}, {"result", "ok"}},
                                   static_cast<double>(c.writes_ok[k]),
                                   MetricType::Counter));
    writes.metric.push_back(Sample({{"object", object}, {"result", "error"}},
                                   static_cast<double>(c.writes_failed[k]),
                                   MetricType::Counter));
    repairs.metric.push_back(Sample({{"object", object}},
                                    static_cast<double>(c.objects_repaired[k]),
                                    MetricType::Counter));
  }
  out->push_back(std::move(writes));
  out->push_back(std::move(repairs));

  MetricFamily overflows =
      Family("vmnet_netlink_overflows_total",
             "Kernel event socket overflows (events lost; each triggers a full resync).",
             MetricType::Counter);
  overflows.metric.push_back(
      Sample({}, static_cast<double>(c.event_overflows), MetricType::Counter));
  out->push_back(std::move(overflows));
  MetricFamily resyncs =
      Family("vmnet_full_resyncs_total",
             "Full re-reads of the kernel after the first sync.", MetricType::Counter);
  resyncs.metric.push_back(
      Sample({}, static_cast<double>(c.full_resyncs), MetricType::Counter));
  out->push_back(std::move(resyncs));

  MetricFamily requests =
      Family("vmnet_grpc_requests_total",
             "Finished gRPC requests by method and status code.", MetricType::Counter);
  for (const auto& [key, count] : requests_->Snapshot()) {
    requests.metric.push_back(
        Sample({{"method", key.first}, {"code", GrpcCodeName(key.second)}},
               static_cast<double>(count), MetricType::Counter));
  }
  out->push_back(std::move(requests));

  MetricFamily watchers =
      Family("vmnet_watchers", "Active Watch streams.", MetricType::Gauge);
  watchers.metric.push_back(
      Sample({}, static_cast<double>(events_->watcher_count()), MetricType::Gauge));
  out->push_back(std::move(watchers));

  MetricFamily build = Family("vmnet_build_info", "The agent's version; the value is 1.",
                              MetricType::Gauge);
  build.metric.push_back(Sample({{"version", version_}}, 1, MetricType::Gauge));
  out->push_back(std::move(build));
}

}  // namespace vmnet
