// An in-memory kernel behind the Kernel interface, for fast unit tests of
// the reconciler's logic. It answers writes the way NetlinkKernel over
// rtnetlink does, and each behaviour below is pinned against the real kernel
// by a test in tests/kernel/netlink_kernel_test.cc, so the two cannot drift:
// - EEXIST on a create of what exists (routes per table, destination and
//   metric; an IPv6 address whatever its prefix length); but an existing
//   proxy entry added again succeeds and takes the request's protocol;
// - a delete of what is gone succeeds (NetlinkKernel maps the kernel's
//   ENOENT/ESRCH/EADDRNOTAVAIL to OK) and raises no event;
// - ENODEV for a missing link, ENETDOWN for a route to a link that is down;
// - events for what the real kernel raises events for (not for proxy
//   entries, not for routes flushed with their link);
// - a link going down loses its routes, neighbour and proxy entries and its
//   IPv6 addresses; the last IPv4 address of a link deleted takes the link's
//   IPv4 routes, neighbour and proxy entries with it.
// Tests change it "from outside" to simulate someone else.
#pragma once

#include <functional>
#include <map>
#include <tuple>
#include <vector>

#include "fake_port_security_kernel.h"
#include "vmnet/base/mutex.h"
#include "vmnet/kernel/kernel.h"

namespace vmnet::testing {

class FakeKernel : public kernel::Kernel {
 public:
  FakeKernel();
  ~FakeKernel() override;

  using Kernel::Dump;
  absl::StatusOr<kernel::Snapshot> Dump(const kernel::DumpSelection& what) override;
  absl::StatusOr<std::vector<kernel::Link>> DumpLinks() override;
  absl::StatusOr<std::vector<kernel::Neighbor>> DumpProxyNeighbors() override;
  absl::StatusOr<std::vector<kernel::Link>> ReadLinks(
      absl::Span<const int> ifindexes) override;
  // Sets a link's counters (host's view).
  void SetStats(const std::string& name, const kernel::LinkStats& stats);
  std::vector<absl::Status> Apply(absl::Span<const kernel::Write> writes) override;
  // Readable when either the fake's own events or its port security's are.
  int event_fd() const override { return epoll_fd_; }
  absl::Status ReadEvents(std::vector<kernel::Event>* events) override;
  absl::StatusOr<std::vector<kernel::DropCounter>> ReadDropCounters() override {
    return port_security_.ReadDropCounters();
  }
  // vmnetd's nftables tables and conntrack, behind the same Apply.
  FakePortSecurityKernel& port_security() { return port_security_; }

  // Changes made by "someone else".
  int AddLink(const std::string& name, bool up = false);
  void RemoveLink(const std::string& name);
  void SetLinkUp(const std::string& name, bool up);
  // `ip link set NAME name NEW`: the same ifindex, its objects stay on it.
  void RenameLink(const std::string& name, const std::string& new_name);
  void AddForeignAddress(const std::string& link, const std::string& prefix);
  void AddForeignRoute(const kernel::Route& route);
  void AddForeignNeighbor(const kernel::Neighbor& neighbor);
  void DeleteRoute(const IpPrefix& destination);
  // `ip addr del`: with the kernel's consequences (the last IPv4 address of a
  // link takes the link's IPv4 routes, neighbour and proxy entries along).
  void DeleteAddress(const std::string& link, const std::string& prefix);
  void DeleteNeighbor(int ifindex, const IpAddress& address, bool proxy);
  // `tc qdisc del dev LINK root` (or ingress: kIngressParent).
  void DeleteQdisc(const std::string& link, uint32_t parent);
  // Makes the next ReadEvents report an overflow, losing what is queued.
  void Overflow();
  // Deletes the routes to `destination` and overflows at once: the deletion
  // is known only to a re-dump.
  void DeleteRouteLosingEvents(const IpPrefix& destination);
  // Makes every write fail with this errno (0: succeed again).
  void FailWrites(int err);
  // Runs `hook` in each proxy dump after it has read the entries and before
  // it returns them, on the dumping thread (a hook that blocks holds the
  // dump's result back, not the fake).
  void AfterProxyDumpRead(std::function<void()> hook);

  // Inspection.
  int IfIndex(const std::string& name) const;
  kernel::Snapshot State() const;
  size_t writes_applied() const;

 private:
  using NeighborKey = std::tuple<int, IpAddress, bool>;
  void Emit(kernel::Event event) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ApplyOne(const kernel::Write& write) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ApplyTc(const kernel::Write& write) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  enum class Flush { kLinkDown, kLinkGone, kIpv4 };
  void FlushLink(int ifindex, Flush what) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  kernel::Link* FindLink(int ifindex) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable vmnet::Mutex mu_;
  std::function<void()> after_proxy_dump_read_ ABSL_GUARDED_BY(mu_);
  int event_fd_ = -1;
  int epoll_fd_ = -1;
  FakePortSecurityKernel port_security_;
  bool ipv6_forwarding_all_ ABSL_GUARDED_BY(mu_) = false;
  int next_ifindex_ ABSL_GUARDED_BY(mu_) = 1;
  std::map<int, kernel::Link> links_ ABSL_GUARDED_BY(mu_);
  std::vector<kernel::Address> addresses_ ABSL_GUARDED_BY(mu_);
  std::vector<kernel::Route> routes_ ABSL_GUARDED_BY(mu_);
  std::map<NeighborKey, kernel::Neighbor> neighbors_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<int, uint32_t>, kernel::Qdisc> qdiscs_ ABSL_GUARDED_BY(mu_);
  std::vector<kernel::TcFilter> filters_ ABSL_GUARDED_BY(mu_);
  std::vector<kernel::Event> events_ ABSL_GUARDED_BY(mu_);
  bool overflow_ ABSL_GUARDED_BY(mu_) = false;
  int fail_errno_ ABSL_GUARDED_BY(mu_) = 0;
  size_t writes_applied_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace vmnet::testing
