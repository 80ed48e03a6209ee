#include "vmnet/kernel/objects.h"

#include <linux/neighbour.h>

#include "absl/strings/str_cat.h"
#include "vmnet/kernel/netlink_codec.h"

namespace vmnet::kernel {
namespace {

std::string Dev(int ifindex) { return absl::StrCat("dev #", ifindex); }

}  // namespace

std::string LinkInfo::ToString() const {
  return absl::StrCat("link ", name, " (#", ifindex, ", ", up ? "up" : "down", ")");
}

std::string Address::ToString() const {
  return absl::StrCat("address ", prefix.ToString(), " ", Dev(ifindex), " scope ",
                      RouteScopeName(scope), " proto ", static_cast<int>(protocol));
}

std::string Route::ToString() const {
  std::string s = absl::StrCat("route ", destination.ToString());
  if (gateway.family() != IpAddress::Family::kNone) {
    absl::StrAppend(&s, " via ", gateway.ToString());
  }
  if (ifindex != 0) absl::StrAppend(&s, " ", Dev(ifindex));
  absl::StrAppend(&s, " table ", RouteTableName(table), " proto ",
                  static_cast<int>(protocol), " scope ", RouteScopeName(scope));
  if (metric != 0) absl::StrAppend(&s, " metric ", metric);
  return s;
}

std::string Neighbor::ToString() const {
  if (proxy) {
    return absl::StrCat("proxy neighbour ", address.ToString(), " ", Dev(ifindex),
                        " proto ", static_cast<int>(protocol));
  }
  return absl::StrCat("neighbour ", address.ToString(), " ", Dev(ifindex), " lladdr ",
                      lladdr ? lladdr->ToString() : "none",
                      (state & NUD_PERMANENT) ? " permanent" : "", " proto ",
                      static_cast<int>(protocol));
}

namespace {

struct WriteNamer {
  std::string operator()(const SetLinkUp& w) const {
    return absl::StrCat("set link ", w.name, " (#", w.ifindex, ") up");
  }
  std::string operator()(const SetIpv4Forwarding& w) const {
    return absl::StrCat("set ipv4 forwarding ", w.enabled ? "on" : "off", " on link ",
                        w.name, " (#", w.ifindex, ")");
  }
  std::string operator()(const SetIpv6Conf& w) const {
    return absl::StrCat("set net.ipv6.conf.", w.name, ".", Ipv6ConfKeyName(w.key), "=",
                        w.value);
  }
  std::string operator()(const AddAddress& w) const {
    return "add " + w.address.ToString();
  }
  std::string operator()(const DeleteAddress& w) const {
    return "delete " + w.address.ToString();
  }
  std::string operator()(const AddRoute& w) const { return "add " + w.route.ToString(); }
  std::string operator()(const DeleteRoute& w) const {
    return "delete " + w.route.ToString();
  }
  std::string operator()(const SetNeighbor& w) const {
    return "set " + w.neighbor.ToString();
  }
  std::string operator()(const DeleteNeighbor& w) const {
    return "delete " + w.neighbor.ToString();
  }
  std::string operator()(const AddNftElement& w) const { return ToString(NftWrite(w)); }
  std::string operator()(const DeleteNftElement& w) const {
    return ToString(NftWrite(w));
  }
  std::string operator()(const EnsurePortSecurityBase& w) const {
    return ToString(NftWrite(w));
  }
  std::string operator()(const DeletePortSecurityBase& w) const {
    return ToString(NftWrite(w));
  }
  std::string operator()(const DeleteConntrack& w) const {
    return "delete conntrack entries of " + w.address.ToString();
  }
  std::string operator()(const SetQdisc& w) const {
    return "replace " + w.qdisc.ToString();
  }
  std::string operator()(const DeleteQdisc& w) const {
    return "delete " + w.qdisc.ToString();
  }
  std::string operator()(const AddTcFilter& w) const {
    return "add " + w.filter.ToString();
  }
  std::string operator()(const DeleteTcFilter& w) const {
    return "delete " + w.filter.ToString();
  }
  std::string operator()(const CreateIfb& w) const {
    return absl::StrCat("create ifb link ", w.name, " for ", w.vm_link, " with tbf rate ",
                        w.tbf.rate_bytes_per_second * 8, "bit burst ", w.tbf.burst_bytes,
                        "b, and redirect dev #", w.redirect.ifindex, " to it");
  }
  std::string operator()(const DeleteLink& w) const {
    return absl::StrCat("delete link ", w.name, " (#", w.ifindex, ")");
  }
};

}  // namespace

const char* Ipv6ConfKeyName(SetIpv6Conf::Key key) {
  switch (key) {
    case SetIpv6Conf::Key::kForwarding:
      return "forwarding";
    case SetIpv6Conf::Key::kAcceptRa:
      return "accept_ra";
    case SetIpv6Conf::Key::kProxyNdp:
      return "proxy_ndp";
  }
  return "unknown";
}

std::string ToString(const Write& write) { return std::visit(WriteNamer{}, write); }

bool IsNftWrite(const Write& write) {
  return std::holds_alternative<AddNftElement>(write) ||
         std::holds_alternative<DeleteNftElement>(write) ||
         std::holds_alternative<EnsurePortSecurityBase>(write) ||
         std::holds_alternative<DeletePortSecurityBase>(write);
}

std::optional<NftWrite> AsNftWrite(const Write& write) {
  if (const auto* w = std::get_if<AddNftElement>(&write)) return NftWrite(*w);
  if (const auto* w = std::get_if<DeleteNftElement>(&write)) return NftWrite(*w);
  if (const auto* w = std::get_if<EnsurePortSecurityBase>(&write)) return NftWrite(*w);
  if (const auto* w = std::get_if<DeletePortSecurityBase>(&write)) return NftWrite(*w);
  return std::nullopt;
}

bool IsTcWrite(const Write& write) {
  return std::holds_alternative<SetQdisc>(write) ||
         std::holds_alternative<DeleteQdisc>(write) ||
         std::holds_alternative<AddTcFilter>(write) ||
         std::holds_alternative<DeleteTcFilter>(write) ||
         std::holds_alternative<CreateIfb>(write) ||
         std::holds_alternative<DeleteLink>(write);
}

ObjectKind KindOf(const Write& write) {
  if (IsNftWrite(write)) return ObjectKind::kPortSecurity;
  if (IsTcWrite(write)) return ObjectKind::kBandwidth;
  if (std::holds_alternative<DeleteConntrack>(write)) return ObjectKind::kConntrack;
  if (std::holds_alternative<SetLinkUp>(write) ||
      std::holds_alternative<SetIpv4Forwarding>(write) ||
      std::holds_alternative<SetIpv6Conf>(write)) {
    return ObjectKind::kLink;
  }
  if (std::holds_alternative<AddAddress>(write) ||
      std::holds_alternative<DeleteAddress>(write)) {
    return ObjectKind::kAddress;
  }
  if (std::holds_alternative<AddRoute>(write) ||
      std::holds_alternative<DeleteRoute>(write)) {
    return ObjectKind::kRoute;
  }
  return NeighborOf(write)->proxy ? ObjectKind::kProxyNeighbor : ObjectKind::kNeighbor;
}

const Neighbor* NeighborOf(const Write& write) {
  if (const auto* set = std::get_if<SetNeighbor>(&write)) return &set->neighbor;
  if (const auto* del = std::get_if<DeleteNeighbor>(&write)) return &del->neighbor;
  return nullptr;
}

const char* ObjectKindName(ObjectKind kind) {
  switch (kind) {
    case ObjectKind::kLink:
      return "link";
    case ObjectKind::kAddress:
      return "address";
    case ObjectKind::kRoute:
      return "route";
    case ObjectKind::kProxyNeighbor:
      return "proxy_neighbor";
    case ObjectKind::kNeighbor:
      return "neighbor";
    case ObjectKind::kPortSecurity:
      return "port_security";
    case ObjectKind::kConntrack:
      return "conntrack";
    case ObjectKind::kBandwidth:
      return "bandwidth";
  }
  return "unknown";
}

}  // namespace vmnet::kernel
