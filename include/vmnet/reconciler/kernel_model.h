// What the reconciler believes the kernel holds: built from a full dump,
// kept current by kernel events, by the proxy-entry dumps (proxy entries
// raise no events) and by the reconciler's own successful writes. Owned by
// the reconciler thread; not thread-safe.
#pragma once

#include <algorithm>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/container/inlined_vector.h"
#include "absl/container/node_hash_map.h"
#include "absl/container/node_hash_set.h"
#include "absl/strings/string_view.h"
#include "vmnet/kernel/objects.h"

namespace vmnet {

class KernelModel {
 public:
  // What a change touched, named as the desired state names things: the
  // VMs (and uplinks) with these links, and the VMs with these addresses,
  // must be planned again.
  struct Touched {
    std::vector<std::string> links;
    std::vector<IpAddress> addresses;
    bool everything = false;  // a host-wide object: every VM is planned again
    // Objects of ours may now be where no VM wants them (someone added to
    // our tables; a link with our objects was renamed): sweep the orphans.
    bool sweep_orphans = false;
    // Links that were down (or absent) and are up now: what was announced
    // through them may have been lost.
    std::vector<std::string> came_up;
  };

  void Reset(kernel::Snapshot snapshot);
  Touched Apply(const kernel::Event& event);
  void ApplyWrite(const kernel::Write& write);
  // A proxy dump keyed as the model keys its entries (ProxySet, below),
  // made on the thread that read the dump.
  class ProxySet;
  static ProxySet MakeProxySet(const std::vector<kernel::Neighbor>& proxies);
  // Replaces the proxy entries with a proxy dump's, except those of the
  // addresses in `keep` (written since the dump began: the model knows them
  // better) and those on links the model no longer has (gone since).
  // Returns the addresses whose proxy entries differed.
  std::vector<IpAddress> ReplaceProxies(const ProxySet& dump,
                                        const absl::flat_hash_set<IpAddress>& keep = {});

  // A link as the model keeps it: without its counters.
  const kernel::LinkInfo* LinkByName(absl::string_view name) const;
  const kernel::LinkInfo* LinkByIndex(int ifindex) const;
  const kernel::Address* FindAddress(int ifindex, const IpPrefix& prefix) const;
  // Main-table routes to exactly this prefix (one, nearly always).
  using RouteList = absl::InlinedVector<kernel::Route, 1>;
  const RouteList* RoutesTo(const IpPrefix& prefix) const;
  const kernel::Neighbor* FindNeighbor(int ifindex, const IpAddress& address,
                                       bool proxy) const;

  // Port security (vmnetd's nftables tables): whether the base is the one
  // `config` wants, and whether an element is in place. An element of a
  // base that does not match counts as absent: rebuilding the base drops
  // every element, and they are added again in the same transaction.
  bool PortSecurityBaseMatches(const kernel::PortSecurityConfig& config) const {
    return nft_intact_ && nft_fingerprint_ == config.Fingerprint();
  }
  bool PortSecurityTablesPresent() const { return nft_fingerprint_.has_value(); }
  bool HasNftElement(const kernel::NftElement& element,
                     const kernel::PortSecurityConfig& config) const {
    return PortSecurityBaseMatches(config) && nft_elements_.Contains(element);
  }
  // In the order of NftElement's operator<.
  template <typename Fn>
  void ForEachNftElement(Fn&& fn) const {
    nft_elements_.ForEach(fn);
  }

  // net.ipv6.conf.all.forwarding; absent when the kernel has no IPv6.
  std::optional<bool> ipv6_forwarding_all() const { return ipv6_forwarding_all_; }
  // An IPv6 link-local address of the link (family kNone when it has none).
  IpAddress LinkLocal6(int ifindex) const;
  // An address configured on any of the host's links.
  bool IsLocalAddress(const IpAddress& address) const;
  // The broadcast address of a subnet the host is connected to.
  bool IsConnectedBroadcast(const IpAddress& address) const;

  template <typename Fn>
  void ForEachRoute(Fn&& fn) const {
    for (const Routes& list : routes_) {
      for (const kernel::Route& r : list.routes) fn(r);
    }
  }
  template <typename Fn>
  void ForEachNeighbor(Fn&& fn) const {
    for (const kernel::Neighbor& n : neighbors_) fn(n);
  }
  template <typename Fn>
  void ForEachAddress(Fn&& fn) const {
    for (const kernel::Address& a : addresses_) fn(a);
  }
  template <typename Fn>
  void ForEachLink(Fn&& fn) const {
    for (const auto& [ifindex, l] : links_) fn(l);
  }

  // Traffic control (kernel_model_tc.cc): the root or ingress qdisc of a
  // link (parent kRootParent or kIngressParent), and the filters of a
  // link's ingress qdisc.
  const kernel::Qdisc* FindQdisc(int ifindex, uint32_t parent) const;
  const std::vector<kernel::TcFilter>* IngressFilters(int ifindex) const;

