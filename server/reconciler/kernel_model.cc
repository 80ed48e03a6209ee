#include "vmnet/reconciler/kernel_model.h"

#include <linux/rtnetlink.h>

#include <algorithm>
#include <type_traits>

#include "absl/container/flat_hash_set.h"

namespace vmnet {

using kernel::Address;
using kernel::LinkInfo;
using kernel::Neighbor;
using kernel::Route;

void KernelModel::Reset(kernel::Snapshot snapshot) {
  nft_fingerprint_.reset();
  nft_intact_ = false;
  nft_elements_.Clear();
  if (snapshot.port_security) {
    nft_fingerprint_ = snapshot.port_security->fingerprint;
    nft_intact_ = snapshot.port_security->base_intact;
    for (const kernel::NftElement& e : snapshot.port_security->elements) {
      nft_elements_.Insert(e);
    }
  }
  links_.clear();
  link_by_name_.clear();
  addresses_.clear();
  local_address_count_.clear();
  ipv4_addresses_per_link_.clear();
  broadcast_count_.clear();
  routes_.clear();
  neighbors_.clear();
  link_local6_.clear();
  ipv6_forwarding_all_ = snapshot.ipv6_forwarding_all;
  for (const kernel::Link& l : snapshot.links) UpsertLink(l);
  for (const Address& a : snapshot.addresses) AddAddress(a);
  for (const Route& r : snapshot.routes) AddRoute(r);
  for (const Neighbor& n : snapshot.neighbors) Upsert(neighbors_, n);
  ResetTc(snapshot);
}

namespace {

// Small sorted lists (a link's nftables elements of one kind).
template <typename List, typename T>
void InsertSorted(List& list, const T& x) {
  auto it = std::lower_bound(list.begin(), list.end(), x);
  if (it == list.end() || !(*it == x)) list.insert(it, x);
}
template <typename List, typename T>
void EraseSorted(List& list, const T& x) {
  auto it = std::lower_bound(list.begin(), list.end(), x);
  if (it != list.end() && *it == x) list.erase(it);
}
template <typename List, typename T>
bool ContainsSorted(const List& list, const T& x) {
  return std::binary_search(list.begin(), list.end(), x);
}

}  // namespace

void KernelModel::NftElements::Insert(const kernel::NftElement& e) {
  std::visit(
      [&](const auto& x) {
        OfLink& l = links_[x.ifname];
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, kernel::NftVmLink>) {
          l.vm_link = true;
        } else if constexpr (std::is_same_v<T, kernel::NftSourcePrefix>) {
          InsertSorted(l.source_prefixes, x.prefix);
        } else if constexpr (std::is_same_v<T, kernel::NftArpSender>) {
          InsertSorted(l.arp_senders, x.address);
        } else {
          InsertSorted(l.packet_rate_limits, std::pair<uint64_t, uint32_t>(
                                                 x.packets_per_second, x.burst_packets));
        }
      },
      e);
}

void KernelModel::NftElements::Erase(const kernel::NftElement& e) {
  std::visit(
      [&](const auto& x) {
        auto it = links_.find(x.ifname);
        if (it == links_.end()) return;
        OfLink& l = it->second;
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, kernel::NftVmLink>) {
          l.vm_link = false;
        } else if constexpr (std::is_same_v<T, kernel::NftSourcePrefix>) {
          EraseSorted(l.source_prefixes, x.prefix);
        } else if constexpr (std::is_same_v<T, kernel::NftArpSender>) {
          EraseSorted(l.arp_senders, x.address);
        } else {
          EraseSorted(l.packet_rate_limits, std::pair<uint64_t, uint32_t>(
                                                x.packets_per_second, x.burst_packets));
        }
        if (l.empty()) links_.erase(it);
      },
      e);
}

