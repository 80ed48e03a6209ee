#include "vmnet/agent/agent_config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "vmnet/net/defaults.h"

namespace vmnet {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

IpAddress Ip(const char* s) { return *IpAddress::Parse(s); }

// The message FromFlags refuses `flags` with; empty when it accepts them.
std::string Refusal(const RawFlags& flags) {
  absl::StatusOr<AgentConfig> config = AgentConfig::FromFlags(flags);
  if (config.ok()) return "";
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument)
      << config.status();
  return std::string(config.status().message());
}

TEST(AgentConfigTest, DefaultsAreAccepted) {
  absl::StatusOr<AgentConfig> config = AgentConfig::FromFlags(RawFlags{});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->log_level, LogLevel::kInfo);
  const ReconcilerOptions& r = config->reconciler;
  EXPECT_EQ(r.host.gateway, Ip("169.255.30.1"));
  EXPECT_EQ(r.host.gateway6, Ip("fe80::ffff:1:1"));
  EXPECT_EQ(r.host.protocol, 237);
  EXPECT_EQ(r.rules.gateway, Ip("169.255.30.1"));
  EXPECT_EQ(r.rules.gateway6, Ip("fe80::ffff:1:1"));
  EXPECT_TRUE(std::regex_match("vme1a", r.rules.interface_pattern));
  EXPECT_FALSE(std::regex_match("eth0", r.rules.interface_pattern));
  EXPECT_EQ(r.rules.max_addresses, 64u);
  EXPECT_EQ(r.max_vms, 16384u);
  EXPECT_EQ(r.max_pending_requests, 10000u);
  EXPECT_EQ(r.proxy_check_interval, std::chrono::milliseconds(500));
  EXPECT_EQ(r.full_resync_interval, std::chrono::seconds(300));
  EXPECT_THAT(r.host.uplinks, IsEmpty()) << "found from the default routes at start";
  EXPECT_EQ(r.announcer, nullptr);
  EXPECT_FALSE(r.dad);
  ASSERT_TRUE(config->announcer.has_value());
  EXPECT_EQ(config->announcer->count, 3);
  EXPECT_EQ(config->announcer->interval, absl::Seconds(1));
  EXPECT_EQ(config->announcer->dad_timeout, absl::Seconds(1));
  EXPECT_TRUE(config->announcer->announce);
  EXPECT_EQ(config->netlink_rcvbuf, 0);
  EXPECT_EQ(config->state_dir, "/var/lib/vmnetd");
  EXPECT_EQ(config->watch_history, 65536u);
  EXPECT_EQ(config->watch_send_interval, std::chrono::milliseconds(100));
  EXPECT_EQ(config->service.route_protocol, 237);
  EXPECT_EQ(config->service.max_watchers, 1024u);
  EXPECT_EQ(config->service.watch_queue, 4096u);
  EXPECT_EQ(config->service.rules.gateway, Ip("169.255.30.1"));
  EXPECT_THAT(config->listeners.addresses, ElementsAre("unix:///run/vmnetd/vmnetd.sock"));
  EXPECT_EQ(config->listeners.health_address, "");
  EXPECT_FALSE(config->listeners.insecure);
  EXPECT_EQ(config->listeners.max_request_bytes, 1 << 20);
  EXPECT_EQ(config->listeners.max_concurrent_streams, 100);
  EXPECT_EQ(config->listeners.tls_refresh_seconds, 10u);
  EXPECT_EQ(config->listen, "unix:///run/vmnetd/vmnetd.sock");
  EXPECT_EQ(config->metrics_listen, "");
}

TEST(AgentConfigTest, TheModulesDefaultsAreTheFlagsDefaults) {
  EXPECT_EQ(HostConfig{}.gateway, *IpAddress::Parse(kDefaultGateway));
  EXPECT_EQ(HostConfig{}.gateway6, *IpAddress::Parse(kDefaultGateway6));
  EXPECT_EQ(HostConfig{}.protocol, kDefaultRouteProtocol);
  EXPECT_EQ(SpecRules{}.gateway, HostConfig{}.gateway);
  EXPECT_EQ(SpecRules{}.gateway6, HostConfig{}.gateway6);
  EXPECT_EQ(ServiceOptions{}.route_protocol, kDefaultRouteProtocol);
  EXPECT_EQ(RawFlags{}.gateway, kDefaultGateway);
  EXPECT_EQ(RawFlags{}.gateway6, kDefaultGateway6);
  EXPECT_EQ(RawFlags{}.route_protocol, kDefaultRouteProtocol);
}

