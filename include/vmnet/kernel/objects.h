// The kernel objects vmnet reads and writes, as small value types. Nothing
// above the kernel layer sees a netlink message or a libnl object.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "vmnet/kernel/nft_objects.h"
#include "vmnet/kernel/tc_objects.h"
#include "vmnet/net/address.h"

namespace vmnet::kernel {

// 64-bit link counters from the host's point of view (IFLA_STATS64).
struct LinkStats {
  uint64_t rx_bytes = 0, tx_bytes = 0;
  uint64_t rx_packets = 0, tx_packets = 0;
  uint64_t rx_errors = 0, tx_errors = 0;
  uint64_t rx_dropped = 0, tx_dropped = 0;
  bool operator==(const LinkStats&) const = default;
};

// The IPv6 settings of one link that vmnet looks at
// (net.ipv6.conf.<link>.*, from IFLA_AF_SPEC/AF_INET6/IFLA_INET6_CONF).
struct Ipv6Conf {
  bool forwarding = false;
  int accept_ra = 1;
  bool proxy_ndp = false;
  bool operator==(const Ipv6Conf&) const = default;
};

// A link as vmnet plans with it: all of a Link but its counters. The
// reconciler's model of the kernel keeps these, one per link (at 10,000 VM
// links the counters would be 640 KB that it never reads: the metrics
// scrape dumps the links itself). Members ordered to pack: 96 bytes.
struct LinkInfo {
  int ifindex = 0;
  bool up = false;        // administratively up (IFF_UP)
  bool loopback = false;  // IFF_LOOPBACK
  // net.ipv4.conf.<name>.forwarding, when the kernel reported it.
  std::optional<bool> ipv4_forwarding;
  std::string name;
  // Absent when IPv6 is off on the link (or in the kernel).
  std::optional<Ipv6Conf> ipv6;
  MacAddress mac;
  // IFLA_INFO_KIND ("veth", "ifb", ...); empty when the kernel gave none.
  std::string kind;

  bool operator==(const LinkInfo&) const = default;
  std::string ToString() const;
};

// A link as a dump or an event reports it.
struct Link : LinkInfo {
  LinkStats stats;

  bool operator==(const Link&) const = default;
};

// An address on an interface (RTM_NEWADDR).
struct Address {
  int ifindex = 0;
  IpPrefix prefix;
  uint8_t scope = 0;     // RT_SCOPE_*
  uint32_t flags = 0;    // IFA_F_*
  uint8_t protocol = 0;  // IFA_PROTO; 0 when unset

  bool operator==(const Address&) const = default;
  std::string ToString() const;
};

struct Route {
  IpPrefix destination;
  int ifindex = 0;       // 0 when the route has no single output link
  IpAddress gateway;     // family kNone for a direct route
  IpAddress source;      // preferred source; kNone when unset
  uint8_t protocol = 0;  // RTPROT_*
  uint8_t scope = 0;     // RT_SCOPE_*
  uint8_t type = 1;      // RTN_UNICAST
  uint32_t table = 254;  // RT_TABLE_MAIN
  uint32_t metric = 0;

  bool operator==(const Route&) const = default;
  std::string ToString() const;
};

// A neighbour entry (ARP/NDP), or a proxy entry when `proxy` is set.
struct Neighbor {
  int ifindex = 0;
  IpAddress address;
  bool proxy = false;  // NTF_PROXY: a published (proxy) entry
  std::optional<MacAddress> lladdr;
  uint16_t state = 0;    // NUD_*; meaningless for proxy entries
  uint8_t protocol = 0;  // NDA_PROTOCOL; 0 when unset

  bool operator==(const Neighbor&) const = default;
  std::string ToString() const;
};

// The kernel state vmnet looks at, from one full dump.
struct Snapshot {
  std::vector<Link> links;
  std::vector<Address> addresses;   // IPv4 and IPv6
  std::vector<Route> routes;        // IPv4 and IPv6, main table
  std::vector<Neighbor> neighbors;  // ARP and NDP, proxy entries included
  // net.ipv6.conf.all.forwarding; absent when the kernel has no IPv6.
  std::optional<bool> ipv6_forwarding_all;
  // vmnetd's nftables tables (port security); absent when not dumped or
  // when the kernel has no nftables.
  std::optional<NftSnapshot> port_security;
  // Root and ingress qdiscs of every link, and the filters of the ingress
  // qdiscs (traffic control: bandwidth limits).
  std::vector<Qdisc> qdiscs;
  std::vector<TcFilter> filters;
};

// Which tables a dump reads.
struct DumpSelection {
  bool links = true;
  bool addresses = true;
  bool routes = true;
  bool neighbors = true;      // ordinary neighbour entries (ARP and NDP)
  bool proxies = true;        // proxy entries (ARP and NDP)
  bool port_security = true;  // vmnetd's nftables tables
  bool tc = true;             // qdiscs and ingress filters