bool KernelModel::NftElements::Contains(const kernel::NftElement& e) const {
  return std::visit(
      [&](const auto& x) {
        auto it = links_.find(x.ifname);
        if (it == links_.end()) return false;
        const OfLink& l = it->second;
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, kernel::NftVmLink>) {
          return l.vm_link;
        } else if constexpr (std::is_same_v<T, kernel::NftSourcePrefix>) {
          return ContainsSorted(l.source_prefixes, x.prefix);
        } else if constexpr (std::is_same_v<T, kernel::NftArpSender>) {
          return ContainsSorted(l.arp_senders, x.address);
        } else {
          return ContainsSorted(
              l.packet_rate_limits,
              std::pair<uint64_t, uint32_t>(x.packets_per_second, x.burst_packets));
        }
      },
      e);
}

void KernelModel::NftElements::ForgetPacketRateLimits(const std::string& ifname) {
  auto it = links_.find(ifname);
  if (it == links_.end()) return;
  it->second.packet_rate_limits.clear();
  if (it->second.empty()) links_.erase(it);
}

void KernelModel::UpsertLink(const LinkInfo& link) {
  auto it = links_.find(link.ifindex);
  if (it != links_.end()) {
    // The by-name set hashes the name in the node: out before it changes.
    if (it->second.name != link.name) link_by_name_.erase(it->second.name);
    // The kernel flushes a link's routes and neighbours when it goes down,
    // without an event for the routes.
    if (it->second.up && !link.up) ForgetLinkObjects(link.ifindex, false);
  }
  LinkInfo& stored = links_[link.ifindex];
  stored = link;
  // The name's last link wins (as a map's assignment did).
  if (auto named = link_by_name_.find(link.name);
      named != link_by_name_.end() && *named != &stored) {
    link_by_name_.erase(named);
  }
  link_by_name_.insert(&stored);
}

void KernelModel::RemoveLink(int ifindex) {
  auto it = links_.find(ifindex);
  if (it == links_.end()) return;
  auto name = link_by_name_.find(it->second.name);
  if (name != link_by_name_.end() && *name == &it->second) {
    link_by_name_.erase(name);
  }
  links_.erase(it);
  ForgetLinkObjects(ifindex, true);
  ForgetTc(ifindex);
}

void KernelModel::ForgetLinkObjects(int ifindex, bool addresses_too, bool ipv4_only) {
  auto gone = [&](int on, const IpAddress& a) {
    return on == ifindex && (!ipv4_only || a.is_v4());
  };
  for (auto it = routes_.begin(); it != routes_.end();) {
    RouteList& list = it->routes;
    list.erase(std::remove_if(list.begin(), list.end(),
                              [&](const Route& r) {
                                return gone(r.ifindex, r.destination.address);
                              }),
               list.end());
    if (list.empty()) {
      routes_.erase(it++);
    } else {
      ++it;
    }
  }
  absl::erase_if(neighbors_,
                 [&](const Neighbor& n) { return gone(n.ifindex, n.address); });
  if (addresses_too) {
    std::vector<Address> gone;
    for (const Address& a : addresses_) {
      if (a.ifindex == ifindex) gone.push_back(a);
    }
    for (const Address& a : gone) RemoveAddress(a);
  }
}

void KernelModel::AddAddress(const Address& a) {
  if (!Upsert(addresses_, a)) return;  // known: perhaps new attributes
  ++local_address_count_[a.prefix.address];
  if (a.prefix.address.is_v6() && a.prefix.address.IsLinkLocal()) {
    link_local6_.try_emplace(a.ifindex, a.prefix.address);
  }
  if (a.prefix.address.is_v4()) ++ipv4_addresses_per_link_[a.ifindex];
  if (a.prefix.address.is_v4() && a.prefix.length < 31) {
    ++broadcast_count_[a.prefix.Last()];
  }
}

