// vmnetd: puts VMs on the network of a Linux host in host-routed mode, as a
// remote control plane asks over gRPC (vmnet.v1.VmNetwork).
//
// Start-up order: flags, the kernel (event subscription first), the
// desired state, the first full sync, then the gRPC listeners. Shutdown on
// SIGTERM/SIGINT: health NOT_SERVING, stop accepting RPCs and finish those
// in flight, end Watch streams, stop the reconciler. The kernel state is
// left in place, so VMs keep their network while the agent is down.
#include <signal.h>
#include <sys/stat.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "memory.h"
#include "prometheus/exposer.h"
#include "systemd/sd-daemon.h"
#include "vmnet/announce/announcer.h"
#include "vmnet/api/servers.h"
#include "vmnet/api/service.h"
#include "vmnet/events/event_log.h"
#include "vmnet/kernel/netlink_kernel.h"
#include "vmnet/log/log.h"
#include "vmnet/metrics/announcer_metrics.h"
#include "vmnet/metrics/metrics.h"
#include "vmnet/reconciler/reconciler.h"
#include "vmnet/state/state_store.h"

ABSL_FLAG(std::string, listen, "unix:///run/vmnetd/vmnetd.sock",
          "Comma-separated gRPC listen addresses: host:port (e.g. 127.0.0.1:50051, "
          "[::1]:50051) or unix:///path. A unix socket is created with mode 0660.");
ABSL_FLAG(std::string, metrics_listen, "",
          "host:port for the Prometheus /metrics endpoint (e.g. 127.0.0.1:9447). "
          "Empty: no metrics endpoint.");
ABSL_FLAG(std::string, health_listen, "",
          "host:port of a plaintext port that serves only grpc.health.v1.Health, for "
          "probes that cannot present a client certificate (Kubernetes). Empty: none.");
ABSL_FLAG(std::string, state_dir, "/var/lib/vmnetd",
          "Directory of the durable desired state (state.bin) and its lock. "
          "Requests are acknowledged only once the state is on disk here.");
ABSL_FLAG(std::string, uplinks, "",
          "Comma-separated host interfaces on which VM addresses are published "
          "with proxy ARP. Default: the interfaces that carry the default routes.");
ABSL_FLAG(std::string, gateway, "169.255.30.1",
          "The VMs' default gateway, answered by the host on each VM link as a /32 "
          "address.");
ABSL_FLAG(std::string, gateway6, "fe80::ffff:1:1",
          "The VMs' IPv6 default gateway: a link-local address the host answers on the "
          "link of each VM that has IPv6 addresses.");
ABSL_FLAG(int, announce_count, 3,
          "Times each announcement (gratuitous ARP, unsolicited neighbour advertisement) "
          "is sent when a VM's addresses become reachable through this host; 0: none.");
ABSL_FLAG(absl::Duration, announce_interval, absl::Seconds(1),
          "Time between the repeats of an announcement (e.g. 1s, 200ms).");
ABSL_FLAG(
    bool, dad, false,
    "Before publishing a VM address, ask on the uplinks whether another machine "
    "holds it (ARP probe, IPv6 duplicate address detection); if one answers, the VM "
    "fails naming the address and the MAC that answered. Off by default: during a "
    "live migration the old host still answers for the address.");
ABSL_FLAG(absl::Duration, dad_timeout, absl::Seconds(1),
          "How long --dad listens for an answer.");
ABSL_FLAG(std::string, interface_pattern, "vme[0-9a-f]{1,12}",
          "Regular expression (full match) of the host-side VM links the agent may "
          "manage. Links matching it are the agent's to configure while attached.");
ABSL_FLAG(int, route_protocol, 237,
          "The rtm_protocol number (1-255, not 0-4 or a well-known routing daemon's) "
          "that marks the routes, proxy entries, neighbour entries and addresses "
          "this agent installs. Objects without it are never touched.");
ABSL_FLAG(int, proxy_check_interval_ms, 500,
          "How often proxy ARP entries are dumped to repair their drift (the kernel "
          "raises no event for them), in milliseconds.");
ABSL_FLAG(int, full_resync_interval_s, 300,
          "How often the whole kernel state is re-read and repaired, in seconds.");