  static DumpSelection All() { return {}; }
  static DumpSelection Only(bool links, bool addresses, bool routes, bool neighbors,
                            bool proxies) {
    return {links, addresses, routes, neighbors, proxies, false, false};
  }
};

// Kernel writes. Each names its object completely, so that a failure message
// can say exactly what could not be done.
struct SetLinkUp {
  int ifindex = 0;
  std::string name;  // for messages only
  bool operator==(const SetLinkUp&) const = default;
};
struct SetIpv4Forwarding {
  int ifindex = 0;
  std::string name;  // for messages only
  bool enabled = true;
  bool operator==(const SetIpv4Forwarding&) const = default;
};
// An IPv6 setting of a link, or of "all" (ifindex 0), written through
// /proc/sys/net/ipv6/conf/<name>/<key>: the kernel takes these only there
// (rtnetlink sets no IPv6 devconf but the token and address generation
// mode).
struct SetIpv6Conf {
  enum class Key { kForwarding, kAcceptRa, kProxyNdp };
  int ifindex = 0;   // 0: all
  std::string name;  // the link, or "all"
  Key key = Key::kForwarding;
  int value = 0;
  bool operator==(const SetIpv6Conf&) const = default;
};
const char* Ipv6ConfKeyName(SetIpv6Conf::Key key);  // "forwarding", "accept_ra", ...

struct AddAddress {
  Address address;
  bool operator==(const AddAddress&) const = default;
};
struct DeleteAddress {
  Address address;
  bool operator==(const DeleteAddress&) const = default;
};
struct AddRoute {
  Route route;
  bool operator==(const AddRoute&) const = default;
};
struct DeleteRoute {
  Route route;
  bool operator==(const DeleteRoute&) const = default;
};
// Creates the entry, or replaces an entry at the same (ifindex, address).
// Proxy entries are only ever created (replace has no meaning for them).
struct SetNeighbor {
  Neighbor neighbor;
  bool operator==(const SetNeighbor&) const = default;
};
struct DeleteNeighbor {
  Neighbor neighbor;
  bool operator==(const DeleteNeighbor&) const = default;
};

// Deletes the connection-tracking entries whose original or reply source is
// the address (an address that left a VM: no flow or NAT binding follows it
// to its next owner). Nothing when the kernel tracks no connections here.
struct DeleteConntrack {
  IpAddress address;
  bool operator==(const DeleteConntrack&) const = default;
};

// The port-security writes (AddNftElement, DeleteNftElement,
// EnsurePortSecurityBase, DeletePortSecurityBase) are in nft_objects.h.
using Write =
    std::variant<SetLinkUp, SetIpv4Forwarding, SetIpv6Conf, AddAddress, DeleteAddress,
                 AddRoute, DeleteRoute, SetNeighbor, DeleteNeighbor, AddNftElement,
                 DeleteNftElement, EnsurePortSecurityBase, DeletePortSecurityBase,
                 DeleteConntrack, SetQdisc, DeleteQdisc, AddTcFilter, DeleteTcFilter,
                 CreateIfb, DeleteLink>;
// Whether the write is a traffic-control one (tc_objects.h).
bool IsTcWrite(const Write& write);
// Whether the write goes to nftables (one transaction per Apply), and the
// write as the nftables layer takes it.
bool IsNftWrite(const Write& write);
std::optional<NftWrite> AsNftWrite(const Write& write);
// The neighbour (or proxy) entry a SetNeighbor or DeleteNeighbor is about;
// null for any other write.
const Neighbor* NeighborOf(const Write& write);

std::string ToString(const Write& write);

// What a write is about, for metrics: link, address, route, proxy_neighbor,
// neighbor, port_security (vmnetd's nftables objects), conntrack, bandwidth
// (qdiscs, the ingress filter, ifb devices).
enum class ObjectKind {
  kLink = 0,
  kAddress,
  kRoute,
  kProxyNeighbor,
  kNeighbor,
  kPortSecurity,
  kConntrack,
  kBandwidth
};
constexpr int kObjectKinds = 8;
ObjectKind KindOf(const Write& write);
const char* ObjectKindName(ObjectKind kind);

// A change the kernel announced (or that a dump found).
struct LinkEvent {
  bool deleted = false;
  Link link;
};
struct AddressEvent {
  bool deleted = false;
  Address address;
};
struct RouteEvent {
  bool deleted = false;
  Route route;
  // NLM_F_REPLACE (`ip route replace`): the route took the place of the one
  // with the same table, destination and metric; no event says the old one
  // went.
  bool replaced = false;
};
struct NeighborEvent {
  bool deleted = false;
  Neighbor neighbor;
};
// A host-wide setting changed: net.ipv6.conf.all.forwarding (the
// RTM_NEWNETCONF of "all"). (A link's own settings come as a LinkEvent
// with the link read again.)
struct HostSettingsEvent {
  std::optional<bool> ipv6_forwarding_all;
};
// NftEvent (nft_objects.h): a change to vmnetd's nftables tables by
// someone else.
// QdiscEvent, TcFilterEvent (tc_objects.h): traffic control changed.
using Event = std::variant<LinkEvent, AddressEvent, RouteEvent, NeighborEvent, NftEvent,
                           QdiscEvent, TcFilterEvent, HostSettingsEvent>;

}  // namespace vmnet::kernel