void KernelModel::RemoveAddress(const Address& a) {
  if (addresses_.erase(AddressKey{a.ifindex, a.prefix}) == 0) return;
  auto decrement = [](absl::flat_hash_map<IpAddress, int>& counts, const IpAddress& key) {
    auto it = counts.find(key);
    if (it != counts.end() && --it->second <= 0) counts.erase(it);
  };
  decrement(local_address_count_, a.prefix.address);
  if (auto it = link_local6_.find(a.ifindex);
      it != link_local6_.end() && it->second == a.prefix.address) {
    link_local6_.erase(it);
  }
  if (a.prefix.address.is_v4()) {
    auto it = ipv4_addresses_per_link_.find(a.ifindex);
    if (it != ipv4_addresses_per_link_.end() && --it->second <= 0) {
      ipv4_addresses_per_link_.erase(it);
      // The last IPv4 address gone disables IP on the link: the kernel
      // flushes its IPv4 routes and neighbour entries, with no route event.
      ForgetLinkObjects(a.ifindex, false, /*ipv4_only=*/true);
    }
  }
  if (a.prefix.address.is_v4() && a.prefix.length < 31) {
    decrement(broadcast_count_, a.prefix.Last());
  }
}

void KernelModel::AddRoute(const Route& r) {
  if (r.table != RT_TABLE_MAIN) return;
  auto it = routes_.find(r.destination);
  if (it == routes_.end()) {
    routes_.insert(Routes{RouteList{r}});
    return;
  }
  for (Route& existing : it->routes) {
    if (existing.metric == r.metric && existing.ifindex == r.ifindex) {
      existing = r;
      return;
    }
  }
  it->routes.push_back(r);
}

void KernelModel::ReplaceRoute(const Route& r) {
  auto it = routes_.find(r.destination);
  if (it == routes_.end()) return;
  // The kernel keeps one route per (table, destination, metric) that a
  // replace overwrites, whatever its link or protocol was.
  RouteList& list = it->routes;
  list.erase(std::remove_if(list.begin(), list.end(),
                            [&](const Route& existing) {
                              return existing.table == r.table &&
                                     existing.metric == r.metric;
                            }),
             list.end());
  if (list.empty()) routes_.erase(it);
}

void KernelModel::RemoveRoute(const Route& r) {
  auto it = routes_.find(r.destination);
  if (it == routes_.end()) return;
  RouteList& list = it->routes;
  list.erase(std::remove_if(list.begin(), list.end(),
                            [&](const Route& e) {
                              return e.metric == r.metric &&
                                     (r.ifindex == 0 || e.ifindex == r.ifindex) &&
                                     (r.protocol == 0 || e.protocol == r.protocol);
                            }),
             list.end());
  if (list.empty()) routes_.erase(it);
}

