#include "fake_kernel.h"

#include <errno.h>
#include <linux/neighbour.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>

#include "vmnet/kernel/netlink_kernel.h"
#include "vmnet/kernel/tc_codec.h"

namespace vmnet::testing {

using kernel::Address;
using kernel::Link;
using kernel::Neighbor;
using kernel::Route;

FakeKernel::FakeKernel() {
  event_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  for (int fd : {event_fd_, port_security_.event_fd()}) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev);
  }
}

FakeKernel::~FakeKernel() {
  close(epoll_fd_);
  close(event_fd_);
}

void FakeKernel::Emit(kernel::Event event) {
  events_.push_back(std::move(event));
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = write(event_fd_, &one, sizeof(one));
}

absl::StatusOr<kernel::Snapshot> FakeKernel::Dump(const kernel::DumpSelection& what) {
  kernel::Snapshot s = State();
  if (!what.links) s.links.clear();
  if (!what.addresses) s.addresses.clear();
  if (!what.routes) s.routes.clear();
  std::erase_if(s.neighbors, [&](const kernel::Neighbor& n) {
    return n.proxy ? !what.proxies : !what.neighbors;
  });
  if (what.port_security) {
    auto tables = port_security_.Dump();
    if (!tables.ok()) return tables.status();
    s.port_security = std::move(*tables);
  }
  return s;
}

kernel::Snapshot FakeKernel::State() const {
  vmnet::MutexLock lock(&mu_);
  kernel::Snapshot s;
  for (const auto& [i, l] : links_) s.links.push_back(l);
  s.addresses = addresses_;
  s.routes = routes_;
  for (const auto& [k, n] : neighbors_) s.neighbors.push_back(n);
  s.ipv6_forwarding_all = ipv6_forwarding_all_;
  for (const auto& [k, q] : qdiscs_) s.qdiscs.push_back(q);
  s.filters = filters_;
  return s;
}

absl::StatusOr<std::vector<Link>> FakeKernel::DumpLinks() { return State().links; }

void FakeKernel::SetStats(const std::string& name, const kernel::LinkStats& stats) {
  int ifindex = IfIndex(name);
  vmnet::MutexLock lock(&mu_);
  if (Link* l = FindLink(ifindex)) l->stats = stats;
}

absl::StatusOr<std::vector<Link>> FakeKernel::ReadLinks(absl::Span<const int> ifindexes) {
  vmnet::MutexLock lock(&mu_);
  std::vector<Link> out;
  for (int ifindex : ifindexes) {
    if (auto it = links_.find(ifindex); it != links_.end()) out.push_back(it->second);
  }
  return out;
}

absl::StatusOr<std::vector<Neighbor>> FakeKernel::DumpProxyNeighbors() {
  std::vector<Neighbor> out;
  std::function<void()> hook;
  {
    vmnet::MutexLock lock(&mu_);
    for (const auto& [k, n] : neighbors_) {
      if (n.proxy) out.push_back(n);
    }
    hook = after_proxy_dump_read_;
  }
  if (hook) hook();
  return out;
}

void FakeKernel::AfterProxyDumpRead(std::function<void()> hook) {
  vmnet::MutexLock lock(&mu_);
  after_proxy_dump_read_ = std::move(hook);
}

absl::Status FakeKernel::ReadEvents(std::vector<kernel::Event>* events) {
  std::vector<kernel::NftEvent> nft_events;
  absl::Status nft_status = port_security_.ReadEvents(&nft_events);
  for (kernel::NftEvent& e : nft_events) {
    if (!e.own) events->push_back(std::move(e));  // as NetlinkKernel does
  }
  if (!nft_status.ok()) return nft_status;
  vmnet::MutexLock lock(&mu_);
  uint64_t ignored;
  [[maybe_unused]] ssize_t n = read(event_fd_, &ignored, sizeof(ignored));
  if (overflow_) {
    overflow_ = false;
    events_.clear();
    return absl::ResourceExhaustedError("fake overflow");
  }
  for (auto& e : events_) events->push_back(std::move(e));
  events_.clear();
  return absl::OkStatus();
}

Link* FakeKernel::FindLink(int ifindex) {
  auto it = links_.find(ifindex);
  return it == links_.end() ? nullptr : &it->second;
}