TEST(AgentConfigTest, ListsAreSplitOnCommasAndTrimmed) {
  RawFlags flags;
  flags.uplinks = " eth0, eth1 ,,";
  flags.listen = "unix:///tmp/a.sock, 127.0.0.1:50051";
  flags.tls_refresh_s = 0;
  absl::StatusOr<AgentConfig> config = AgentConfig::FromFlags(flags);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_THAT(config->reconciler.host.uplinks, ElementsAre("eth0", "eth1"));
  EXPECT_THAT(config->listeners.addresses,
              ElementsAre("unix:///tmp/a.sock", "127.0.0.1:50051"));
  EXPECT_EQ(config->listen, "unix:///tmp/a.sock, 127.0.0.1:50051")
      << "as given, for logs";
  EXPECT_EQ(config->listeners.tls_refresh_seconds, 1u) << "at least one second";
}

TEST(AgentConfigTest, TheAnnouncerIsThereForAnnouncementsOrDad) {
  RawFlags flags;
  flags.announce_count = 0;
  absl::StatusOr<AgentConfig> config = AgentConfig::FromFlags(flags);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_FALSE(config->announcer.has_value());
  EXPECT_FALSE(config->reconciler.dad);

  flags.dad = true;
  flags.dad_timeout = absl::Milliseconds(250);
  config = AgentConfig::FromFlags(flags);
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_TRUE(config->announcer.has_value());
  EXPECT_FALSE(config->announcer->announce) << "only probes";
  EXPECT_EQ(config->announcer->count, 1);
  EXPECT_EQ(config->announcer->dad_timeout, absl::Milliseconds(250));
  EXPECT_TRUE(config->reconciler.dad);
}

TEST(AgentConfigTest, RefusesABadLogLevel) {
  RawFlags flags;
  flags.log_level = "verbose";
  EXPECT_EQ(Refusal(flags), "--log-level: give debug, info, warning or error");
  flags.log_level = "debug";
  EXPECT_EQ(Refusal(flags), "");
}

TEST(AgentConfigTest, RefusesAGatewayThatIsNotUnicastIpv4) {
  for (const char* bad : {"", "gateway", "fe80::1", "0.0.0.0", "224.0.0.1"}) {
    RawFlags flags;
    flags.gateway = bad;
    EXPECT_EQ(Refusal(flags), "--gateway: give a unicast IPv4 address") << bad;
  }
}

TEST(AgentConfigTest, RefusesAGateway6ThatIsNotLinkLocal) {
  for (const char* bad : {"", "169.255.30.1", "2001:db8::1", "::"}) {
    RawFlags flags;
    flags.gateway6 = bad;
    EXPECT_EQ(Refusal(flags),
              "--gateway6: give an IPv6 link-local unicast address (fe80::/10)")
        << bad;
  }
}

TEST(AgentConfigTest, RefusesARouteProtocolOutside5To255) {
  for (int bad : {-1, 0, 4, 256}) {
    RawFlags flags;
    flags.route_protocol = bad;
    EXPECT_EQ(Refusal(flags),
              "--route-protocol: give a number from 5 to 255 (0-4 are the kernel's)")
        << bad;
  }
  RawFlags flags;
  flags.route_protocol = 5;
  EXPECT_EQ(Refusal(flags), "");
  flags.route_protocol = 255;
  EXPECT_EQ(Refusal(flags), "");
}

TEST(AgentConfigTest, RefusesAnInterfacePatternThatIsNotARegularExpression) {
  RawFlags flags;
  flags.interface_pattern = "vme[0-9";
  EXPECT_THAT(Refusal(flags),
              HasSubstr("--interface-pattern: not a regular expression: "));
}

TEST(AgentConfigTest, RefusesAnAnnounceCountOutside0To100) {
  for (int bad : {-1, 101}) {
    RawFlags flags;
    flags.announce_count = bad;
    EXPECT_EQ(Refusal(flags), "--announce-count: give 0 (no announcements) to 100")
        << bad;
  }
  RawFlags flags;
  flags.announce_count = 100;
  EXPECT_EQ(Refusal(flags), "");
}