KernelModel::Touched KernelModel::Apply(const kernel::Event& event) {
  Touched touched;
  if (ApplyTcEvent(event, &touched)) return touched;
  auto link_of = [&](int ifindex) {
    if (const LinkInfo* l = LinkByIndex(ifindex)) touched.links.push_back(l->name);
  };
  if (auto* e = std::get_if<kernel::LinkEvent>(&event)) {
    touched.links.push_back(e->link.name);
    // A rename is the old name's link leaving and the new one's appearing.
    if (const LinkInfo* before = LinkByIndex(e->link.ifindex);
        before != nullptr && before->name != e->link.name) {
      touched.links.push_back(before->name);
      touched.sweep_orphans = true;
    }
    if (e->deleted) {
      RemoveLink(e->link.ifindex);
    } else {
      const LinkInfo* before = LinkByIndex(e->link.ifindex);
      if (e->link.up && (before == nullptr || !before->up)) {
        touched.came_up.push_back(e->link.name);
      }
      UpsertLink(e->link);
    }
    AddIfbOwners(&touched);
  } else if (auto* e = std::get_if<kernel::AddressEvent>(&event)) {
    if (e->deleted) {
      RemoveAddress(e->address);
    } else {
      AddAddress(e->address);
    }
    link_of(e->address.ifindex);
  } else if (auto* e = std::get_if<kernel::RouteEvent>(&event)) {
    if (e->deleted) {
      RemoveRoute(e->route);
    } else {
      if (e->replaced) ReplaceRoute(e->route);
      AddRoute(e->route);
    }
    const IpPrefix& d = e->route.destination;
    if (d.length == d.address.bit_length()) touched.addresses.push_back(d.address);
  } else if (auto* e = std::get_if<kernel::NeighborEvent>(&event)) {
    if (e->deleted) {
      neighbors_.erase(NeighborKey::Of(e->neighbor));
    } else {
      Upsert(neighbors_, e->neighbor);
    }
    touched.addresses.push_back(e->neighbor.address);
  } else if (auto* e = std::get_if<kernel::HostSettingsEvent>(&event)) {
    if (e->ipv6_forwarding_all && e->ipv6_forwarding_all != ipv6_forwarding_all_) {
      ipv6_forwarding_all_ = e->ipv6_forwarding_all;
      touched.everything = true;
    }
  } else if (auto* e = std::get_if<kernel::NftEvent>(&event)) {
    using Kind = kernel::NftEvent::Kind;
    if (e->kind == Kind::kBaseChanged || !e->element) {
      nft_intact_ = false;
      touched.everything = true;
    } else {
      if (const auto* limit = std::get_if<kernel::NftPacketRateLimit>(&*e->element)) {
        // An event does not carry the rate: the link's limit is unknown
        // (rate 0) when a part of it was added, gone when one was deleted.
        nft_elements_.ForgetPacketRateLimits(limit->ifname);
      }
      if (e->kind == Kind::kElementAdded) {
        nft_elements_.Insert(*e->element);
        touched.sweep_orphans = true;
      } else {
        nft_elements_.Erase(*e->element);
      }
      touched.links.push_back(
          std::visit([](const auto& x) { return x.ifname; }, *e->element));
    }
  }
  return touched;
}

void KernelModel::ApplyWrite(const kernel::Write& write) {
  if (kernel::IsTcWrite(write)) {
    ApplyTcWrite(write);
  } else if (auto* w = std::get_if<kernel::EnsurePortSecurityBase>(&write)) {
    nft_fingerprint_ = w->config.Fingerprint();
    nft_intact_ = true;
    nft_elements_.Clear();
  } else if (std::holds_alternative<kernel::DeletePortSecurityBase>(write)) {
    nft_fingerprint_.reset();
    nft_intact_ = false;
    nft_elements_.Clear();
  } else if (auto* w = std::get_if<kernel::AddNftElement>(&write)) {
    // A link has one packet-rate limit: adding one replaces the other.
    if (const auto* l = std::get_if<kernel::NftPacketRateLimit>(&w->element))
      nft_elements_.ForgetPacketRateLimits(l->ifname);
    nft_elements_.Insert(w->element);
  } else if (auto* w = std::get_if<kernel::DeleteNftElement>(&write)) {
    // Deleting a limit deletes the link's, whatever its rate.
    if (const auto* l = std::get_if<kernel::NftPacketRateLimit>(&w->element))
      nft_elements_.ForgetPacketRateLimits(l->ifname);
    nft_elements_.Erase(w->element);
  } else if (auto* w = std::get_if<kernel::SetLinkUp>(&write)) {
    if (auto it = links_.find(w->ifindex); it != links_.end()) it->second.up = true;
  } else if (auto* w = std::get_if<kernel::SetIpv4Forwarding>(&write)) {
    if (auto it = links_.find(w->ifindex); it != links_.end()) {
      it->second.ipv4_forwarding = w->enabled;
    }
  } else if (auto* w = std::get_if<kernel::SetIpv6Conf>(&write)) {
    using Key = kernel::SetIpv6Conf::Key;
    if (w->ifindex == 0) {
      // "all" forwarding carries to every link.
      ipv6_forwarding_all_ = w->value != 0;
      for (auto& [ifindex, link] : links_) {
        if (link.ipv6) link.ipv6->forwarding = w->value != 0;
      }
    } else if (auto it = links_.find(w->ifindex); it != links_.end() && it->second.ipv6) {
      kernel::Ipv6Conf& conf = *it->second.ipv6;
      if (w->key == Key::kForwarding) conf.forwarding = w->value != 0;
      if (w->key == Key::kAcceptRa) conf.accept_ra = w->value;
      if (w->key == Key::kProxyNdp) conf.proxy_ndp = w->value != 0;
    }
  } else if (auto* w = std::get_if<kernel::AddAddress>(&write)) {
    AddAddress(w->address);
  } else if (auto* w = std::get_if<kernel::DeleteAddress>(&write)) {
    RemoveAddress(w->address);
  } else if (auto* w = std::get_if<kernel::AddRoute>(&write)) {
    AddRoute(w->route);
  } else if (auto* w = std::get_if<kernel::DeleteRoute>(&write)) {
    RemoveRoute(w->route);
  } else if (auto* w = std::get_if<kernel::SetNeighbor>(&write)) {
    Upsert(neighbors_, w->neighbor);
  } else if (auto* w = std::get_if<kernel::DeleteNeighbor>(&write)) {
    neighbors_.erase(NeighborKey::Of(w->neighbor));
  }
}

