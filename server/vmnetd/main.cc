// vmnetd: puts VMs on the network of a Linux host in host-routed mode, as a
// remote control plane asks over gRPC (vmnet.v1.VmNetwork).
//
// main: the flags, checked into an AgentConfig (agent_config.h); the Agent
// (agent.h) starts the modules in its stated order; SIGTERM or SIGINT stops
// them in its stated order. The kernel state is left in place, so VMs keep
// their network while the agent is down.
#include <signal.h>

#include <algorithm>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/time/time.h"
#include "systemd/sd-daemon.h"
#include "vmnet/agent/agent.h"
#include "vmnet/agent/agent_config.h"
#include "vmnet/agent/memory.h"
#include "vmnet/base/lock_graph.h"
#include "vmnet/log/log.h"

namespace {
// The flags' defaults: RawFlags's initializers.
const vmnet::RawFlags& Defaults() {
  static const vmnet::RawFlags defaults;
  return defaults;
}
}  // namespace

ABSL_FLAG(std::string, listen, Defaults().listen,
          "Comma-separated gRPC listen addresses: host:port (e.g. 127.0.0.1:50051, "
          "[::1]:50051) or unix:///path. A unix socket is created with mode 0660.");
ABSL_FLAG(std::string, metrics_listen, Defaults().metrics_listen,
          "host:port for the Prometheus /metrics endpoint (e.g. 127.0.0.1:9447). "
          "Empty: no metrics endpoint.");
ABSL_FLAG(std::string, health_listen, Defaults().health_listen,
          "host:port of a plaintext port that serves only grpc.health.v1.Health, for "
          "probes that cannot present a client certificate (Kubernetes). Empty: none.");
ABSL_FLAG(std::string, state_dir, Defaults().state_dir,
          "Directory of the durable desired state (state.bin and its journal, "
          "journal.bin) and its lock. "
          "Requests are acknowledged only once the state is on disk here.");
ABSL_FLAG(std::string, uplinks, Defaults().uplinks,
          "Comma-separated host interfaces on which VM addresses are published "
          "with proxy ARP. Default: the interfaces that carry the default routes.");
ABSL_FLAG(std::string, gateway, Defaults().gateway,
          "The VMs' default gateway, answered by the host on each VM link as a /32 "
          "address.");
ABSL_FLAG(std::string, gateway6, Defaults().gateway6,
          "The VMs' IPv6 default gateway: a link-local address the host answers on the "
          "link of each VM that has IPv6 addresses.");
ABSL_FLAG(int, announce_count, Defaults().announce_count,
          "Times each announcement (gratuitous ARP, unsolicited neighbour advertisement) "
          "is sent when a VM's addresses become reachable through this host; 0: none.");
ABSL_FLAG(absl::Duration, announce_interval, Defaults().announce_interval,
          "Time between the repeats of an announcement (e.g. 1s, 200ms).");
ABSL_FLAG(
    bool, dad, Defaults().dad,
    "Before publishing a VM address, ask on the uplinks whether another machine "
    "holds it (ARP probe, IPv6 duplicate address detection); if one answers, the VM "
    "fails naming the address and the MAC that answered. Off by default: during a "
    "live migration the old host still answers for the address.");
ABSL_FLAG(absl::Duration, dad_timeout, Defaults().dad_timeout,
          "How long --dad listens for an answer.");
ABSL_FLAG(
    bool, port_security, Defaults().port_security,
    "Port security: a VM sends only from its own addresses and its "
    "allowed_source_prefixes, claims only its own addresses in ARP and neighbour "
    "discovery, sends no router advertisement or redirect, and reaches the host "
    "itself only with ICMP echo/errors, neighbour discovery and --vm-to-host-allow. "
    "Enforced in nftables tables of vmnetd's own (inet vmnet, arp vmnet), which "
    "also hold the VMs' packet-rate limits (bandwidth.egress_packets_per_second). "
    "--port-security=false removes them, and packet-rate limits are then refused.");
ABSL_FLAG(std::string, vm_to_host_allow, Defaults().vm_to_host_allow,
          "Comma-separated PROTOCOL/PORT a VM may reach on the host's own addresses "
          "(e.g. udp/53,tcp/80 for a DNS or metadata service); tcp or udp.");