TEST(AgentConfigTest, RefusesAnAnnounceIntervalOutside10msTo1m) {
  for (absl::Duration bad : {absl::ZeroDuration(), absl::Milliseconds(9),
                             absl::Minutes(1) + absl::Seconds(1)}) {
    RawFlags flags;
    flags.announce_interval = bad;
    EXPECT_EQ(Refusal(flags), "--announce-interval: give 10ms to 1m") << bad;
  }
  RawFlags flags;
  flags.announce_interval = absl::Milliseconds(10);
  EXPECT_EQ(Refusal(flags), "");
  flags.announce_interval = absl::Minutes(1);
  EXPECT_EQ(Refusal(flags), "");
}

TEST(AgentConfigTest, RefusesAWatchSendIntervalOutside0To1s) {
  for (absl::Duration bad : {absl::Milliseconds(-1), absl::Milliseconds(1001)}) {
    RawFlags flags;
    flags.watch_send_interval = bad;
    EXPECT_EQ(Refusal(flags), "--watch-send-interval: give 0 to 1s") << bad;
  }
  RawFlags flags;
  flags.watch_send_interval = absl::ZeroDuration();
  auto config = AgentConfig::FromFlags(flags);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->watch_send_interval, std::chrono::milliseconds(0));
  flags.watch_send_interval = absl::Seconds(1);
  EXPECT_EQ(Refusal(flags), "");
}

TEST(AgentConfigTest, RefusesADadTimeoutOutside10msTo30s) {
  for (absl::Duration bad : {absl::Milliseconds(9), absl::Seconds(31)}) {
    RawFlags flags;
    flags.dad_timeout = bad;
    EXPECT_EQ(Refusal(flags), "--dad-timeout: give 10ms to 30s") << bad;
  }
  RawFlags flags;
  flags.dad_timeout = absl::Seconds(30);
  EXPECT_EQ(Refusal(flags), "");
}

// Checked even when the announcer is not needed, as before.
TEST(AgentConfigTest, RefusesBadAnnouncerTimesWithoutAnnouncements) {
  RawFlags flags;
  flags.announce_count = 0;
  flags.dad_timeout = absl::Milliseconds(1);
  EXPECT_EQ(Refusal(flags), "--dad-timeout: give 10ms to 30s");
}

}  // namespace
}  // namespace vmnet

namespace vmnet {
namespace {

TEST(AgentConfigTest, PortSecurityIsOnByDefaultWithNothingAllowedToTheHost) {
  auto config = AgentConfig::FromFlags(RawFlags{});
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_TRUE(config->reconciler.host.port_security.has_value());
  EXPECT_THAT(config->reconciler.host.port_security->vm_to_host_allow, IsEmpty());
  RawFlags off;
  off.port_security = false;
  config = AgentConfig::FromFlags(off);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_FALSE(config->reconciler.host.port_security.has_value());
}

TEST(AgentConfigTest, VmToHostAllowIsProtocolSlashPortSortedOnce) {
  RawFlags flags;
  flags.vm_to_host_allow = "udp/53, tcp/80,udp/53";
  auto config = AgentConfig::FromFlags(flags);
  ASSERT_TRUE(config.ok()) << config.status();
  using P = kernel::VmToHostPort::Protocol;
  EXPECT_EQ(config->reconciler.host.port_security->vm_to_host_allow,
            (std::vector<kernel::VmToHostPort>{{P::kTcp, 80}, {P::kUdp, 53}}));
}

TEST(AgentConfigTest, RefusesABadVmToHostAllow) {
  for (const char* bad :
       {"53", "icmp/1", "tcp/0", "tcp/65536", "udp/", "tcp/8o", "tcp:80"}) {
    RawFlags flags;
    flags.vm_to_host_allow = bad;
    EXPECT_THAT(Refusal(flags), HasSubstr("--vm-to-host-allow: \"")) << bad;
  }
  RawFlags many;
  for (int port = 1; port <= 257; ++port) {
    many.vm_to_host_allow += absl::StrCat(port > 1 ? "," : "", "tcp/", port);
  }
  EXPECT_THAT(Refusal(many), HasSubstr("give at most 256"));
  RawFlags without;
  without.port_security = false;
  without.vm_to_host_allow = "tcp/80";
  EXPECT_THAT(Refusal(without), HasSubstr("needs --port-security"));
}

}  // namespace
}  // namespace vmnet
