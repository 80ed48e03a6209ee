// vmnetd's configuration: the flags as given (RawFlags, whose member
// initializers are the flags' defaults) checked and turned into the options
// of each module (AgentConfig). No I/O: what needs the kernel (the default
// uplinks) is decided when the agent starts.
#pragma once

#include <chrono>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "vmnet/announce/announcer.h"
#include "vmnet/api/servers.h"
#include "vmnet/api/service.h"
#include "vmnet/log/log.h"
#include "vmnet/net/defaults.h"
#include "vmnet/reconciler/reconciler.h"

namespace vmnet {

// The value of each vmnetd flag, as given. The initializers are the flags'
// defaults (main.cc defines the flags from a default RawFlags).
struct RawFlags {
  std::string listen = "unix:///run/vmnetd/vmnetd.sock";
  std::string metrics_listen;
  std::string health_listen;
  std::string state_dir = "/var/lib/vmnetd";
  std::string uplinks;
  std::string gateway{kDefaultGateway};
  std::string gateway6{kDefaultGateway6};
  int announce_count = Announcer::Options{}.count;
  absl::Duration announce_interval = Announcer::Options{}.interval;
  bool dad = false;
  absl::Duration dad_timeout = Announcer::Options{}.dad_timeout;
  std::string interface_pattern{kDefaultInterfacePattern};
  bool port_security = true;
  std::string vm_to_host_allow;
  int route_protocol = kDefaultRouteProtocol;
  int proxy_check_interval_ms =
      static_cast<int>(ReconcilerOptions{}.proxy_check_interval.count());
  int full_resync_interval_s =
      static_cast<int>(std::chrono::duration_cast<std::chrono::seconds>(
                           ReconcilerOptions{}.full_resync_interval)
                           .count());
  int max_vms = static_cast<int>(ReconcilerOptions{}.max_vms);
  int max_addresses_per_vm = static_cast<int>(SpecRules{}.max_addresses);
  int max_watchers = static_cast<int>(ServiceOptions{}.max_watchers);
  int watch_queue = static_cast<int>(ServiceOptions{}.watch_queue);
  int watch_history = 65536;
  absl::Duration watch_send_interval = absl::Milliseconds(100);
  int max_request_bytes = ListenerConfig{}.max_request_bytes;
  int max_concurrent_streams = ListenerConfig{}.max_concurrent_streams;
  int max_pending_requests = static_cast<int>(ReconcilerOptions{}.max_pending_requests);
  std::string tls_cert;
  std::string tls_key;
  std::string tls_client_ca;
  std::string authz_policy;
  int tls_refresh_s = static_cast<int>(ListenerConfig{}.tls_refresh_seconds);
  bool insecure = false;
  std::string socket_group;
  int netlink_rcvbuf = 0;
  std::string log_level = "info";
};

// The checked configuration, in the modules' own option types.
struct AgentConfig {
  LogLevel log_level = LogLevel::kInfo;
  // host.uplinks is empty when --uplinks was not given: the agent then uses
  // the interfaces that carry the default routes. `announcer` is left null:
  // the agent sets it to the announcer it creates.
  ReconcilerOptions reconciler;
  // Set when the announcer is needed: announcements (--announce-count above
  // 0) or duplicate-address detection (--dad).
  std::optional<Announcer::Options> announcer;
  int netlink_rcvbuf = 0;  // 0: the kernel layer's default
  std::string state_dir;
  size_t watch_history = 0;
  std::chrono::milliseconds watch_send_interval{0};
  ServiceOptions service;
  ListenerConfig listeners;
  std::string listen;          // --listen as given, for the log
  std::string metrics_listen;  // empty: no /metrics endpoint

  // Checks every flag; INVALID_ARGUMENT naming the first bad one and what to
  // give instead.
  static absl::StatusOr<AgentConfig> FromFlags(const RawFlags& flags);
};

}  // namespace vmnet