ABSL_FLAG(int, max_vms, 16384, "The most VMs this host may hold.");
ABSL_FLAG(int, max_addresses_per_vm, 64, "The most addresses one VM may have.");
ABSL_FLAG(int, max_watchers, 1024, "The most concurrent Watch streams.");
ABSL_FLAG(int, watch_queue, 4096,
          "Events queued per Watch stream; a watcher further behind is ended "
          "with RESOURCE_EXHAUSTED and may resume.");
ABSL_FLAG(int, watch_history, 65536, "Events retained for Watch resume.");
ABSL_FLAG(int, max_request_bytes, 1 << 20, "The largest gRPC request accepted.");
ABSL_FLAG(int, max_concurrent_streams, 100, "Concurrent calls per client connection.");
ABSL_FLAG(int, max_pending_requests, 10000,
          "Attach and detach requests queued for the reconciler at once; more are "
          "refused with RESOURCE_EXHAUSTED (a flood cannot grow memory without bound).");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain served on non-loopback --listen addresses. Rotated "
          "files are picked up without a restart.");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls-cert.");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle that client certificates must chain to; clients without a "
          "valid certificate are refused.");
ABSL_FLAG(std::string, authz_policy, "",
          "gRPC authorization policy (JSON: allow_rules, deny_rules; source.principals "
          "match the client certificate's URI SAN, then DNS SAN, then subject; "
          "request.paths like /vmnet.v1.VmNetwork/ListRoutes). Applies to TLS "
          "callers; reloaded when the file changes. Anything not allowed is "
          "PERMISSION_DENIED.");
ABSL_FLAG(int, tls_refresh_s, 10,
          "How often the TLS files and --authz-policy are checked for changes, in "
          "seconds.");
ABSL_FLAG(bool, insecure, false,
          "Allow plaintext on non-loopback --listen addresses. Never in production.");
ABSL_FLAG(std::string, socket_group, "",
          "Group that owns the unix sockets (mode 0660); empty: the agent's group.");
ABSL_FLAG(int, netlink_rcvbuf, 0,
          "Receive buffer of the kernel event socket in bytes; 0: 32 MiB. A buffer "
          "too small for a burst of events overflows, which the agent survives by "
          "re-reading the kernel (tests use a tiny one to prove it).");
ABSL_FLAG(std::string, log_level, "info", "debug, info, warning or error.");