 private:
  // vmnetd's nftables elements, grouped by link. Every element names a
  // link, and a VM link has three or more (the link, a source prefix per
  // address, an ARP sender per IPv4 address): kept by link, the name is
  // stored once instead of in each element (a std::set node of the 64-byte
  // variant was 112 bytes per element, 336 per VM; this is about 160).
  class NftElements {
   public:
    void Insert(const kernel::NftElement& e);
    void Erase(const kernel::NftElement& e);
    bool Contains(const kernel::NftElement& e) const;
    // Drops every packet-rate limit of `ifname` (any rate).
    void ForgetPacketRateLimits(const std::string& ifname);
    void Clear() { links_.clear(); }
    // Every element, in the order of NftElement's operator< (that of the
    // std::set this replaces): by kind, then by link name, then by value.
    template <typename Fn>
    void ForEach(Fn& fn) const {
      std::vector<const Entry*> sorted;
      sorted.reserve(links_.size());
      for (const Entry& e : links_) sorted.push_back(&e);
      std::sort(sorted.begin(), sorted.end(),
                [](const Entry* a, const Entry* b) { return a->first < b->first; });
      for (const Entry* e : sorted) {
        if (e->second.vm_link) fn(kernel::NftElement(kernel::NftVmLink{e->first}));
      }
      for (const Entry* e : sorted) {
        for (const IpPrefix& p : e->second.source_prefixes)
          fn(kernel::NftElement(kernel::NftSourcePrefix{e->first, p}));
      }
      for (const Entry* e : sorted) {
        for (const IpAddress& a : e->second.arp_senders)
          fn(kernel::NftElement(kernel::NftArpSender{e->first, a}));
      }
      for (const Entry* e : sorted) {
        for (const auto& [pps, burst] : e->second.packet_rate_limits)
          fn(kernel::NftElement(kernel::NftPacketRateLimit{e->first, pps, burst}));
      }
    }

   private:
    // One link's elements, each list sorted (a link has one or two of
    // each; inline, no allocation for one).
    struct OfLink {
      bool vm_link = false;
      absl::InlinedVector<IpPrefix, 1> source_prefixes;
      absl::InlinedVector<IpAddress, 1> arp_senders;
      // (packets per second, burst): rare, and one per link but in a
      // snapshot of someone else's doing.
      std::vector<std::pair<uint64_t, uint32_t>> packet_rate_limits;
      bool empty() const {
        return !vm_link && source_prefixes.empty() && arp_senders.empty() &&
               packet_rate_limits.empty();
      }
    };
    using Entry = std::pair<const std::string, OfLink>;
    absl::node_hash_map<std::string, OfLink> links_;
  };

  struct AddressKey {
    int ifindex;
    IpPrefix prefix;
    static AddressKey Of(const kernel::Address& a) { return {a.ifindex, a.prefix}; }
    bool operator==(const AddressKey&) const = default;
    template <typename H>
    friend H AbslHashValue(H h, const AddressKey& k) {
      return H::combine(std::move(h), k.ifindex, k.prefix);
    }
  };
  struct NeighborKey {
    int ifindex;
    IpAddress address;
    bool proxy;
    static NeighborKey Of(const kernel::Neighbor& n) {
      return {n.ifindex, n.address, n.proxy};
    }
    bool operator==(const NeighborKey&) const = default;
    template <typename H>
    friend H AbslHashValue(H h, const NeighborKey& k) {
      return H::combine(std::move(h), k.ifindex, k.address, k.proxy);
    }
  };
  // Hash and equality of objects by their Key (Key::Of(object)), for sets
  // found by a key that is part of each object: a map would store the key
  // twice (an address's slot 68 bytes instead of 40, a neighbour's 64
  // instead of 40).
  template <typename Key>
  struct ByKey {
    using is_transparent = void;
    static const Key& Of(const Key& k) { return k; }
    template <typename T>
    static Key Of(const T& object) {
      return Key::Of(object);
    }
    template <typename T>
    size_t operator()(const T& x) const {
      return absl::Hash<Key>()(Of(x));
    }
    template <typename A, typename B>
    bool operator()(const A& a, const B& b) const {
      return Of(a) == Of(b);
    }
  };
  template <typename T, typename Key>
  using SetByKey = absl::flat_hash_set<T, ByKey<Key>, ByKey<Key>>;
  // The same with a node per object: for objects large against a slot
  // pointer, where a flat table's empty slots (a third to a half after each
  // doubling) would each be a whole object.
  template <typename T, typename Key>
  using NodeSetByKey = absl::node_hash_set<T, ByKey<Key>, ByKey<Key>>;
  // Inserts `object`, or replaces the one with its key (a set's elements
  // are immutable). Whether it was new.
  template <typename Set, typename T>
  static bool Upsert(Set& set, const T& object) {
    auto [it, inserted] = set.insert(object);
    if (!inserted && !(*it == object)) {
      set.erase(it);
      set.insert(object);
    }
    return inserted;
  }