ABSL_FLAG(std::string, interface_pattern, Defaults().interface_pattern,
          "Regular expression (full match) of the host-side VM links the agent may "
          "manage. Links matching it are the agent's to configure while attached.");
ABSL_FLAG(int, route_protocol, Defaults().route_protocol,
          "The rtm_protocol number (1-255, not 0-4 or a well-known routing daemon's) "
          "that marks the routes, proxy entries, neighbour entries and addresses "
          "this agent installs. Objects without it are never touched.");
ABSL_FLAG(int, proxy_check_interval_ms, Defaults().proxy_check_interval_ms,
          "How often proxy ARP entries are dumped to repair their drift (the kernel "
          "raises no event for them), in milliseconds.");
ABSL_FLAG(int, full_resync_interval_s, Defaults().full_resync_interval_s,
          "How often the whole kernel state is re-read and repaired, in seconds.");
ABSL_FLAG(int, max_vms, Defaults().max_vms, "The most VMs this host may hold.");
ABSL_FLAG(int, max_addresses_per_vm, Defaults().max_addresses_per_vm,
          "The most addresses one VM may have.");
ABSL_FLAG(int, max_watchers, Defaults().max_watchers,
          "The most concurrent Watch streams.");
ABSL_FLAG(int, watch_queue, Defaults().watch_queue,
          "Events queued per Watch stream; a watcher further behind is ended "
          "with RESOURCE_EXHAUSTED and may resume (one with nothing queued always "
          "takes the events of one reconcile pass).");
ABSL_FLAG(int, watch_history, Defaults().watch_history,
          "Events retained for Watch resume.");
ABSL_FLAG(absl::Duration, watch_send_interval, Defaults().watch_send_interval,
          "Watch writes start at most once per this time (0 to 1s; 0: after every "
          "reconcile pass): in a burst of changes, the passes that end within it go "
          "to each watcher as one message. The first change after a quiet interval "
          "is sent at once.");
ABSL_FLAG(int, max_request_bytes, Defaults().max_request_bytes,
          "The largest gRPC request accepted.");
ABSL_FLAG(
    int, max_concurrent_streams, Defaults().max_concurrent_streams,
    "Concurrent calls per client connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS); "
    "a gRPC client holds further calls on that connection until one ends.");
ABSL_FLAG(int, max_pending_requests, Defaults().max_pending_requests,
          "Attach and detach requests queued for the reconciler at once; more are "
          "refused with RESOURCE_EXHAUSTED (a flood cannot grow memory without bound).");
ABSL_FLAG(std::string, tls_cert, Defaults().tls_cert,
          "PEM certificate chain served on non-loopback --listen addresses. Rotated "
          "files are picked up without a restart.");
ABSL_FLAG(std::string, tls_key, Defaults().tls_key, "PEM private key of --tls-cert.");
ABSL_FLAG(std::string, tls_client_ca, Defaults().tls_client_ca,
          "PEM CA bundle that client certificates must chain to; clients without a "
          "valid certificate are refused.");
ABSL_FLAG(std::string, authz_policy, Defaults().authz_policy,
          "gRPC authorization policy (JSON: allow_rules, deny_rules; source.principals "
          "match the client certificate's URI SAN, then DNS SAN, then subject; "
          "request.paths like /vmnet.v1.VmNetwork/ListRoutes). Applies to TLS "
          "callers; reloaded when the file changes. Anything not allowed is "
          "PERMISSION_DENIED.");
ABSL_FLAG(int, tls_refresh_s, Defaults().tls_refresh_s,
          "How often the TLS files and --authz-policy are checked for changes, in "
          "seconds.");
ABSL_FLAG(bool, insecure, Defaults().insecure,
          "Allow plaintext on non-loopback --listen addresses. Never in production.");
ABSL_FLAG(std::string, socket_group, Defaults().socket_group,
          "Group that owns the unix sockets (mode 0660); empty: the agent's group.");