namespace vmnet {
namespace {

int Fail(absl::string_view message) {
  VMNET_LOG(Error) << "event=start_failed error=\"" << message << "\"";
  return 1;
}

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

int Run() {
  TuneAllocator();
  LogLevel level;
  if (!ParseLogLevel(absl::GetFlag(FLAGS_log_level), &level)) {
    return Fail("--log-level: give debug, info, warning or error");
  }
  SetLogLevel(level);

  ReconcilerOptions options;
  auto gateway = IpAddress::Parse(absl::GetFlag(FLAGS_gateway));
  if (!gateway || !gateway->is_v4() || gateway->IsUnspecified() ||
      gateway->IsMulticast()) {
    return Fail("--gateway: give a unicast IPv4 address");
  }
  options.host.gateway = *gateway;
  auto gateway6 = IpAddress::Parse(absl::GetFlag(FLAGS_gateway6));
  if (!gateway6 || !gateway6->is_v6() || !gateway6->IsLinkLocal()) {
    return Fail("--gateway6: give an IPv6 link-local unicast address (fe80::/10)");
  }
  options.host.gateway6 = *gateway6;
  int protocol = absl::GetFlag(FLAGS_route_protocol);
  if (protocol <= 4 || protocol > 255) {
    return Fail("--route-protocol: give a number from 5 to 255 (0-4 are the kernel's)");
  }
  options.host.protocol = static_cast<uint8_t>(protocol);
  try {
    options.rules.interface_pattern = std::regex(absl::GetFlag(FLAGS_interface_pattern));
  } catch (const std::regex_error& e) {
    return Fail(
        absl::StrCat("--interface-pattern: not a regular expression: ", e.what()));
  }
  options.rules.gateway = *gateway;
  options.rules.gateway6 = *gateway6;
  options.rules.max_addresses =
      static_cast<size_t>(absl::GetFlag(FLAGS_max_addresses_per_vm));
  options.max_vms = static_cast<size_t>(absl::GetFlag(FLAGS_max_vms));
  options.proxy_check_interval =
      std::chrono::milliseconds(absl::GetFlag(FLAGS_proxy_check_interval_ms));
  options.full_resync_interval =
      std::chrono::seconds(absl::GetFlag(FLAGS_full_resync_interval_s));
  options.max_pending_requests =
      static_cast<size_t>(absl::GetFlag(FLAGS_max_pending_requests));

  // Subscribing to kernel events comes first: nothing between the dump and
  // the event stream is lost.
  kernel::NetlinkKernel::Options netlink_options;
  netlink_options.event_rcvbuf = absl::GetFlag(FLAGS_netlink_rcvbuf);
  auto netlink = kernel::NetlinkKernel::Create(netlink_options);
  if (!netlink.ok()) return Fail(netlink.status().message());

  for (absl::string_view name :
       absl::StrSplit(absl::GetFlag(FLAGS_uplinks), ',', absl::SkipWhitespace())) {
    options.host.uplinks.emplace_back(absl::StripAsciiWhitespace(name));
  }
  if (options.host.uplinks.empty()) {
    auto links = DefaultRouteLinks(**netlink);
    if (!links.ok()) return Fail(links.status().message());
    if (links->empty()) {
      return Fail(
          "--uplinks: not given, and no default route names an interface; "
          "give the uplinks explicitly");
    }
    options.host.uplinks = *links;
  }

  int announce_count = absl::GetFlag(FLAGS_announce_count);
  if (announce_count < 0 || announce_count > 100) {
    return Fail("--announce-count: give 0 (no announcements) to 100");
  }
  absl::Duration announce_interval = absl::GetFlag(FLAGS_announce_interval);
  if (announce_interval < absl::Milliseconds(10) ||
      announce_interval > absl::Minutes(1)) {
    return Fail("--announce-interval: give 10ms to 1m");
  }
  absl::Duration dad_timeout = absl::GetFlag(FLAGS_dad_timeout);
  if (dad_timeout < absl::Milliseconds(10) || dad_timeout > absl::Seconds(30)) {
    return Fail("--dad-timeout: give 10ms to 30s");
  }
  std::unique_ptr<Announcer> announcer;
  if (announce_count > 0 || absl::GetFlag(FLAGS_dad)) {
    // With --announce-count=0 the announcer is there only to probe.
    auto created = Announcer::Create({std::max(announce_count, 1), announce_interval,
                                      dad_timeout, /*announce=*/announce_count > 0});
    if (!created.ok()) return Fail(created.status().message());
    announcer = std::move(*created);
    options.announcer = announcer.get();
    options.dad = absl::GetFlag(FLAGS_dad);
  }

  auto store = StateStore::Open(absl::GetFlag(FLAGS_state_dir));
  if (!store.ok()) return Fail(store.status().message());

  EventLog events(EpochNow(), static_cast<size_t>(absl::GetFlag(FLAGS_watch_history)));
  ServiceOptions service_options;
  service_options.rules = options.rules;
  service_options.route_protocol = options.host.protocol;
  service_options.max_watchers = static_cast<size_t>(absl::GetFlag(FLAGS_max_watchers));
  service_options.watch_queue = static_cast<size_t>(absl::GetFlag(FLAGS_watch_queue));

  Reconciler reconciler(netlink->get(), &*store, &events, options);
  // On every way out, the announcer stops before the reconciler it calls
  // back goes away.
  absl::Cleanup stop_announcer = [&announcer] { announcer.reset(); };
  // Block the shutdown signals before any thread starts, so that only
  // sigwait below receives them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  RequestStats request_stats;
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  ListenerConfig listen;
  for (absl::string_view a :
       absl::StrSplit(absl::GetFlag(FLAGS_listen), ',', absl::SkipWhitespace())) {
    listen.addresses.emplace_back(absl::StripAsciiWhitespace(a));
  }
  listen.health_address = absl::GetFlag(FLAGS_health_listen);
  listen.tls_cert = absl::GetFlag(FLAGS_tls_cert);
  listen.tls_key = absl::GetFlag(FLAGS_tls_key);
  listen.tls_client_ca = absl::GetFlag(FLAGS_tls_client_ca);
  listen.authz_policy = absl::GetFlag(FLAGS_authz_policy);
  listen.insecure = absl::GetFlag(FLAGS_insecure);
  listen.socket_group = absl::GetFlag(FLAGS_socket_group);
  listen.max_request_bytes = absl::GetFlag(FLAGS_max_request_bytes);
  listen.max_concurrent_streams = absl::GetFlag(FLAGS_max_concurrent_streams);
  listen.tls_refresh_seconds =
      static_cast<unsigned>(std::max(1, absl::GetFlag(FLAGS_tls_refresh_s)));
  auto servers = ApiServers::Start(listen, &reconciler, netlink->get(), &events,
                                   &request_stats, service_options);
  if (!servers.ok()) return Fail(servers.status().message());
  VMNET_LOG(Info) << "event=listening listen=" << absl::GetFlag(FLAGS_listen)
                  << " health_listen=" << listen.health_address;

  // The Exposer holds collectables by weak_ptr: this one lives until exit.
  auto collector = std::make_shared<MetricsCollector>(
      &reconciler, netlink->get(), &events, &request_stats, VMNET_VERSION);
  std::shared_ptr<AnnouncerMetrics> announcer_metrics;
  if (announcer) {
    announcer_metrics = std::make_shared<AnnouncerMetrics>(
        [announcer = announcer.get()] { return announcer->stats(); });
  }
  std::unique_ptr<prometheus::Exposer> exposer;
  if (std::string a = absl::GetFlag(FLAGS_metrics_listen); !a.empty()) {
    try {
      exposer = std::make_unique<prometheus::Exposer>(a, /*num_threads=*/2);
    } catch (const std::exception& e) {
      return Fail(
          absl::StrCat("could not listen on --metrics-listen=", a, ": ", e.what()));
    }
    exposer->RegisterCollectable(collector);
    if (announcer) exposer->RegisterCollectable(announcer_metrics);
  }
  // Returns what a scrape, a list snapshot or a storm's calls freed.
  MemoryTrimmer trimmer;

  // Health says NOT_SERVING and mutations answer UNAVAILABLE until the
  // first full sync with the kernel is done.
  if (auto s = reconciler.Start(); !s.ok()) return Fail(s.message());
  VMNET_LOG(Info) << "event=synced vms=" << reconciler.Vms().size()
                  << " uplinks=" << absl::StrJoin(options.host.uplinks, ",")
                  << " epoch=" << events.epoch();
  // Without systemd (no NOTIFY_SOCKET) this does nothing.
  sd_notify(0, "READY=1");

  int signal = 0;
  sigwait(&signals, &signal);
  VMNET_LOG(Info) << "event=stopping signal=" << signal;
  sd_notify(0, "STOPPING=1");
  (*servers)->SetDraining();
  events.CloseAll();
  (*servers)->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(10));
  exposer.reset();
  std::move(stop_announcer).Invoke();
  reconciler.Stop();
  VMNET_LOG(Info) << "event=stopped";
  return 0;
}

}  // namespace
}  // namespace vmnet

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "the host-routed VM network agent.\n\n"
      "Serves vmnet.v1.VmNetwork over gRPC and drives the kernel through netlink so\n"
      "that each attached VM has its link up, a /32 route per address, a proxy ARP\n"
      "entry per address on every uplink and its gateway answered on its link\n"
      "(IPv6: a /128 route, a proxy NDP entry and a link-local gateway), and\n"
      "announces the addresses (gratuitous ARP, unsolicited NA) when they arrive.\n\n"
      "Usage: vmnetd --uplinks=eth0 [--listen=unix:///run/vmnetd/vmnetd.sock] [flags]\n"
      "Flags may be spelled with dashes or underscores (--state-dir, --state_dir).");
  absl::FlagsUsageConfig config;
  config.contains_helpshort_flags = [](absl::string_view f) {
    return absl::StrContains(f, "vmnetd/");
  };
  config.contains_help_flags = config.contains_helpshort_flags;
  absl::SetFlagsUsageConfig(config);
  // Flags are documented with dashes (--state-dir); absl spells them with
  // underscores. Accept both.
  std::vector<std::string> normalized(argv, argv + argc);
  std::vector<char*> args;
  for (std::string& arg : normalized) {
    if (absl::StartsWith(arg, "--")) {
      size_t end = std::min(arg.find('='), arg.size());
      std::replace(arg.begin() + 2, arg.begin() + static_cast<long>(end), '-', '_');
    }
    args.push_back(arg.data());
  }
  absl::ParseCommandLine(static_cast<int>(args.size()), args.data());
  return vmnet::Run();
}