void FakeKernel::FlushLink(int ifindex, Flush what) {
  // Like the kernel: routes vanish silently; neighbour deletions are events,
  // proxy entries raise none. (Pinned by the kernel tests
  // LinkDownFlushesRoutesNeighboursAndProxies and
  // TheLastIpv4AddressGoneFlushesIpv4RoutesNeighboursAndProxies.)
  auto on_link = [&](int on, const IpAddress& a) {
    return on == ifindex && (what != Flush::kIpv4 || a.is_v4());
  };
  std::erase_if(
      routes_, [&](const Route& r) { return on_link(r.ifindex, r.destination.address); });
  for (auto it = neighbors_.begin(); it != neighbors_.end();) {
    if (on_link(it->second.ifindex, it->second.address)) {
      if (!it->second.proxy) Emit(kernel::NeighborEvent{true, it->second});
      it = neighbors_.erase(it);
    } else {
      ++it;
    }
  }
  // A link going down loses its IPv6 addresses, each with an event; it keeps
  // its IPv4 ones. A link going away loses all, silently (its deletion says).
  if (what == Flush::kLinkDown) {
    for (auto it = addresses_.begin(); it != addresses_.end();) {
      if (it->ifindex == ifindex && it->prefix.address.is_v6()) {
        Emit(kernel::AddressEvent{true, *it});
        it = addresses_.erase(it);
      } else {
        ++it;
      }
    }
  }
  if (what == Flush::kLinkGone) {
    std::erase_if(addresses_, [&](const Address& a) { return a.ifindex == ifindex; });
  }
}

