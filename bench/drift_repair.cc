// vmnet_drift_repair: run inside the lab's host namespace while vmnetd
// manages it. Picks --count of vmnetd's /32 routes (protocol
// --route_protocol, main table) spread over the table, and deletes them one
// at a time as an administrator would (RTM_DELROUTE over rtnetlink). For each
// it measures external delete to repaired: from just before the delete is
// sent until a route monitor (RTNLGRP_IPV4_ROUTE) sees the route added back.
// Between deletes it pauses --gap_ms plus a random part of it, so that the
// deletes fall at every phase of the agent's periodic work.
//
// Prints one JSON object: p50, p90, p99 and max in milliseconds, and how
// many routes were not repaired within --timeout_ms (exit status 1 then).
//
// With --repairer it is instead the control: the least a repairer can do,
// re-adding every deleted /32 route of --route_protocol as soon as the
// route monitor shows its deletion, until SIGTERM. Measured the same way on
// routes of a protocol vmnetd does not own, it gives the floor this machine
// allows at that moment (wake-up and scheduling latency, kernel work).
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <random>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_join.h"
#include "bench_common.h"

ABSL_FLAG(int, count, 200, "Routes to delete, one at a time.");
ABSL_FLAG(int, route_protocol, 237, "vmnetd's --route-protocol.");
ABSL_FLAG(int, timeout_ms, 5000,
          "How long one repair may take before it counts as missed.");
ABSL_FLAG(int, gap_ms, 20,
          "Pause between a repair and the next delete (plus 0..gap_ms).");
ABSL_FLAG(
    bool, repairer, false,
    "Be the control repairer: re-add deleted routes of --route_protocol until SIGTERM.");

namespace vmnet::bench {
namespace {

struct Route {
  uint32_t destination;  // network byte order
  int oif;
};

// An rtnetlink socket; `groups` are the multicast groups it listens to.
class RtnlSocket {
 public:
  explicit RtnlSocket(uint32_t groups) {
    fd_ = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (fd_ < 0) return;
    int size = 16 << 20;
    setsockopt(fd_, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size));
    sockaddr_nl sa{};
    sa.nl_family = AF_NETLINK;
    sa.nl_groups = groups;
    if (bind(fd_, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
      close(fd_);
      fd_ = -1;
    }
  }
  ~RtnlSocket() {
    if (fd_ >= 0) close(fd_);
  }
  bool ok() const { return fd_ >= 0; }
  int fd() const { return fd_; }

  bool Send(const void* message, size_t length) {
    return send(fd_, message, length, 0) == static_cast<ssize_t>(length);
  }

  // Receives one datagram (possibly several messages); -1 on error or, with
  // `dontwait`, when nothing is queued.
  ssize_t Receive(std::vector<char>* buffer, bool dontwait) {
    for (;;) {
      ssize_t n = recv(fd_, buffer->data(), buffer->size(), dontwait ? MSG_DONTWAIT : 0);
      if (n < 0 && errno == EINTR) continue;
      return n;
    }
  }

