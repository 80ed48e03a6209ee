#include "vmnet/agent/agent_config.h"

#include <algorithm>
#include <regex>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace vmnet {
namespace {

// The non-empty items of a comma-separated list, trimmed.
std::vector<std::string> SplitList(absl::string_view list) {
  std::vector<std::string> out;
  for (absl::string_view item : absl::StrSplit(list, ',', absl::SkipWhitespace())) {
    out.emplace_back(absl::StripAsciiWhitespace(item));
  }
  return out;
}

// The allow set goes to the kernel in one message.
constexpr size_t kMaxVmToHostAllow = 256;

// "udp/53", "tcp/80".
std::optional<kernel::VmToHostPort> ParseVmToHostPort(absl::string_view text) {
  kernel::VmToHostPort port;
  if (absl::ConsumePrefix(&text, "tcp/")) {
    port.protocol = kernel::VmToHostPort::Protocol::kTcp;
  } else if (absl::ConsumePrefix(&text, "udp/")) {
    port.protocol = kernel::VmToHostPort::Protocol::kUdp;
  } else {
    return std::nullopt;
  }
  int number = 0;
  if (!absl::SimpleAtoi(text, &number) || number < 1 || number > 65535)
    return std::nullopt;
  port.port = static_cast<uint16_t>(number);
  return port;
}

}  // namespace

absl::StatusOr<AgentConfig> AgentConfig::FromFlags(const RawFlags& flags) {
  AgentConfig config;
  if (!ParseLogLevel(flags.log_level, &config.log_level)) {
    return absl::InvalidArgumentError("--log-level: give debug, info, warning or error");
  }

  ReconcilerOptions& options = config.reconciler;
  auto gateway = IpAddress::Parse(flags.gateway);
  if (!gateway || !gateway->is_v4() || gateway->IsUnspecified() ||
      gateway->IsMulticast()) {
    return absl::InvalidArgumentError("--gateway: give a unicast IPv4 address");
  }
  options.host.gateway = *gateway;
  auto gateway6 = IpAddress::Parse(flags.gateway6);
  if (!gateway6 || !gateway6->is_v6() || !gateway6->IsLinkLocal()) {
    return absl::InvalidArgumentError(
        "--gateway6: give an IPv6 link-local unicast address (fe80::/10)");
  }
  options.host.gateway6 = *gateway6;
  if (flags.route_protocol <= 4 || flags.route_protocol > 255) {
    return absl::InvalidArgumentError(
        "--route-protocol: give a number from 5 to 255 (0-4 are the kernel's)");
  }
  options.host.protocol = static_cast<uint8_t>(flags.route_protocol);
  try {
    options.rules.interface_pattern = std::regex(flags.interface_pattern);
  } catch (const std::regex_error& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("--interface-pattern: not a regular expression: ", e.what()));
  }
  options.rules.gateway = *gateway;
  options.rules.gateway6 = *gateway6;
  options.rules.max_addresses = static_cast<size_t>(flags.max_addresses_per_vm);
  options.max_vms = static_cast<size_t>(flags.max_vms);
  options.proxy_check_interval = std::chrono::milliseconds(flags.proxy_check_interval_ms);
  options.full_resync_interval = std::chrono::seconds(flags.full_resync_interval_s);
  options.max_pending_requests = static_cast<size_t>(flags.max_pending_requests);
  options.host.uplinks = SplitList(flags.uplinks);
  if (flags.port_security) {
    kernel::PortSecurityConfig port_security;
    for (const std::string& entry : SplitList(flags.vm_to_host_allow)) {
      auto port = ParseVmToHostPort(entry);
      if (!port) {
        return absl::InvalidArgumentError(
            absl::StrCat("--vm-to-host-allow: \"", entry,
                         "\" is not PROTOCOL/PORT; give e.g. udp/53,tcp/80 (tcp or udp, "
                         "port 1-65535)"));
      }
      port_security.vm_to_host_allow.push_back(*port);
    }
    if (port_security.vm_to_host_allow.size() > kMaxVmToHostAllow) {
      return absl::InvalidArgumentError(
          absl::StrCat("--vm-to-host-allow: ", port_security.vm_to_host_allow.size(),
                       " entries; give at most ", kMaxVmToHostAllow));
    }
    std::sort(port_security.vm_to_host_allow.begin(),
              port_security.vm_to_host_allow.end());
    port_security.vm_to_host_allow.erase(
        std::unique(port_security.vm_to_host_allow.begin(),
                    port_security.vm_to_host_allow.end()),
        port_security.vm_to_host_allow.end());
    options.host.port_security = std::move(port_security);
  } else if (!flags.vm_to_host_allow.empty()) {
    return absl::InvalidArgumentError(
        "--vm-to-host-allow: needs --port-security (without it VMs reach the host "
        "freely)");
  }

  if (flags.announce_count < 0 || flags.announce_count > 100) {
    return absl::InvalidArgumentError(
        "--announce-count: give 0 (no announcements) to 100");
  }
  if (flags.announce_interval < absl::Milliseconds(10) ||
      flags.announce_interval > absl::Minutes(1)) {
    return absl::InvalidArgumentError("--announce-interval: give 10ms to 1m");
  }
  if (flags.dad_timeout < absl::Milliseconds(10) ||
      flags.dad_timeout > absl::Seconds(30)) {
    return absl::InvalidArgumentError("--dad-timeout: give 10ms to 30s");
  }
  if (flags.announce_count > 0 || flags.dad) {
    // With --announce-count=0 the announcer is there only to probe.
    config.announcer = Announcer::Options{std::max(flags.announce_count, 1),
                                          flags.announce_interval, flags.dad_timeout,
                                          /*announce=*/flags.announce_count > 0};
    options.dad = flags.dad;
  }

  config.netlink_rcvbuf = flags.netlink_rcvbuf;
  config.state_dir = flags.state_dir;
  config.watch_history = static_cast<size_t>(flags.watch_history);
  if (flags.watch_send_interval < absl::ZeroDuration() ||
      flags.watch_send_interval > absl::Seconds(1)) {
    return absl::InvalidArgumentError("--watch-send-interval: give 0 to 1s");
  }
  config.watch_send_interval = absl::ToChronoMilliseconds(flags.watch_send_interval);

  config.service.rules = options.rules;
  config.service.route_protocol = options.host.protocol;
  config.service.max_watchers = static_cast<size_t>(flags.max_watchers);
  config.service.watch_queue = static_cast<size_t>(flags.watch_queue);

  ListenerConfig& listen = config.listeners;
  listen.addresses = SplitList(flags.listen);
  listen.health_address = flags.health_listen;
  listen.tls_cert = flags.tls_cert;
  listen.tls_key = flags.tls_key;
  listen.tls_client_ca = flags.tls_client_ca;
  listen.authz_policy = flags.authz_policy;
  listen.insecure = flags.insecure;
  listen.socket_group = flags.socket_group;
  listen.max_request_bytes = flags.max_request_bytes;
  listen.max_concurrent_streams = flags.max_concurrent_streams;
  listen.tls_refresh_seconds = static_cast<unsigned>(std::max(1, flags.tls_refresh_s));
  config.listen = flags.listen;
  config.metrics_listen = flags.metrics_listen;
  return config;
}

}  // namespace vmnet