absl::Status FakeKernel::ApplyOne(const kernel::Write& write) {
  if (fail_errno_ != 0) return kernel::ErrnoStatus(fail_errno_, kernel::ToString(write));
  auto fail = [&](int err) { return kernel::ErrnoStatus(err, kernel::ToString(write)); };
  if (auto* w = std::get_if<kernel::SetLinkUp>(&write)) {
    Link* l = FindLink(w->ifindex);
    if (l == nullptr) return fail(ENODEV);
    l->up = true;
    Emit(kernel::LinkEvent{false, *l});
  } else if (auto* w = std::get_if<kernel::SetIpv4Forwarding>(&write)) {
    Link* l = FindLink(w->ifindex);
    if (l == nullptr) return fail(ENODEV);
    l->ipv4_forwarding = w->enabled;
    Emit(kernel::LinkEvent{false, *l});
  } else if (auto* w = std::get_if<kernel::SetIpv6Conf>(&write)) {
    // Like /proc/sys: no event; "all" forwarding carries to every link.
    using Key = kernel::SetIpv6Conf::Key;
    if (w->ifindex == 0) {
      if (w->key != Key::kForwarding) return fail(EINVAL);
      ipv6_forwarding_all_ = w->value != 0;
      for (auto& [i, l] : links_) l.ipv6->forwarding = w->value != 0;
    } else {
      Link* l = FindLink(w->ifindex);
      if (l == nullptr) return fail(ENOENT);
      if (w->key == Key::kForwarding) l->ipv6->forwarding = w->value != 0;
      if (w->key == Key::kAcceptRa) l->ipv6->accept_ra = w->value;
      if (w->key == Key::kProxyNdp) l->ipv6->proxy_ndp = w->value != 0;
    }
  } else if (auto* w = std::get_if<kernel::AddAddress>(&write)) {
    if (FindLink(w->address.ifindex) == nullptr) return fail(ENODEV);
    for (const Address& a : addresses_) {
      // IPv4 tells addresses apart by prefix length too; IPv6 by address
      // only (kernel test TheSameIpv6AddressWithAnotherPrefixLengthExists).
      if (a.ifindex == w->address.ifindex &&
          a.prefix.address == w->address.prefix.address &&
          (a.prefix.length == w->address.prefix.length || a.prefix.address.is_v6()))
        return fail(EEXIST);
    }
    addresses_.push_back(w->address);
    Emit(kernel::AddressEvent{false, w->address});
  } else if (auto* w = std::get_if<kernel::DeleteAddress>(&write)) {
    auto it = std::find_if(addresses_.begin(), addresses_.end(), [&](const Address& a) {
      return a.ifindex == w->address.ifindex && a.prefix == w->address.prefix;
    });
    // Deleting what is not there: an error the Kernel interface reports as
    // OK (as NetlinkKernel does), and no event.
    if (it != addresses_.end()) {
      Address gone = *it;
      addresses_.erase(it);
      Emit(kernel::AddressEvent{true, gone});
      // The link's last IPv4 address gone disables IPv4 on it.
      if (gone.prefix.address.is_v4() &&
          std::none_of(addresses_.begin(), addresses_.end(), [&](const Address& a) {
            return a.ifindex == gone.ifindex && a.prefix.address.is_v4();
          })) {
        FlushLink(gone.ifindex, Flush::kIpv4);
      }
    }
  } else if (auto* w = std::get_if<kernel::AddRoute>(&write)) {
    Link* link = FindLink(w->route.ifindex);
    if (link == nullptr) return fail(ENODEV);
    // A route to a link that is down (kernel test ARouteToALinkThatIsDownIsEnetdown).
    if (!link->up) return fail(ENETDOWN);
    Route added = w->route;
    // Like the kernel: an IPv6 route without a metric gets 1024.
    if (added.destination.address.is_v6() && added.metric == 0) added.metric = 1024;
    for (const Route& r : routes_) {
      // Conflicts are per table (kernel test RouteConflictsArePerTable).
      if (r.table == added.table && r.destination == added.destination &&
          r.metric == added.metric) {
        return fail(EEXIST);
      }
    }
    routes_.push_back(added);
    Emit(kernel::RouteEvent{false, added});
  } else if (auto* w = std::get_if<kernel::DeleteRoute>(&write)) {
    // As the kernel: a protocol, a link and a metric in the request must
    // match; left out, they match any.
    auto it = std::find_if(routes_.begin(), routes_.end(), [&](const Route& r) {
      return r.table == w->route.table && r.destination == w->route.destination &&
             (w->route.metric == 0 || r.metric == w->route.metric) &&
             (w->route.protocol == 0 || r.protocol == w->route.protocol) &&
             (w->route.ifindex == 0 || r.ifindex == w->route.ifindex);
    });
    if (it != routes_.end()) {
      Route gone = *it;
      routes_.erase(it);
      Emit(kernel::RouteEvent{true, gone});
    }
  } else if (auto* w = std::get_if<kernel::SetNeighbor>(&write)) {
    const Neighbor& n = w->neighbor;
    if (FindLink(n.ifindex) == nullptr) return fail(ENODEV);
    NeighborKey key{n.ifindex, n.address, n.proxy};
    if (auto it = neighbors_.find(key); n.proxy && it != neighbors_.end()) {
      // The kernel ignores NLM_F_EXCL for proxy entries: adding one that
      // exists succeeds and relabels it with the request's protocol (kernel
      // test AnExistingProxyEntryAddedAgainIsRelabelled).
      if (n.protocol != 0) it->second.protocol = n.protocol;
    } else {
      neighbors_[key] = n;
    }
    if (!n.proxy) Emit(kernel::NeighborEvent{false, n});
  } else if (auto* w = std::get_if<kernel::DeleteNeighbor>(&write)) {
    const Neighbor& n = w->neighbor;
    auto it = neighbors_.find({n.ifindex, n.address, n.proxy});
    if (it != neighbors_.end()) {
      if (!n.proxy) Emit(kernel::NeighborEvent{true, it->second});
      neighbors_.erase(it);
    }
  } else if (kernel::IsTcWrite(write)) {
    if (absl::Status s = ApplyTc(write); !s.ok()) return s;
  }
  ++writes_applied_;
  return absl::OkStatus();
}

