#include "vmnet/agent/agent.h"

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "vmnet/agent/memory.h"
#include "vmnet/announce/announcer.h"
#include "vmnet/api/servers.h"
#include "vmnet/events/event_log.h"
#include "vmnet/kernel/netlink_kernel.h"
#include "vmnet/log/log.h"
#include "vmnet/metrics/announcer_metrics.h"
#include "vmnet/metrics/metrics.h"
#include "vmnet/metrics/metrics_server.h"
#include "vmnet/reconciler/reconciler.h"
#include "vmnet/state/state_store.h"

namespace vmnet {
namespace {

// The interfaces that carry the host's IPv4 default routes.
absl::StatusOr<std::vector<std::string>> DefaultRouteLinks(kernel::Kernel& k) {
  auto snapshot = k.Dump(kernel::DumpSelection::Only(/*links=*/true, /*addresses=*/false,
                                                     /*routes=*/true, /*neighbors=*/false,
                                                     /*proxies=*/false));
  if (!snapshot.ok()) return snapshot.status();
  std::vector<std::string> out;
  for (const kernel::Route& r : snapshot->routes) {
    if (r.destination.length != 0 || r.ifindex == 0) continue;
    for (const kernel::Link& l : snapshot->links) {
      if (l.ifindex == r.ifindex &&
          std::find(out.begin(), out.end(), l.name) == out.end()) {
        out.push_back(l.name);
      }
    }
  }
  return out;
}

std::string EpochNow() {
  return absl::FormatTime("%Y%m%dT%H%M%E3SZ", absl::Now(), absl::UTCTimeZone());
}

}  // namespace

Agent::Agent(AgentConfig config) : config_(std::move(config)) {}

Agent::~Agent() { Stop(); }

absl::Status Agent::Start() {
  absl::Status status = [this]() -> absl::Status {
    // 1. The kernel.
    kernel::NetlinkKernel::Options netlink_options;
    netlink_options.event_rcvbuf = config_.netlink_rcvbuf;
    netlink_options.require_nftables = config_.reconciler.host.port_security.has_value();
    auto netlink = kernel::NetlinkKernel::Create(netlink_options);
    if (!netlink.ok()) return netlink.status();
    kernel_ = std::move(*netlink);
    {
      // Bandwidth limits: tbf towards the VM, and an ingress u32 match-all
      // filter redirecting to an ifb device with its own tbf from the VM.
      // That works on every kernel (tbf, ingress, u32, mirred, ifb); a
      // policer (police action, matchall) would drop instead of shaping and
      // is missing from some kernels, so it is not used even where present.
      // Packet-rate limits are nftables limit objects in port security's
      // ruleset (every kernel with nf_tables has them).
      kernel::TcCapabilities tc = kernel_->tc_capabilities();
      const bool port_security = config_.reconciler.host.port_security.has_value();
      config_.service.rules.port_security = port_security;
      VMNET_LOG(Info) << "event=traffic_control " << tc.ToString()
                      << " towards_vm=tbf from_vm=u32+mirred+ifb+tbf"
                      << " packet_rate_limits="
                      << (port_security ? "nftables" : "unavailable(port_security_off)");
    }
    ReconcilerOptions& options = config_.reconciler;
    if (options.host.uplinks.empty()) {
      auto links = DefaultRouteLinks(*kernel_);
      if (!links.ok()) return links.status();
      if (links->empty()) {
        return absl::InvalidArgumentError(
            "--uplinks: not given, and no default route names an interface; "
            "give the uplinks explicitly");
      }
      options.host.uplinks = *links;
    }

    // 2. The announcer.
    if (config_.announcer) {
      auto announcer = Announcer::Create(*config_.announcer);
      if (!announcer.ok()) return announcer.status();
      announcer_ = std::move(*announcer);
      options.announcer = announcer_.get();
    }

    // 3. The desired state, the event log, the reconciler.
    auto store = StateStore::Open(config_.state_dir);
    if (!store.ok()) return store.status();
    store_ = std::make_unique<StateStore>(std::move(*store));
    events_ = std::make_unique<EventLog>(EpochNow(), config_.watch_history, nullptr,
                                         config_.watch_send_interval);
    reconciler_ =
        std::make_unique<Reconciler>(kernel_.get(), store_.get(), events_.get(), options);

    // 4. The gRPC servers.
    request_stats_ = std::make_unique<RequestStats>();
    grpc::reflection::InitProtoReflectionServerBuilderPlugin();
    auto servers =
        ApiServers::Start(config_.listeners, reconciler_.get(), kernel_.get(),
                          events_.get(), request_stats_.get(), config_.service);
    if (!servers.ok()) return servers.status();
    servers_ = std::move(*servers);
    VMNET_LOG(Info) << "event=listening listen=" << config_.listen
                    << " health_listen=" << config_.listeners.health_address;

    // 5. Metrics and the memory trimmer. The metrics server holds collectables
    // by weak_ptr; ours live until Stop.
    collector_ = std::make_shared<MetricsCollector>(reconciler_.get(), kernel_.get(),
                                                    events_.get(), request_stats_.get(),
                                                    VMNET_VERSION);
    if (announcer_) {
      announcer_metrics_ = std::make_shared<AnnouncerMetrics>(
          [announcer = announcer_.get()] { return announcer->stats(); });
    }
    if (!config_.metrics_listen.empty()) {
      // Our own epoll server, not the Exposer: idle or slow clients cannot
      // hold a scrape up (metrics_server.h).
      std::vector<std::weak_ptr<prometheus::Collectable>> collectables = {collector_};
      if (announcer_metrics_) collectables.push_back(announcer_metrics_);
      auto server = MetricsServer::Start(config_.metrics_listen, std::move(collectables));
      if (!server.ok()) {
        return absl::UnavailableError(
            absl::StrCat("could not listen on --metrics-listen=", config_.metrics_listen,
                         ": ", server.status().message()));
      }
      metrics_server_ = std::move(*server);
    }
    // Returns what a scrape, a list snapshot or a storm's calls freed.
    trimmer_ = std::make_unique<MemoryTrimmer>();

    // 6. The first full sync, then the reconciler's thread.
    if (absl::Status s = reconciler_->Start(); !s.ok()) return s;
    VMNET_LOG(Info) << "event=synced vms=" << reconciler_->Vms().size()
                    << " uplinks=" << absl::StrJoin(options.host.uplinks, ",")
                    << " epoch=" << events_->epoch();
    return absl::OkStatus();
  }();
  if (!status.ok()) Stop();
  return status;
}

void Agent::Stop() {
  // 1-3. Draining, the Watch streams, the calls in flight.
  if (servers_) servers_->SetDraining();
  if (events_) events_->CloseAll();
  if (servers_) {
    servers_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(10));
  }
  // 4. No scrape after this.
  metrics_server_.reset();
  // 5. The reconciler's thread, the announcer's only caller.
  if (reconciler_) reconciler_->Stop();
  // 6. The announcer's probe answers call the reconciler back: it goes
  // before the reconciler does.
  announcer_.reset();
  // 7. What is left, users before what they use.
  trimmer_.reset();
  announcer_metrics_.reset();
  collector_.reset();
  servers_.reset();
  request_stats_.reset();
  reconciler_.reset();
  events_.reset();
  store_.reset();
  kernel_.reset();
}

}  // namespace vmnet