KernelModel::ProxySet KernelModel::MakeProxySet(const std::vector<Neighbor>& proxies) {
  ProxySet set;
  set.entries_.reserve(proxies.size());
  for (Neighbor n : proxies) {
    n.proxy = true;
    Upsert(set.entries_, n);
  }
  return set;
}

std::vector<IpAddress> KernelModel::ReplaceProxies(
    const ProxySet& dump, const absl::flat_hash_set<IpAddress>& keep) {
  const auto& fresh = dump.entries_;
  absl::flat_hash_set<IpAddress> changed;
  for (auto it = neighbors_.begin(); it != neighbors_.end();) {
    if (!it->proxy || keep.contains(it->address)) {
      ++it;
      continue;
    }
    auto f = fresh.find(NeighborKey::Of(*it));
    if (f == fresh.end() || !(*f == *it)) changed.insert(it->address);
    if (f == fresh.end()) {
      neighbors_.erase(it++);
    } else {
      ++it;
    }
  }
  for (const Neighbor& n : fresh) {
    if (keep.contains(n.address) || !links_.contains(n.ifindex)) continue;
    if (Upsert(neighbors_, n)) changed.insert(n.address);
  }
  return {changed.begin(), changed.end()};
}

const LinkInfo* KernelModel::LinkByName(absl::string_view name) const {
  auto it = link_by_name_.find(name);
  return it == link_by_name_.end() ? nullptr : *it;
}

const LinkInfo* KernelModel::LinkByIndex(int ifindex) const {
  auto it = links_.find(ifindex);
  return it == links_.end() ? nullptr : &it->second;
}

const Address* KernelModel::FindAddress(int ifindex, const IpPrefix& prefix) const {
  auto it = addresses_.find(AddressKey{ifindex, prefix});
  return it == addresses_.end() ? nullptr : &*it;
}

const KernelModel::RouteList* KernelModel::RoutesTo(const IpPrefix& prefix) const {
  auto it = routes_.find(prefix);
  return it == routes_.end() ? nullptr : &it->routes;
}

const Neighbor* KernelModel::FindNeighbor(int ifindex, const IpAddress& address,
                                          bool proxy) const {
  auto it = neighbors_.find(NeighborKey{ifindex, address, proxy});
  return it == neighbors_.end() ? nullptr : &*it;
}

IpAddress KernelModel::LinkLocal6(int ifindex) const {
  auto it = link_local6_.find(ifindex);
  return it == link_local6_.end() ? IpAddress() : it->second;
}

bool KernelModel::IsLocalAddress(const IpAddress& address) const {
  return local_address_count_.contains(address);
}

bool KernelModel::IsConnectedBroadcast(const IpAddress& address) const {
  return broadcast_count_.contains(address);
}

}  // namespace vmnet