// Traffic control, as much as the reconciler's tests need: qdiscs by
// (link, parent), ingress filters (a u32 add gets handle 800::800), ifb
// links; each change raises its event.
absl::Status FakeKernel::ApplyTc(const kernel::Write& write) {
  auto fail = [&](int err) { return kernel::ErrnoStatus(err, kernel::ToString(write)); };
  if (auto* w = std::get_if<kernel::SetQdisc>(&write)) {
    if (FindLink(w->qdisc.ifindex) == nullptr) return fail(ENODEV);
    auto key = std::make_pair(w->qdisc.ifindex, w->qdisc.parent);
    if (w->qdisc.kind == "ingress" && qdiscs_.contains(key)) return fail(EEXIST);
    qdiscs_[key] = w->qdisc;
    Emit(kernel::QdiscEvent{false, w->qdisc});
  } else if (auto* w = std::get_if<kernel::DeleteQdisc>(&write)) {
    auto it = qdiscs_.find({w->qdisc.ifindex, w->qdisc.parent});
    if (it == qdiscs_.end()) return absl::OkStatus();
    if (it->second.handle != w->qdisc.handle) return fail(EINVAL);
    kernel::Qdisc gone = it->second;
    qdiscs_.erase(it);
    if (gone.parent == kernel::kIngressParent) {
      std::erase_if(filters_,
                    [&](const kernel::TcFilter& f) { return f.ifindex == gone.ifindex; });
    }
    Emit(kernel::QdiscEvent{true, gone});
  } else if (auto* w = std::get_if<kernel::AddTcFilter>(&write)) {
    if (!qdiscs_.contains({w->filter.ifindex, kernel::kIngressParent}))
      return fail(EINVAL);
    kernel::TcFilter f = w->filter;
    f.handle = 0x80000800;
    filters_.push_back(f);
    Emit(kernel::TcFilterEvent{false, f});
  } else if (auto* w = std::get_if<kernel::DeleteTcFilter>(&write)) {
    size_t n = std::erase_if(filters_, [&](const kernel::TcFilter& f) {
      return f.ifindex == w->filter.ifindex && f.prio == w->filter.prio;
    });
    if (n == 0) return absl::OkStatus();
    kernel::TcFilter f = w->filter;
    f.handle = 0;
    Emit(kernel::TcFilterEvent{true, f});
  } else if (auto* w = std::get_if<kernel::CreateIfb>(&write)) {
    for (const auto& [i, l] : links_) {
      if (l.name == w->name) return fail(EEXIST);
    }
    Link l;
    l.ifindex = next_ifindex_++;
    l.name = w->name;
    l.kind = "ifb";
    l.up = true;
    links_[l.ifindex] = l;
    Emit(kernel::LinkEvent{false, l});
    // Its tbf and the redirect to it, as NetlinkKernel writes them.
    for (const kernel::Write& follow_up : kernel::IfbFollowUps(*w, l.ifindex)) {
      if (absl::Status s = ApplyTc(follow_up); !s.ok()) return s;
    }
  } else if (auto* w = std::get_if<kernel::DeleteLink>(&write)) {
    auto it = links_.find(w->ifindex);
    if (it == links_.end()) return absl::OkStatus();
    Link gone = it->second;
    links_.erase(it);
    qdiscs_.erase({gone.ifindex, kernel::kRootParent});
    qdiscs_.erase({gone.ifindex, kernel::kIngressParent});
    Emit(kernel::LinkEvent{true, gone});
  }
  return absl::OkStatus();
}

void FakeKernel::DeleteQdisc(const std::string& link, uint32_t parent) {
  vmnet::MutexLock lock(&mu_);
  for (auto& [i, l] : links_) {
    if (l.name != link) continue;
    auto it = qdiscs_.find({i, parent});
    if (it == qdiscs_.end()) return;
    kernel::Qdisc gone = it->second;
    qdiscs_.erase(it);
    Emit(kernel::QdiscEvent{true, gone});
  }
}

std::vector<absl::Status> FakeKernel::Apply(absl::Span<const kernel::Write> writes) {
  // As NetlinkKernel: rtnetlink writes in order, then the nftables writes as
  // one transaction, then conntrack.
  std::vector<absl::Status> out(writes.size());
  {
    vmnet::MutexLock lock(&mu_);
    for (size_t i = 0; i < writes.size(); ++i) {
      const kernel::Write& w = writes[i];
      if (!kernel::IsNftWrite(w) && !std::holds_alternative<kernel::DeleteConntrack>(w)) {
        out[i] = ApplyOne(w);
      }
    }
  }
  kernel::ApplyPortSecurityWrites(port_security_, writes, &out);
  return out;
}

int FakeKernel::AddLink(const std::string& name, bool up) {
  vmnet::MutexLock lock(&mu_);
  Link l;
  l.ifindex = next_ifindex_++;
  l.name = name;
  l.up = up;
  l.ipv4_forwarding = false;
  l.ipv6 = kernel::Ipv6Conf{.forwarding = ipv6_forwarding_all_};
  links_[l.ifindex] = l;
  Emit(kernel::LinkEvent{false, l});
  return l.ifindex;
}