  struct QdiscKey {
    int ifindex;
    uint32_t parent;
    static QdiscKey Of(const kernel::Qdisc& q) { return {q.ifindex, q.parent}; }
    bool operator==(const QdiscKey&) const = default;
    template <typename H>
    friend H AbslHashValue(H h, const QdiscKey& k) {
      return H::combine(std::move(h), k.ifindex, k.parent);
    }
  };

  // Links by name: a set of pointers into links_'s nodes (which never
  // move), hashed and compared by the name in the node. A map from a copy
  // of each name was a 40-byte slot per link; this is 8.
  struct ByName {
    using is_transparent = void;
    static absl::string_view Of(absl::string_view name) { return name; }
    static absl::string_view Of(const kernel::LinkInfo* link) { return link->name; }
    template <typename T>
    size_t operator()(const T& x) const {
      return absl::Hash<absl::string_view>()(Of(x));
    }
    template <typename A, typename B>
    bool operator()(const A& a, const B& b) const {
      return Of(a) == Of(b);
    }
  };

  // The routes to one destination: a node per destination, found by the
  // destination of its routes (never empty while in the set), so the
  // destination is not stored a second time as a key. One route inline:
  // a node of 88 bytes (a map's slot and a heap vector of one route were
  // 176 bytes per route).
  struct Routes {
    mutable RouteList routes;  // the set's hash reads only their destination
    const IpPrefix& destination() const { return routes.front().destination; }
  };
  struct ByDestination {
    using is_transparent = void;
    static const IpPrefix& Of(const IpPrefix& p) { return p; }
    static const IpPrefix& Of(const Routes& r) { return r.destination(); }
    template <typename T>
    size_t operator()(const T& x) const {
      return absl::Hash<IpPrefix>()(Of(x));
    }
    template <typename A, typename B>
    bool operator()(const A& a, const B& b) const {
      return Of(a) == Of(b);
    }
  };

  // Traffic control (kernel_model_tc.cc).
  void ResetTc(const kernel::Snapshot& snapshot);
  // A qdisc or filter event; false for any other event.
  bool ApplyTcEvent(const kernel::Event& event, Touched* touched);
  void ApplyTcWrite(const kernel::Write& write);
  void ForgetTc(int ifindex);
  // Puts `q` in place of the qdisc at its (link, parent), if any.
  void ReplaceQdisc(const kernel::Qdisc& q);
  // Adds to `touched` the VM links whose ifb devices it names.
  void AddIfbOwners(Touched* touched) const;

  void UpsertLink(const kernel::LinkInfo& link);
  void RemoveLink(int ifindex);
  // What the kernel drops silently when a link goes down or away: its
  // routes and neighbour entries (proxy entries included); and when it goes
  // away, its addresses too. When its last IPv4 address goes, only the IPv4
  // ones (`ipv4_only`).
  void ForgetLinkObjects(int ifindex, bool addresses_too, bool ipv4_only = false);
  void AddAddress(const kernel::Address& a);
  void RemoveAddress(const kernel::Address& a);
  void AddRoute(const kernel::Route& r);
  void RemoveRoute(const kernel::Route& r);
  // Drops the route a replace overwrote (same table and metric).
  void ReplaceRoute(const kernel::Route& r);

  // A node per link: a flat map's slot would be a whole link (104 bytes),
  // with a third to a half of them empty after each doubling and old and
  // new slots held at once while it grows.
  absl::node_hash_map<int, kernel::LinkInfo> links_;
  absl::flat_hash_set<const kernel::LinkInfo*, ByName, ByName> link_by_name_;
  SetByKey<kernel::Address, AddressKey> addresses_;
  absl::flat_hash_map<IpAddress, int> local_address_count_;
  absl::flat_hash_map<int, int> ipv4_addresses_per_link_;
  absl::flat_hash_map<IpAddress, int> broadcast_count_;
  absl::node_hash_set<Routes, ByDestination, ByDestination> routes_;
  SetByKey<kernel::Neighbor, NeighborKey> neighbors_;
  std::optional<bool> ipv6_forwarding_all_;
  std::optional<std::string> nft_fingerprint_;
  bool nft_intact_ = false;
  NftElements nft_elements_;
  absl::flat_hash_map<int, IpAddress> link_local6_;
  // Nearly every link has a root qdisc (its default one): a node each.
  NodeSetByKey<kernel::Qdisc, QdiscKey> qdiscs_;
  absl::flat_hash_map<int, std::vector<kernel::TcFilter>> ingress_filters_;
  // ifb name -> the VM link it was created for (CreateIfb), so that its
  // RTM_NEWLINK plans that VM again.
  absl::flat_hash_map<std::string, std::string> ifb_owner_;
};

class KernelModel::ProxySet {
  friend class KernelModel;
  SetByKey<kernel::Neighbor, NeighborKey> entries_;
};

}  // namespace vmnet