ABSL_FLAG(int, netlink_rcvbuf, Defaults().netlink_rcvbuf,
          "Receive buffer of the kernel event socket in bytes; 0: 32 MiB. A buffer "
          "too small for a burst of events overflows, which the agent survives by "
          "re-reading the kernel (tests use a tiny one to prove it).");
ABSL_FLAG(std::string, log_level, Defaults().log_level, "debug, info, warning or error.");

namespace vmnet {
namespace {

RawFlags ReadFlags() {
  RawFlags f;
  f.listen = absl::GetFlag(FLAGS_listen);
  f.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  f.health_listen = absl::GetFlag(FLAGS_health_listen);
  f.state_dir = absl::GetFlag(FLAGS_state_dir);
  f.uplinks = absl::GetFlag(FLAGS_uplinks);
  f.gateway = absl::GetFlag(FLAGS_gateway);
  f.gateway6 = absl::GetFlag(FLAGS_gateway6);
  f.announce_count = absl::GetFlag(FLAGS_announce_count);
  f.announce_interval = absl::GetFlag(FLAGS_announce_interval);
  f.dad = absl::GetFlag(FLAGS_dad);
  f.dad_timeout = absl::GetFlag(FLAGS_dad_timeout);
  f.port_security = absl::GetFlag(FLAGS_port_security);
  f.vm_to_host_allow = absl::GetFlag(FLAGS_vm_to_host_allow);
  f.interface_pattern = absl::GetFlag(FLAGS_interface_pattern);
  f.route_protocol = absl::GetFlag(FLAGS_route_protocol);
  f.proxy_check_interval_ms = absl::GetFlag(FLAGS_proxy_check_interval_ms);
  f.full_resync_interval_s = absl::GetFlag(FLAGS_full_resync_interval_s);
  f.max_vms = absl::GetFlag(FLAGS_max_vms);
  f.max_addresses_per_vm = absl::GetFlag(FLAGS_max_addresses_per_vm);
  f.max_watchers = absl::GetFlag(FLAGS_max_watchers);
  f.watch_queue = absl::GetFlag(FLAGS_watch_queue);
  f.watch_history = absl::GetFlag(FLAGS_watch_history);
  f.watch_send_interval = absl::GetFlag(FLAGS_watch_send_interval);
  f.max_request_bytes = absl::GetFlag(FLAGS_max_request_bytes);
  f.max_concurrent_streams = absl::GetFlag(FLAGS_max_concurrent_streams);
  f.max_pending_requests = absl::GetFlag(FLAGS_max_pending_requests);
  f.tls_cert = absl::GetFlag(FLAGS_tls_cert);
  f.tls_key = absl::GetFlag(FLAGS_tls_key);
  f.tls_client_ca = absl::GetFlag(FLAGS_tls_client_ca);
  f.authz_policy = absl::GetFlag(FLAGS_authz_policy);
  f.tls_refresh_s = absl::GetFlag(FLAGS_tls_refresh_s);
  f.insecure = absl::GetFlag(FLAGS_insecure);
  f.socket_group = absl::GetFlag(FLAGS_socket_group);
  f.netlink_rcvbuf = absl::GetFlag(FLAGS_netlink_rcvbuf);
  f.log_level = absl::GetFlag(FLAGS_log_level);
  return f;
}

int Fail(absl::string_view message) {
  VMNET_LOG(Error) << "event=start_failed error=\"" << message << "\"";
  return 1;
}

int Run() {
  TuneAllocator();
  SkipAbslLockGraph();
  absl::StatusOr<AgentConfig> config = AgentConfig::FromFlags(ReadFlags());
  if (!config.ok()) return Fail(config.status().message());
  SetLogLevel(config->log_level);

  // Block the shutdown signals before any thread starts, so that only
  // sigwait below receives them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  Agent agent(*std::move(config));
  if (absl::Status s = agent.Start(); !s.ok()) return Fail(s.message());
  // Without systemd (no NOTIFY_SOCKET) this does nothing.
  sd_notify(0, "READY=1");

  int signal = 0;
  sigwait(&signals, &signal);
  VMNET_LOG(Info) << "event=stopping signal=" << signal;
  sd_notify(0, "STOPPING=1");
  agent.Stop();
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