 private:
  int fd_ = -1;
};

// Calls fn(nlmsghdr*) for each message of a datagram.
template <typename Fn>
void ForEachMessage(const std::vector<char>& buffer, ssize_t length, Fn&& fn) {
  auto* h = reinterpret_cast<const nlmsghdr*>(buffer.data());
  int left = static_cast<int>(length);
  for (; NLMSG_OK(h, left); h = NLMSG_NEXT(h, left)) fn(h);
}

// The /32 destination and output link of an RTM_NEWROUTE/RTM_DELROUTE of
// the main table with protocol `protocol`; false for any other message.
bool ParseHostRoute(const nlmsghdr* h, int protocol, Route* out) {
  if (h->nlmsg_type != RTM_NEWROUTE && h->nlmsg_type != RTM_DELROUTE) return false;
  auto* rtm = static_cast<const rtmsg*>(NLMSG_DATA(h));
  if (rtm->rtm_family != AF_INET || rtm->rtm_dst_len != 32 ||
      rtm->rtm_protocol != protocol) {
    return false;
  }
  uint32_t table = rtm->rtm_table;
  bool have_destination = false;
  out->oif = 0;
  int left = static_cast<int>(RTM_PAYLOAD(h));
  for (auto* a = RTM_RTA(rtm); RTA_OK(a, left); a = RTA_NEXT(a, left)) {
    if (a->rta_type == RTA_DST && RTA_PAYLOAD(a) == 4) {
      std::memcpy(&out->destination, RTA_DATA(a), 4);
      have_destination = true;
    } else if (a->rta_type == RTA_OIF) {
      std::memcpy(&out->oif, RTA_DATA(a), 4);
    } else if (a->rta_type == RTA_TABLE) {
      std::memcpy(&table, RTA_DATA(a), 4);
    }
  }
  return have_destination && table == RT_TABLE_MAIN;
}

bool DumpRoutes(RtnlSocket& sock, int protocol, std::vector<Route>* out) {
  struct {
    nlmsghdr h;
    rtmsg rtm;
  } request{};
  request.h.nlmsg_len = sizeof(request);
  request.h.nlmsg_type = RTM_GETROUTE;
  request.h.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
  request.h.nlmsg_seq = 1;
  request.rtm.rtm_family = AF_INET;
  if (!sock.Send(&request, sizeof(request))) return false;
  std::vector<char> buffer(1 << 20);
  for (;;) {
    ssize_t n = sock.Receive(&buffer, false);
    if (n <= 0) return false;
    bool done = false, failed = false;
    ForEachMessage(buffer, n, [&](const nlmsghdr* h) {
      if (h->nlmsg_type == NLMSG_DONE) done = true;
      if (h->nlmsg_type == NLMSG_ERROR) failed = true;
      Route r;
      if (ParseHostRoute(h, protocol, &r)) out->push_back(r);
    });
    if (failed) return false;
    if (done) return true;
  }
}

// An RTM_NEWROUTE or RTM_DELROUTE of a main-table /32 through one link.
struct HostRouteRequest {
  nlmsghdr h;
  rtmsg rtm;
  rtattr dst_attr;
  uint32_t dst;
  rtattr oif_attr;
  int32_t oif;
};

HostRouteRequest MakeHostRouteRequest(uint16_t type, uint16_t flags, uint8_t scope,
                                      const Route& route, int protocol, uint32_t seq) {
  HostRouteRequest request{};
  request.h.nlmsg_len = sizeof(request);
  request.h.nlmsg_type = type;
  request.h.nlmsg_flags = flags;
  request.h.nlmsg_seq = seq;
  request.rtm.rtm_family = AF_INET;
  request.rtm.rtm_dst_len = 32;
  request.rtm.rtm_table = RT_TABLE_MAIN;
  request.rtm.rtm_protocol = static_cast<uint8_t>(protocol);
  request.rtm.rtm_scope = scope;
  request.rtm.rtm_type = RTN_UNICAST;
  request.dst_attr.rta_len = RTA_LENGTH(4);
  request.dst_attr.rta_type = RTA_DST;
  request.dst = route.destination;
  request.oif_attr.rta_len = RTA_LENGTH(4);
  request.oif_attr.rta_type = RTA_OIF;
  request.oif = route.oif;
  return request;
}

// Deletes the route and waits for the kernel's answer; the errno, 0 on success.
int DeleteRoute(RtnlSocket& sock, const Route& route, int protocol, uint32_t seq) {
  HostRouteRequest request =
      MakeHostRouteRequest(RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK,
                           RT_SCOPE_NOWHERE /* any scope */, route, protocol, seq);
  if (!sock.Send(&request, sizeof(request))) return errno;
  std::vector<char> buffer(1 << 16);
  for (;;) {
    ssize_t n = sock.Receive(&buffer, false);
    if (n <= 0) return errno;
    int error = 1;
    ForEachMessage(buffer, n, [&](const nlmsghdr* h) {
      if (h->nlmsg_type == NLMSG_ERROR && h->nlmsg_seq == seq) {
        error = -static_cast<const nlmsgerr*>(NLMSG_DATA(h))->error;
      }
    });
    if (error != 1) return error;
  }
}

void DrainMonitor(RtnlSocket& monitor, std::vector<char>* buffer) {
  while (monitor.Receive(buffer, true) > 0) {
  }
}

// Waits until the monitor shows `route` added; its time, or 0 on timeout.
double WaitReadded(RtnlSocket& monitor, const Route& route, int protocol, double deadline,
                   std::vector<char>* buffer, int64_t* overflows) {
  for (;;) {
    double now = Now();
    if (now >= deadline) return 0;
    pollfd p{monitor.fd(), POLLIN, 0};
    int timeout = static_cast<int>((deadline - now) * 1000) + 1;
    if (poll(&p, 1, timeout) <= 0) continue;
    ssize_t n = monitor.Receive(buffer, true);
    if (n < 0) {
      if (errno == ENOBUFS) ++*overflows;
      continue;
    }
    double at = Now();
    bool readded = false;
    ForEachMessage(*buffer, n, [&](const nlmsghdr* h) {
      Route r;
      if (h->nlmsg_type == RTM_NEWROUTE && ParseHostRoute(h, protocol, &r) &&
          r.destination == route.destination) {
        readded = true;
      }
    });
    if (readded) return at;
  }
}

// Adds the /32 route (main table, scope link, protocol `protocol`).
void AddRoute(RtnlSocket& sock, const Route& route, int protocol, uint32_t seq) {
  // No ack: as fast as it gets.
  HostRouteRequest request =
      MakeHostRouteRequest(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL,
                           RT_SCOPE_LINK, route, protocol, seq);
  sock.Send(&request, sizeof(request));
}

volatile sig_atomic_t stop_repairing = 0;

int Repair(int protocol) {
  signal(SIGTERM, [](int) { stop_repairing = 1; });
  RtnlSocket requests(0);
  RtnlSocket monitor(RTMGRP_IPV4_ROUTE);
  if (!requests.ok() || !monitor.ok()) return 1;
  // The caller waits for this line before it deletes anything.
  std::printf("subscribed\n");
  std::fflush(stdout);
  std::vector<char> buffer(1 << 20);
  uint32_t seq = 1;
  while (!stop_repairing) {
    pollfd p{monitor.fd(), POLLIN, 0};
    if (poll(&p, 1, 200) <= 0) continue;
    ssize_t n = monitor.Receive(&buffer, true);
    if (n <= 0) continue;
    ForEachMessage(buffer, n, [&](const nlmsghdr* h) {
      Route r;
      if (h->nlmsg_type == RTM_DELROUTE && ParseHostRoute(h, protocol, &r)) {
        AddRoute(requests, r, protocol, ++seq);
      }
    });
  }
  return 0;
}

double Percentile(std::vector<double> sorted, double p) {
  if (sorted.empty()) return -1;
  size_t rank = static_cast<size_t>(std::ceil(p * static_cast<double>(sorted.size())));
  return sorted[std::min(sorted.size() - 1, rank == 0 ? 0 : rank - 1)];
}

int Main() {
  const int protocol = absl::GetFlag(FLAGS_route_protocol);
  const int count = absl::GetFlag(FLAGS_count);
  if (absl::GetFlag(FLAGS_repairer)) return Repair(protocol);
  RtnlSocket requests(0);
  RtnlSocket monitor(RTMGRP_IPV4_ROUTE);
  if (!requests.ok() || !monitor.ok()) {
    std::cerr << "vmnet_drift_repair: cannot open rtnetlink sockets: " << strerror(errno)
              << "\n";
    return 1;
  }
  std::vector<Route> routes;
  if (!DumpRoutes(requests, protocol, &routes) || routes.empty()) {
    std::cerr << "vmnet_drift_repair: no routes with protocol " << protocol
              << " to delete\n";
    return 1;
  }
  // Spread the victims evenly over the table.
  std::vector<Route> victims;
  for (int i = 0; i < count; ++i) {
    victims.push_back(
        routes[static_cast<size_t>(i) * routes.size() / static_cast<size_t>(count)]);
  }

  std::mt19937 random(7);
  std::uniform_int_distribution<int> jitter(0, std::max(0, absl::GetFlag(FLAGS_gap_ms)));
  std::vector<char> buffer(1 << 20);
  std::vector<double> latencies_ms;
  int missed = 0, delete_failures = 0;
  int64_t overflows = 0;
  uint32_t seq = 100;
  for (const Route& victim : victims) {
    std::this_thread::sleep_for(
        std::chrono::milliseconds(absl::GetFlag(FLAGS_gap_ms) + jitter(random)));
    DrainMonitor(monitor, &buffer);
    double start = Now();
    if (int err = DeleteRoute(requests, victim, protocol, ++seq); err != 0) {
      ++delete_failures;  // e.g. the agent was re-adding it already
      continue;
    }
    double deadline = start + absl::GetFlag(FLAGS_timeout_ms) / 1000.0;
    double readded =
        WaitReadded(monitor, victim, protocol, deadline, &buffer, &overflows);
    if (readded == 0) {
      ++missed;
    } else {
      latencies_ms.push_back((readded - start) * 1000);
    }
  }
  std::vector<double> sorted = latencies_ms;
  std::sort(sorted.begin(), sorted.end());
  JsonObject result;
  result.Add("routes_owned", static_cast<int64_t>(routes.size()))
      .Add("deleted", count - delete_failures)
      .Add("repaired", static_cast<int64_t>(latencies_ms.size()))
      .Add("missed", missed)
      .Add("delete_failures", delete_failures)
      .Add("monitor_overflows", overflows)
      .Add("p50_ms", Percentile(sorted, 0.50))
      .Add("p90_ms", Percentile(sorted, 0.90))
      .Add("p99_ms", Percentile(sorted, 0.99))
      .Add("max_ms", sorted.empty() ? -1.0 : sorted.back())
      .Raw("latencies_ms",
           "[" + absl::StrJoin(latencies_ms, ", ", [](std::string* out, double v) {
             absl::StrAppendFormat(out, "%.3f", v);
           }) + "]");
  std::cout << result.ToString() << std::endl;
  return missed == 0 && delete_failures == 0 ? 0 : 1;
}

}  // namespace
}  // namespace vmnet::bench

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "deletes vmnetd's routes one at a time and times their repair (JSON); run it in "
      "the "
      "host namespace");
  absl::ParseCommandLine(argc, argv);
  return vmnet::bench::Main();
}