int FakeKernel::IfIndex(const std::string& name) const {
  vmnet::MutexLock lock(&mu_);
  for (const auto& [i, l] : links_) {
    if (l.name == name) return i;
  }
  return 0;
}

void FakeKernel::RemoveLink(const std::string& name) {
  int ifindex = IfIndex(name);
  vmnet::MutexLock lock(&mu_);
  Link* l = FindLink(ifindex);
  if (l == nullptr) return;
  Link gone = *l;
  FlushLink(ifindex, Flush::kLinkGone);
  links_.erase(ifindex);
  Emit(kernel::LinkEvent{true, gone});
}

void FakeKernel::SetLinkUp(const std::string& name, bool up) {
  int ifindex = IfIndex(name);
  vmnet::MutexLock lock(&mu_);
  Link* l = FindLink(ifindex);
  if (l == nullptr) return;
  if (l->up && !up) FlushLink(ifindex, Flush::kLinkDown);
  l->up = up;
  Emit(kernel::LinkEvent{false, *l});
}

void FakeKernel::RenameLink(const std::string& name, const std::string& new_name) {
  int ifindex = IfIndex(name);
  vmnet::MutexLock lock(&mu_);
  Link* l = FindLink(ifindex);
  if (l == nullptr) return;
  l->name = new_name;
  Emit(kernel::LinkEvent{false, *l});
}

void FakeKernel::AddForeignAddress(const std::string& link, const std::string& prefix) {
  int ifindex = IfIndex(link);
  vmnet::MutexLock lock(&mu_);
  Address a;
  a.ifindex = ifindex;
  a.prefix = *IpPrefix::Parse(prefix);
  addresses_.push_back(a);
  Emit(kernel::AddressEvent{false, a});
}

void FakeKernel::AddForeignRoute(const Route& route) {
  vmnet::MutexLock lock(&mu_);
  routes_.push_back(route);
  Emit(kernel::RouteEvent{false, route});
}

void FakeKernel::AddForeignNeighbor(const Neighbor& n) {
  vmnet::MutexLock lock(&mu_);
  neighbors_[{n.ifindex, n.address, n.proxy}] = n;
  if (!n.proxy) Emit(kernel::NeighborEvent{false, n});
}

void FakeKernel::DeleteRoute(const IpPrefix& destination) {
  vmnet::MutexLock lock(&mu_);
  for (auto it = routes_.begin(); it != routes_.end();) {
    if (it->destination == destination) {
      Emit(kernel::RouteEvent{true, *it});
      it = routes_.erase(it);
    } else {
      ++it;
    }
  }
}

void FakeKernel::DeleteAddress(const std::string& link, const std::string& prefix) {
  kernel::Address a;
  a.ifindex = IfIndex(link);
  a.prefix = *IpPrefix::Parse(prefix);
  vmnet::MutexLock lock(&mu_);
  (void)ApplyOne(kernel::DeleteAddress{a});
  --writes_applied_;  // someone else's, not the agent's
}

void FakeKernel::DeleteNeighbor(int ifindex, const IpAddress& address, bool proxy) {
  vmnet::MutexLock lock(&mu_);
  auto it = neighbors_.find({ifindex, address, proxy});
  if (it == neighbors_.end()) return;
  if (!proxy) Emit(kernel::NeighborEvent{true, it->second});
  neighbors_.erase(it);
}

void FakeKernel::DeleteRouteLosingEvents(const IpPrefix& destination) {
  vmnet::MutexLock lock(&mu_);
  std::erase_if(routes_, [&](const Route& r) { return r.destination == destination; });
  overflow_ = true;
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = write(event_fd_, &one, sizeof(one));
}

void FakeKernel::Overflow() {
  vmnet::MutexLock lock(&mu_);
  overflow_ = true;
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = write(event_fd_, &one, sizeof(one));
}

void FakeKernel::FailWrites(int err) {
  port_security_.FailWrites(err);
  vmnet::MutexLock lock(&mu_);
  fail_errno_ = err;
}

size_t FakeKernel::writes_applied() const {
  vmnet::MutexLock lock(&mu_);
  return writes_applied_;
}

}  // namespace vmnet::testing
