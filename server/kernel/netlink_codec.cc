#include "vmnet/kernel/netlink_codec.h"

#include <linux/if.h>
#include <linux/if_addr.h>
#include <linux/if_link.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/neighbour.h>
#include <linux/netconf.h>
#include <linux/rtnetlink.h>
#include <netlink/attr.h>
#include <netlink/msg.h>
#include <netlink/route/route.h>
#include <netlink/route/rtnl.h>
#include <sys/socket.h>

#include <array>
#include <cstring>
#include <memory>

#include "absl/strings/str_cat.h"
#include "request.h"
#include "vmnet/kernel/tc_codec.h"

namespace vmnet::kernel {
namespace {

// libnl's attribute parser validates lengths against these policies, so a
// short or oversized attribute from a broken message is rejected, not read.
struct Policies {
  nla_policy link[IFLA_MAX + 1] = {};
  nla_policy addr[IFA_MAX + 1] = {};
  nla_policy route[RTA_MAX + 1] = {};
  nla_policy neigh[NDA_MAX + 1] = {};

  Policies() {
    link[IFLA_IFNAME].type = NLA_STRING;
    link[IFLA_IFNAME].maxlen = IFNAMSIZ;
    link[IFLA_AF_SPEC].type = NLA_NESTED;
    link[IFLA_LINKINFO].type = NLA_NESTED;
    addr[IFA_FLAGS].type = NLA_U32;
    addr[IFA_PROTO].type = NLA_U8;
    route[RTA_OIF].type = NLA_U32;
    route[RTA_TABLE].type = NLA_U32;
    route[RTA_PRIORITY].type = NLA_U32;
    neigh[NDA_PROTOCOL].type = NLA_U8;
  }
};

const Policies& policies() {
  static const Policies p;
  return p;
}

std::optional<IpAddress> AddressAttr(const nlattr* attr, int family) {
  if (attr == nullptr) return std::nullopt;
  if (family == AF_INET && nla_len(attr) == 4) {
    return IpAddress::FromBytes(IpAddress::Family::kV4, nla_data(attr));
  }
  if (family == AF_INET6 && nla_len(attr) == 16) {
    return IpAddress::FromBytes(IpAddress::Family::kV6, nla_data(attr));
  }
  return std::nullopt;
}

std::optional<MacAddress> MacAttr(const nlattr* attr) {
  if (attr == nullptr || nla_len(attr) != 6) return std::nullopt;
  std::array<uint8_t, 6> bytes;
  std::memcpy(bytes.data(), nla_data(attr), 6);
  return MacAddress(bytes);
}

// The devconf array of one address family in IFLA_AF_SPEC (IFLA_INET_CONF,
// IFLA_INET6_CONF: 4-byte values), when the link has that family and the
// array holds at least `values` of them; null otherwise.
constexpr int kMaxDevconfAttr = 16;
static_assert(IFLA_INET_MAX <= kMaxDevconfAttr && IFLA_INET6_MAX <= kMaxDevconfAttr);

const char* DevconfArray(nlattr* af_spec, int family, int max_attr, int conf_attr,
                         int values) {
  if (af_spec == nullptr) return nullptr;
  nlattr* nest;
  int rem;
  nla_for_each_nested(nest, af_spec, rem) {
    if (nla_type(nest) != family) continue;
    std::array<nlattr*, kMaxDevconfAttr + 1> conf{};
    if (max_attr > kMaxDevconfAttr ||
        nla_parse_nested(conf.data(), max_attr, nest, nullptr) < 0) {
      return nullptr;
    }
    nlattr* array = conf[conf_attr];
    if (array == nullptr || nla_len(array) < values * 4) return nullptr;
    return static_cast<const char*>(nla_data(array));
  }
  return nullptr;
}

int32_t DevconfValue(const char* array, int index) {
  int32_t v;
  std::memcpy(&v, array + index * 4, 4);
  return v;
}

// net.ipv4.conf.<link>.forwarding: IFLA_INET_CONF is indexed by
// IPV4_DEVCONF_* - 1.
std::optional<bool> Ipv4Forwarding(nlattr* af_spec) {
  const char* conf = DevconfArray(af_spec, AF_INET, IFLA_INET_MAX, IFLA_INET_CONF,
                                  IPV4_DEVCONF_FORWARDING);
  if (conf == nullptr) return std::nullopt;
  return DevconfValue(conf, IPV4_DEVCONF_FORWARDING - 1) != 0;
}

// net.ipv6.conf.<link>.{forwarding,accept_ra,proxy_ndp}: IFLA_INET6_CONF is
// indexed by DEVCONF_*. Absent when the link has no IPv6.
std::optional<Ipv6Conf> Ipv6ConfOf(nlattr* af_spec) {
  const char* conf = DevconfArray(af_spec, AF_INET6, IFLA_INET6_MAX, IFLA_INET6_CONF,
                                  DEVCONF_PROXY_NDP + 1);
  if (conf == nullptr) return std::nullopt;
  Ipv6Conf out;
  out.forwarding = DevconfValue(conf, DEVCONF_FORWARDING) != 0;
  out.accept_ra = DevconfValue(conf, DEVCONF_ACCEPT_RA);
  out.proxy_ndp = DevconfValue(conf, DEVCONF_PROXY_NDP) != 0;
  return out;
}

}  // namespace

std::optional<Link> ParseLink(const nlmsghdr* msg) {
  if (msg->nlmsg_type != RTM_NEWLINK && msg->nlmsg_type != RTM_DELLINK) {
    return std::nullopt;
  }
  nlattr* tb[IFLA_MAX + 1] = {};
  auto* hdr = const_cast<nlmsghdr*>(msg);
  if (nlmsg_parse(hdr, sizeof(ifinfomsg), tb, IFLA_MAX,
                  const_cast<nla_policy*>(policies().link)) < 0) {
    return std::nullopt;
  }
  auto* ifi = static_cast<const ifinfomsg*>(nlmsg_data(hdr));
  Link link;
  link.ifindex = ifi->ifi_index;
  link.up = (ifi->ifi_flags & IFF_UP) != 0;
  link.loopback = (ifi->ifi_flags & IFF_LOOPBACK) != 0;
  if (tb[IFLA_IFNAME] != nullptr) {
    link.name = nla_get_string(tb[IFLA_IFNAME]);
  }
  if (auto mac = MacAttr(tb[IFLA_ADDRESS])) link.mac = *mac;
  if (tb[IFLA_STATS64] != nullptr &&
      nla_len(tb[IFLA_STATS64]) >= static_cast<int>(sizeof(rtnl_link_stats64))) {
    rtnl_link_stats64 s;
    std::memcpy(&s, nla_data(tb[IFLA_STATS64]), sizeof(s));
    link.stats = {s.rx_bytes,  s.tx_bytes,  s.rx_packets, s.tx_packets,
                  s.rx_errors, s.tx_errors, s.rx_dropped, s.tx_dropped};
  }
  link.ipv4_forwarding = Ipv4Forwarding(tb[IFLA_AF_SPEC]);
  link.ipv6 = Ipv6ConfOf(tb[IFLA_AF_SPEC]);
  if (tb[IFLA_LINKINFO] != nullptr) {
    nlattr* info[IFLA_INFO_MAX + 1] = {};
    if (nla_parse_nested(info, IFLA_INFO_MAX, tb[IFLA_LINKINFO], nullptr) >= 0 &&
        info[IFLA_INFO_KIND] != nullptr) {
      const char* kind = static_cast<const char*>(nla_data(info[IFLA_INFO_KIND]));
      link.kind.assign(kind,
                       strnlen(kind, static_cast<size_t>(nla_len(info[IFLA_INFO_KIND]))));
    }
  }
  if (link.ifindex <= 0 || link.name.empty()) return std::nullopt;
  return link;
}

std::optional<Address> ParseAddress(const nlmsghdr* msg) {
  if (msg->nlmsg_type != RTM_NEWADDR && msg->nlmsg_type != RTM_DELADDR) {
    return std::nullopt;
  }
  nlattr* tb[IFA_MAX + 1] = {};
  auto* hdr = const_cast<nlmsghdr*>(msg);
  if (nlmsg_parse(hdr, sizeof(ifaddrmsg), tb, IFA_MAX,
                  const_cast<nla_policy*>(policies().addr)) < 0) {
    return std::nullopt;
  }
  auto* ifa = static_cast<const ifaddrmsg*>(nlmsg_data(hdr));
  // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on
  // point-to-point links and equal to IFA_LOCAL otherwise.
  auto local =
      AddressAttr(tb[IFA_LOCAL] ? tb[IFA_LOCAL] : tb[IFA_ADDRESS], ifa->ifa_family);
  if (!local || ifa->ifa_prefixlen > local->bit_length()) return std::nullopt;
  Address a;
  a.ifindex = static_cast<int>(ifa->ifa_index);
  a.prefix = {*local, ifa->ifa_prefixlen};
  a.scope = ifa->ifa_scope;
  a.flags = tb[IFA_FLAGS] ? nla_get_u32(tb[IFA_FLAGS]) : ifa->ifa_flags;
  a.protocol = tb[IFA_PROTO] ? nla_get_u8(tb[IFA_PROTO]) : 0;
  return a;
}

std::optional<Route> ParseRoute(const nlmsghdr* msg) {
  if (msg->nlmsg_type != RTM_NEWROUTE && msg->nlmsg_type != RTM_DELROUTE) {
    return std::nullopt;
  }
  nlattr* tb[RTA_MAX + 1] = {};
  auto* hdr = const_cast<nlmsghdr*>(msg);
  if (nlmsg_parse(hdr, sizeof(rtmsg), tb, RTA_MAX,
                  const_cast<nla_policy*>(policies().route)) < 0) {
    return std::nullopt;
  }
  auto* rtm = static_cast<const rtmsg*>(nlmsg_data(hdr));
  if (rtm->rtm_family != AF_INET && rtm->rtm_family != AF_INET6) {
    return std::nullopt;
  }
  Route r;
  IpAddress::Family family =
      rtm->rtm_family == AF_INET ? IpAddress::Family::kV4 : IpAddress::Family::kV6;
  std::array<uint8_t, 16> zero{};
  IpAddress dst = IpAddress::FromBytes(family, zero.data());
  if (tb[RTA_DST] != nullptr) {
    auto parsed = AddressAttr(tb[RTA_DST], rtm->rtm_family);
    if (!parsed) return std::nullopt;
    dst = *parsed;
  }
  if (rtm->rtm_dst_len > dst.bit_length()) return std::nullopt;
  r.destination = {dst, rtm->rtm_dst_len};
  if (tb[RTA_OIF]) r.ifindex = static_cast<int>(nla_get_u32(tb[RTA_OIF]));
  if (auto gw = AddressAttr(tb[RTA_GATEWAY], rtm->rtm_family)) r.gateway = *gw;
  if (auto src = AddressAttr(tb[RTA_PREFSRC], rtm->rtm_family)) r.source = *src;
  r.protocol = rtm->rtm_protocol;
  r.scope = rtm->rtm_scope;
  r.type = rtm->rtm_type;
  r.table = tb[RTA_TABLE] ? nla_get_u32(tb[RTA_TABLE]) : rtm->rtm_table;
  r.metric = tb[RTA_PRIORITY] ? nla_get_u32(tb[RTA_PRIORITY]) : 0;
  return r;
}

std::optional<Neighbor> ParseNeighbor(const nlmsghdr* msg) {
  if (msg->nlmsg_type != RTM_NEWNEIGH && msg->nlmsg_type != RTM_DELNEIGH) {
    return std::nullopt;
  }
  nlattr* tb[NDA_MAX + 1] = {};
  auto* hdr = const_cast<nlmsghdr*>(msg);
  if (nlmsg_parse(hdr, sizeof(ndmsg), tb, NDA_MAX,
                  const_cast<nla_policy*>(policies().neigh)) < 0) {
    return std::nullopt;
  }
  auto* ndm = static_cast<const ndmsg*>(nlmsg_data(hdr));
  auto dst = AddressAttr(tb[NDA_DST], ndm->ndm_family);
  if (!dst) return std::nullopt;
  Neighbor n;
  n.ifindex = ndm->ndm_ifindex;
  n.address = *dst;
  n.proxy = (ndm->ndm_flags & NTF_PROXY) != 0;
  n.lladdr = MacAttr(tb[NDA_LLADDR]);
  n.state = ndm->ndm_state;
  n.protocol = tb[NDA_PROTOCOL] ? nla_get_u8(tb[NDA_PROTOCOL]) : 0;
  return n;
}

std::optional<SettingsChanged> ParseSettingsChanged(const nlmsghdr* msg) {
  auto* hdr = const_cast<nlmsghdr*>(msg);
  if (msg->nlmsg_type == RTM_NEWLINK) {
    if (msg->nlmsg_len < NLMSG_LENGTH(sizeof(ifinfomsg))) return std::nullopt;
    auto* ifi = static_cast<const ifinfomsg*>(nlmsg_data(hdr));
    if (ifi->ifi_family != AF_INET6 || ifi->ifi_index <= 0) return std::nullopt;
    return SettingsChanged{ifi->ifi_index, std::nullopt};
  }
  if (msg->nlmsg_type != RTM_NEWNETCONF && msg->nlmsg_type != RTM_DELNETCONF) {
    return std::nullopt;
  }
  static const std::array<nla_policy, NETCONFA_MAX + 1> policy = [] {
    std::array<nla_policy, NETCONFA_MAX + 1> p{};
    p[NETCONFA_IFINDEX].type = NLA_S32;
    p[NETCONFA_FORWARDING].type = NLA_S32;
    return p;
  }();
  nlattr* tb[NETCONFA_MAX + 1] = {};
  if (nlmsg_parse(hdr, sizeof(netconfmsg), tb, NETCONFA_MAX,
                  const_cast<nla_policy*>(policy.data())) < 0 ||
      tb[NETCONFA_IFINDEX] == nullptr) {
    return std::nullopt;
  }
  auto* ncm = static_cast<const netconfmsg*>(nlmsg_data(hdr));
  int ifindex = nla_get_s32(tb[NETCONFA_IFINDEX]);
  if (ifindex > 0) return SettingsChanged{ifindex, std::nullopt};
  if (ifindex == NETCONFA_IFINDEX_ALL && ncm->ncm_family == AF_INET6 &&
      tb[NETCONFA_FORWARDING] != nullptr) {
    return SettingsChanged{0, nla_get_s32(tb[NETCONFA_FORWARDING]) != 0};
  }
  return std::nullopt;
}

std::optional<Event> ParseEvent(const nlmsghdr* msg) {
  switch (msg->nlmsg_type) {
    case RTM_NEWLINK:
    case RTM_DELLINK:
      if (auto link = ParseLink(msg)) {
        return LinkEvent{msg->nlmsg_type == RTM_DELLINK, std::move(*link)};
      }
      break;
    case RTM_NEWADDR:
    case RTM_DELADDR:
      if (auto a = ParseAddress(msg)) {
        return AddressEvent{msg->nlmsg_type == RTM_DELADDR, *a};
      }
      break;
    case RTM_NEWROUTE:
    case RTM_DELROUTE:
      if (auto r = ParseRoute(msg)) {
        return RouteEvent{
            msg->nlmsg_type == RTM_DELROUTE, *r,
            msg->nlmsg_type == RTM_NEWROUTE && (msg->nlmsg_flags & NLM_F_REPLACE) != 0};
      }
      break;
    case RTM_NEWNEIGH:
    case RTM_DELNEIGH:
      if (auto n = ParseNeighbor(msg)) {
        return NeighborEvent{msg->nlmsg_type == RTM_DELNEIGH, *n};
      }
      break;
    default:
      return ParseTcEvent(msg);
  }
  return std::nullopt;
}

namespace {

using request::Bytes;
using request::Msg;
using request::NewMessage;

int FamilyOf(const IpAddress& a) { return a.is_v6() ? AF_INET6 : AF_INET; }

void PutAddress(nl_msg* msg, int type, const IpAddress& a) {
  nla_put(msg, type, static_cast<int>(a.size()), a.bytes());
}

Msg EncodeLinkChange(int ifindex, unsigned flags, unsigned change) {
  ifinfomsg ifi{};
  ifi.ifi_family = AF_UNSPEC;
  ifi.ifi_index = ifindex;
  ifi.ifi_flags = flags;
  ifi.ifi_change = change;
  return NewMessage(RTM_NEWLINK, 0, &ifi, sizeof(ifi));
}

Msg Encode(const SetLinkUp& w) { return EncodeLinkChange(w.ifindex, IFF_UP, IFF_UP); }

Msg Encode(const SetIpv4Forwarding& w) {
  Msg msg = EncodeLinkChange(w.ifindex, 0, 0);
  nlattr* af_spec = nla_nest_start(msg.get(), IFLA_AF_SPEC);
  nlattr* inet = nla_nest_start(msg.get(), AF_INET);
  nlattr* conf = nla_nest_start(msg.get(), IFLA_INET_CONF);
  nla_put_u32(msg.get(), IPV4_DEVCONF_FORWARDING, w.enabled ? 1 : 0);
  nla_nest_end(msg.get(), conf);
  nla_nest_end(msg.get(), inet);
  nla_nest_end(msg.get(), af_spec);
  return msg;
}

Msg EncodeAddress(int type, int flags, const Address& a) {
  ifaddrmsg ifa{};
  ifa.ifa_family = static_cast<uint8_t>(FamilyOf(a.prefix.address));
  ifa.ifa_prefixlen = static_cast<uint8_t>(a.prefix.length);
  ifa.ifa_scope = a.scope;
  ifa.ifa_index = static_cast<uint32_t>(a.ifindex);
  Msg msg = NewMessage(type, flags, &ifa, sizeof(ifa));
  PutAddress(msg.get(), IFA_LOCAL, a.prefix.address);
  PutAddress(msg.get(), IFA_ADDRESS, a.prefix.address);
  if (type == RTM_NEWADDR) {
    nla_put_u32(msg.get(), IFA_FLAGS, a.flags);
    if (a.protocol != 0) nla_put_u8(msg.get(), IFA_PROTO, a.protocol);
  }
  return msg;
}

Msg Encode(const AddAddress& w) {
  return EncodeAddress(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, w.address);
}

Msg Encode(const DeleteAddress& w) { return EncodeAddress(RTM_DELADDR, 0, w.address); }

Msg EncodeRoute(int type, int flags, const Route& r) {
  rtmsg rtm{};
  rtm.rtm_family = static_cast<uint8_t>(FamilyOf(r.destination.address));
  rtm.rtm_dst_len = static_cast<uint8_t>(r.destination.length);
  rtm.rtm_table =
      r.table < 256 ? static_cast<uint8_t>(r.table) : uint8_t{RT_TABLE_UNSPEC};
  rtm.rtm_protocol = r.protocol;
  rtm.rtm_scope = r.scope;
  rtm.rtm_type = r.type;
  Msg msg = NewMessage(type, flags, &rtm, sizeof(rtm));
  PutAddress(msg.get(), RTA_DST, r.destination.address);
  nla_put_u32(msg.get(), RTA_TABLE, r.table);
  if (r.ifindex != 0) nla_put_u32(msg.get(), RTA_OIF, static_cast<uint32_t>(r.ifindex));
  if (r.gateway.family() != IpAddress::Family::kNone) {
    PutAddress(msg.get(), RTA_GATEWAY, r.gateway);
  }
  if (r.metric != 0) nla_put_u32(msg.get(), RTA_PRIORITY, r.metric);
  return msg;
}

Msg Encode(const AddRoute& w) {
  return EncodeRoute(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, w.route);
}

// A delete names the protocol too: the kernel then removes the route only if
// it carries that protocol, so a route someone else put in its place since
// our last look is never removed by mistake.
Msg Encode(const DeleteRoute& w) { return EncodeRoute(RTM_DELROUTE, 0, w.route); }

Msg EncodeNeighbor(int type, int flags, const Neighbor& n) {
  ndmsg ndm{};
  ndm.ndm_family = static_cast<uint8_t>(FamilyOf(n.address));
  ndm.ndm_ifindex = n.ifindex;
  ndm.ndm_state = n.proxy ? NUD_PERMANENT : n.state;
  ndm.ndm_flags = n.proxy ? NTF_PROXY : 0;
  Msg msg = NewMessage(type, flags, &ndm, sizeof(ndm));
  PutAddress(msg.get(), NDA_DST, n.address);
  if (type == RTM_NEWNEIGH) {
    if (n.lladdr && !n.proxy) nla_put(msg.get(), NDA_LLADDR, 6, n.lladdr->bytes());
    if (n.protocol != 0) nla_put_u8(msg.get(), NDA_PROTOCOL, n.protocol);
  }
  return msg;
}

Msg Encode(const SetNeighbor& w) {
  int flags = NLM_F_CREATE | (w.neighbor.proxy ? NLM_F_EXCL : NLM_F_REPLACE);
  return EncodeNeighbor(RTM_NEWNEIGH, flags, w.neighbor);
}

Msg Encode(const DeleteNeighbor& w) {
  return EncodeNeighbor(RTM_DELNEIGH, 0, w.neighbor);
}

}  // namespace

std::vector<uint8_t> EncodeGetLink(int ifindex) {
  ifinfomsg ifi{};
  ifi.ifi_family = AF_UNSPEC;
  ifi.ifi_index = ifindex;
  return Bytes(NewMessage(RTM_GETLINK, 0, &ifi, sizeof(ifi)));
}

std::vector<uint8_t> EncodeGetProxy(const Neighbor& proxy) {
  ndmsg ndm{};
  ndm.ndm_family = static_cast<uint8_t>(FamilyOf(proxy.address));
  ndm.ndm_ifindex = proxy.ifindex;
  ndm.ndm_flags = NTF_PROXY;
  Msg msg = NewMessage(RTM_GETNEIGH, 0, &ndm, sizeof(ndm));
  PutAddress(msg.get(), NDA_DST, proxy.address);
  return Bytes(msg);
}

std::vector<uint8_t> EncodeWrite(const Write& write) {
  return std::visit(
      [](const auto& w) {
        using T = std::decay_t<decltype(w)>;
        if constexpr (std::is_same_v<T, SetIpv6Conf> ||
                      std::is_same_v<T, AddNftElement> ||
                      std::is_same_v<T, DeleteNftElement> ||
                      std::is_same_v<T, EnsurePortSecurityBase> ||
                      std::is_same_v<T, DeletePortSecurityBase> ||
                      std::is_same_v<T, DeleteConntrack>) {
          return std::vector<uint8_t>();  // not an rtnetlink message: see objects.h
        } else if constexpr (std::is_same_v<T, SetQdisc> ||
                             std::is_same_v<T, DeleteQdisc> ||
                             std::is_same_v<T, AddTcFilter> ||
                             std::is_same_v<T, DeleteTcFilter> ||
                             std::is_same_v<T, CreateIfb> ||
                             std::is_same_v<T, DeleteLink>) {
          return EncodeTcWrite(w);
        } else {
          return Bytes(Encode(w));
        }
      },
      write);
}

std::string RouteProtocolName(uint8_t protocol) {
  char buf[64];
  return rtnl_route_proto2str(protocol, buf, sizeof(buf));
}

std::string RouteScopeName(uint8_t scope) {
  switch (scope) {
    case RT_SCOPE_UNIVERSE:
      return "global";
    case RT_SCOPE_SITE:
      return "site";
    case RT_SCOPE_LINK:
      return "link";
    case RT_SCOPE_HOST:
      return "host";
    case RT_SCOPE_NOWHERE:
      return "nowhere";
    default:
      return absl::StrCat(scope);
  }
}

std::string RouteTableName(uint32_t table) {
  char buf[64];
  return rtnl_route_table2str(static_cast<int>(table), buf, sizeof(buf));
}

std::string RouteTypeName(uint8_t type) {
  char buf[64];
  return nl_rtntype2str(type, buf, sizeof(buf));
}

}  // namespace vmnet::kernel
