#include "vmnet/reconciler/plan.h"

#include <linux/if_addr.h>
#include <linux/neighbour.h>
#include <linux/rtnetlink.h>

#include <algorithm>
#include <set>

#include "absl/strings/str_cat.h"
#include "vmnet/reconciler/plan_bandwidth.h"

namespace vmnet {

using kernel::Address;
using Link = kernel::LinkInfo;  // a link as the model keeps it
using kernel::Neighbor;
using kernel::Route;

namespace {

// The gateway is a /32 address on each VM link rather than one address on
// lo: on lo the host would also answer ARP for the gateway on the uplinks,
// and a proxy entry for it would need a route to the gateway through
// another link, which a host without a default route lacks. The per-link
// cost (measured in ../shared/guide/host-routed.md) is paid once per VM.
Address GatewayAddress(int ifindex, const IpAddress& gateway, const HostConfig& config) {
  Address a;
  a.ifindex = ifindex;
  a.prefix = IpPrefix::Host(gateway);
  a.scope = RT_SCOPE_LINK;
  a.flags = IFA_F_NOPREFIXROUTE | IFA_F_PERMANENT;
  // The IPv6 gateway answers at once: no duplicate address detection (each
  // VM link is a point-to-point segment of the host's own).
  if (gateway.is_v6()) a.flags |= IFA_F_NODAD;
  a.protocol = config.protocol;
  return a;
}

void PlanGateway(const Link& link, const IpAddress& gateway, const KernelModel& model,
                 const HostConfig& config, VmPlan* plan) {
  Address want = GatewayAddress(link.ifindex, gateway, config);
  // Any gateway address on the link answers the VM, ours or not.
  if (model.FindAddress(link.ifindex, want.prefix) == nullptr) {
    plan->writes.push_back(kernel::AddAddress{want});
  }
}

void RemoveGateway(const Link& link, const IpAddress& gateway, const KernelModel& model,
                   const HostConfig& config, std::vector<kernel::Write>* writes) {
  const Address* have = model.FindAddress(link.ifindex, IpPrefix::Host(gateway));
  if (have != nullptr && have->protocol == config.protocol) {
    writes->push_back(kernel::DeleteAddress{*have});
  }
}

kernel::SetIpv6Conf Ipv6Conf(const Link& link, kernel::SetIpv6Conf::Key key, int value) {
  return {link.ifindex, link.name, key, value};
}

// The kernel gives an IPv6 route without a metric 1024 (IP6_RT_PRIO_USER).
constexpr uint32_t kIpv6RouteMetric = 1024;

Route VmRoute(const IpAddress& address, int ifindex, const HostConfig& config) {
  Route r;
  r.destination = IpPrefix::Host(address);
  r.ifindex = ifindex;
  r.protocol = config.protocol;
  r.scope = RT_SCOPE_LINK;
  r.type = RTN_UNICAST;
  r.table = RT_TABLE_MAIN;
  if (address.is_v6()) {
    // The kernel keeps no scope on IPv6 routes: it reports "global" for all.
    r.scope = RT_SCOPE_UNIVERSE;
    r.metric = kIpv6RouteMetric;
  }
  return r;
}

Neighbor ProxyEntry(const IpAddress& address, int ifindex, const HostConfig& config) {
  Neighbor n;
  n.ifindex = ifindex;
  n.address = address;
  n.proxy = true;
  n.protocol = config.protocol;
  return n;
}

Neighbor VmNeighbor(const IpAddress& address, int ifindex, const MacAddress& mac,
                    const HostConfig& config) {
  Neighbor n;
  n.ifindex = ifindex;
  n.address = address;
  n.lladdr = mac;
  n.state = NUD_PERMANENT;
  n.protocol = config.protocol;
  return n;
}

void Conflict(VmPlan* plan, std::string what) {
  if (plan->state != VmState::kFailed) {
    plan->state = VmState::kFailed;
    plan->message = std::move(what);
  }
}

void PlanRoute(const IpAddress& address, const Link& link, const KernelModel& model,
               const HostConfig& config, VmPlan* plan) {
  Route want = VmRoute(address, link.ifindex, config);
  bool present = false;
  if (const auto* routes = model.RoutesTo(want.destination)) {
    for (const Route& r : *routes) {
      if (r.protocol != config.protocol) {
        Conflict(plan, absl::StrCat(r.ToString(),
                                    " is not vmnetd's and stands where the "
                                    "route to the VM must be; remove it"));
        return;
      }
      if (r.ifindex == link.ifindex && r.metric == want.metric && r.scope == want.scope &&
          r.type == want.type && r.gateway.family() == IpAddress::Family::kNone) {
        present = true;
      } else {
        plan->writes.push_back(kernel::DeleteRoute{r});  // ours, but wrong
      }
    }
  }
  if (!present) plan->writes.push_back(kernel::AddRoute{want});
}

void PlanNeighbor(const IpAddress& address, const Link& link, const MacAddress& mac,
                  const KernelModel& model, const HostConfig& config, VmPlan* plan) {
  Neighbor want = VmNeighbor(address, link.ifindex, mac, config);
  const Neighbor* have = model.FindNeighbor(link.ifindex, address, false);
  if (have != nullptr && have->lladdr == want.lladdr && (have->state & NUD_PERMANENT) &&
      have->protocol == config.protocol) {
    return;
  }
  // A permanent entry someone else set is theirs; a learned (dynamic) entry
  // is the kernel's cache and is replaced by ours.
  if (have != nullptr && (have->state & NUD_PERMANENT) &&
      have->protocol != config.protocol) {
    Conflict(plan, absl::StrCat(have->ToString(),
                                " is not vmnetd's and stands where the VM's "
                                "neighbour entry must be; remove it"));
    return;
  }
  plan->writes.push_back(kernel::SetNeighbor{want});
}

void PlanPortSecurity(const VmSpec& spec, const KernelModel& model,
                      const HostConfig& config, VmPlan* plan) {
  if (!config.port_security) {
    // A limit stored before port security was turned off: new ones are
    // refused (FAILED_PRECONDITION), this one can only be said not to hold.
    if (spec.bandwidth.egress_packets_per_second != 0) {
      Conflict(plan, absl::StrCat("bandwidth.egress_packets_per_second (",
                                  spec.bandwidth.egress_packets_per_second,
                                  "/s) is not enforced: port security, whose ruleset "
                                  "holds packet-rate limits, is off on this host"));
    }
    return;
  }
  for (kernel::NftElement& e : PortSecurityElements(spec)) {
    if (!model.HasNftElement(e, *config.port_security)) {
      plan->writes.push_back(kernel::AddNftElement{std::move(e)});
    }
  }
}

}  // namespace

std::vector<kernel::NftElement> PortSecurityElements(const VmSpec& spec) {
  std::set<kernel::NftElement> out;
  out.insert(kernel::NftVmLink{spec.interface});
  for (const IpAddress& a : spec.addresses) {
    out.insert(kernel::NftSourcePrefix{spec.interface, IpPrefix::Host(a)});
    if (a.is_v4()) out.insert(kernel::NftArpSender{spec.interface, a});
  }
  for (const IpPrefix& p : kernel::NonOverlappingPrefixes(spec.allowed_source_prefixes)) {
    out.insert(kernel::NftSourcePrefix{spec.interface, p});
  }
  if (spec.bandwidth.egress_packets_per_second != 0) {
    out.insert(kernel::MakePacketRateLimit(spec.interface,
                                           spec.bandwidth.egress_packets_per_second));
  }
  return {out.begin(), out.end()};
}

bool ReplacedByWanted(const kernel::NftElement& e,
                      const std::vector<kernel::NftElement>& wanted) {
  const auto* limit = std::get_if<kernel::NftPacketRateLimit>(&e);
  if (limit == nullptr) return false;
  return std::any_of(wanted.begin(), wanted.end(), [&](const kernel::NftElement& w) {
    const auto* l = std::get_if<kernel::NftPacketRateLimit>(&w);
    return l != nullptr && l->ifname == limit->ifname;
  });
}

VmPlan PlanVm(const VmSpec& spec, const KernelModel& model, const HostConfig& config) {
  VmPlan plan;
  const Link* link = model.LinkByName(spec.interface);
  if (link == nullptr) {
    plan.state = VmState::kPending;
    plan.message = absl::StrCat("interface ", spec.interface, " does not exist yet");
    // A pending VM publishes nothing: a proxy entry for an address the host
    // has no route to would draw the LAN's traffic into a black hole. They
    // come back, announced, when the link does.
    for (const IpAddress& address : spec.addresses) {
      for (const std::string& uplink_name : config.uplinks) {
        const Link* uplink = model.LinkByName(uplink_name);
        if (uplink == nullptr) continue;
        const Neighbor* n = model.FindNeighbor(uplink->ifindex, address, true);
        if (n != nullptr && n->protocol == config.protocol) {
          plan.writes.push_back(kernel::DeleteNeighbor{*n});
        }
      }
    }
    return plan;
  }
  // The filter first: whatever else fails below, a link vmnetd brings up
  // is a filtered one.
  PlanPortSecurity(spec, model, config, &plan);
  if (!link->up) plan.writes.push_back(kernel::SetLinkUp{link->ifindex, link->name});
  if (link->ipv4_forwarding != true) {
    plan.writes.push_back(kernel::SetIpv4Forwarding{link->ifindex, link->name, true});
  }
  PlanGateway(*link, config.gateway, model, config, &plan);
  PlanBandwidth(spec, *link, model, &plan);
  if (spec.has_ipv6()) {
    if (!link->ipv6) {
      Conflict(&plan, absl::StrCat("interface ", link->name,
                                   " has no IPv6 (disabled, or an MTU below 1280)"));
      return plan;
    }
    // The host is the VM's router: no router advertisements from the VM.
    if (link->ipv6->accept_ra != 0) {
      plan.writes.push_back(Ipv6Conf(*link, kernel::SetIpv6Conf::Key::kAcceptRa, 0));
    }
    PlanGateway(*link, config.gateway6, model, config, &plan);
  } else {
    // Ours from when the spec had IPv6 (a restart may come between the
    // durable spec change and its kernel write).
    RemoveGateway(*link, config.gateway6, model, config, &plan.writes);
  }
  for (const IpAddress& address : spec.addresses) {
    PlanRoute(address, *link, model, config, &plan);
    for (const std::string& uplink_name : config.uplinks) {
      const Link* uplink = model.LinkByName(uplink_name);
      if (uplink == nullptr) continue;
      // Someone else's proxy entry is theirs: DetachVm would delete it if
      // vmnetd took it over (and the kernel relabels an entry added again,
      // so adding ours over it would do just that).
      const Neighbor* have = model.FindNeighbor(uplink->ifindex, address, true);
      if (have == nullptr) {
        plan.writes.push_back(
            kernel::SetNeighbor{ProxyEntry(address, uplink->ifindex, config)});
      } else if (have->protocol != config.protocol) {
        Conflict(&plan, absl::StrCat(have->ToString(),
                                     " is not vmnetd's and stands where the VM's "
                                     "proxy entry must be; remove it"));
      }
    }
    if (spec.mac) {
      PlanNeighbor(address, *link, *spec.mac, model, config, &plan);
    } else if (const Neighbor* n = model.FindNeighbor(link->ifindex, address, false);
               n != nullptr && n->protocol == config.protocol) {
      // Ours from when the spec had a MAC (a restart may come between the
      // durable spec change and its kernel write): it goes.
      plan.writes.push_back(kernel::DeleteNeighbor{*n});
    }
  }
  return plan;
}

std::vector<kernel::Write> PlanRemoval(const VmSpec& old_spec, const VmSpec* new_spec,
                                       const KernelModel& model,
                                       const HostConfig& config) {
  std::vector<kernel::Write> writes;
  const Link* old_link = model.LinkByName(old_spec.interface);
  bool link_kept = new_spec != nullptr && new_spec->interface == old_spec.interface;
  bool mac_kept = link_kept && new_spec->mac == old_spec.mac;
  auto kept = [&](const IpAddress& a) {
    return new_spec != nullptr &&
           std::binary_search(new_spec->addresses.begin(), new_spec->addresses.end(), a);
  };
  for (const IpAddress& address : old_spec.addresses) {
    bool address_kept = kept(address);
    if (const auto* routes = model.RoutesTo(IpPrefix::Host(address))) {
      for (const Route& r : *routes) {
        bool ours = r.protocol == config.protocol;
        bool on_old_link = old_link != nullptr && r.ifindex == old_link->ifindex;
        if (ours && on_old_link && !(address_kept && link_kept)) {
          writes.push_back(kernel::DeleteRoute{r});
        }
      }
    }
    if (!address_kept) {
      for (const std::string& uplink_name : config.uplinks) {
        const Link* uplink = model.LinkByName(uplink_name);
        if (uplink == nullptr) continue;
        const Neighbor* n = model.FindNeighbor(uplink->ifindex, address, true);
        if (n != nullptr && n->protocol == config.protocol) {
          writes.push_back(kernel::DeleteNeighbor{*n});
        }
      }
    }
    if (old_link != nullptr && old_spec.mac && !(address_kept && mac_kept)) {
      const Neighbor* n = model.FindNeighbor(old_link->ifindex, address, false);
      if (n != nullptr && n->protocol == config.protocol) {
        writes.push_back(kernel::DeleteNeighbor{*n});
      }
    }
  }
  // Port security: the elements the new spec no longer asks for (a base
  // about to be rebuilt loses them all anyway).
  if (config.port_security) {
    std::vector<kernel::NftElement> kept_elements;
    if (new_spec != nullptr) kept_elements = PortSecurityElements(*new_spec);
    for (kernel::NftElement& e : PortSecurityElements(old_spec)) {
      if (!std::binary_search(kept_elements.begin(), kept_elements.end(), e) &&
          !ReplacedByWanted(e, kept_elements) &&
          model.HasNftElement(e, *config.port_security)) {
        writes.push_back(kernel::DeleteNftElement{std::move(e)});
      }
    }
  }
  // No flow or NAT binding follows an address that left the VM to its next
  // owner (conntrack deletions go after the elements: nothing new is
  // tracked in between).
  for (const IpAddress& address : old_spec.addresses) {
    if (!kept(address)) writes.push_back(kernel::DeleteConntrack{address});
  }
  if (old_link != nullptr && old_spec.has_ipv6() &&
      !(link_kept && new_spec->has_ipv6())) {
    RemoveGateway(*old_link, config.gateway6, model, config, &writes);
  }
  if (old_link != nullptr && !link_kept) {
    RemoveGateway(*old_link, config.gateway, model, config, &writes);
    // A detached VM's link stops forwarding, so the VM can no longer route
    // through the host. Links matching --interface-pattern are the agent's
    // to configure; the link itself and its up/down state are left alone.
    if (old_link->ipv4_forwarding != false) {
      writes.push_back(
          kernel::SetIpv4Forwarding{old_link->ifindex, old_link->name, false});
    }
  }
  PlanBandwidthRemoval(old_spec, new_spec, model, &writes);
  return writes;
}

bool ReplansEveryVm(const std::vector<kernel::Write>& host_writes) {
  return std::any_of(host_writes.begin(), host_writes.end(), [](const kernel::Write& w) {
    return std::holds_alternative<kernel::EnsurePortSecurityBase>(w);
  });
}

std::vector<kernel::Write> PlanUplinks(const KernelModel& model, const HostConfig& config,
                                       bool ipv6) {
  using Key = kernel::SetIpv6Conf::Key;
  std::vector<kernel::Write> writes;
  // Port security's base first: the VMs' elements planned after it go into
  // the same transaction.
  if (config.port_security && !model.PortSecurityBaseMatches(*config.port_security)) {
    writes.push_back(kernel::EnsurePortSecurityBase{*config.port_security});
  } else if (!config.port_security && model.PortSecurityTablesPresent()) {
    writes.push_back(kernel::DeletePortSecurityBase{});
  }
  ipv6 = ipv6 && model.ipv6_forwarding_all().has_value();
  // Only while forwarding is still off: once on, accept_ra 1 on an uplink
  // means what it says (no router advertisements), and is left alone.
  bool turning_forwarding_on = ipv6 && model.ipv6_forwarding_all() != true;
  for (const std::string& name : config.uplinks) {
    const Link* uplink = model.LinkByName(name);
    if (uplink == nullptr) continue;
    if (uplink->ipv4_forwarding != true) {
      writes.push_back(kernel::SetIpv4Forwarding{uplink->ifindex, uplink->name, true});
    }
    if (!ipv6 || !uplink->ipv6) continue;
    if (turning_forwarding_on && uplink->ipv6->accept_ra == 1)
      writes.push_back(Ipv6Conf(*uplink, Key::kAcceptRa, 2));
    if (!uplink->ipv6->proxy_ndp) writes.push_back(Ipv6Conf(*uplink, Key::kProxyNdp, 1));
  }
  if (turning_forwarding_on) {
    writes.push_back(kernel::SetIpv6Conf{0, "all", Key::kForwarding, 1});
  }
  return writes;
}

std::vector<kernel::Write> PlanOrphans(
    const KernelModel& model, const HostConfig& config,
    const absl::flat_hash_map<IpAddress, AddressOwner>& owner_of_address,
    const absl::flat_hash_map<std::string, std::string>& vm_of_interface) {
  std::vector<kernel::Write> writes;
  auto link_name = [&](int ifindex) -> std::string {
    const Link* l = model.LinkByIndex(ifindex);
    return l == nullptr ? "" : l->name;
  };
  model.ForEachRoute([&](const Route& r) {
    if (r.protocol != config.protocol) return;
    auto owner = owner_of_address.find(r.destination.address);
    bool wanted = r.destination.length == r.destination.address.bit_length() &&
                  owner != owner_of_address.end() &&
                  owner->second.interface == link_name(r.ifindex);
    if (!wanted) writes.push_back(kernel::DeleteRoute{r});
  });
  model.ForEachNeighbor([&](const Neighbor& n) {
    if (n.protocol != config.protocol) return;
    auto owner = owner_of_address.find(n.address);
    bool wanted = owner != owner_of_address.end();
    if (wanted && !n.proxy) {
      wanted = owner->second.has_mac && owner->second.interface == link_name(n.ifindex);
    }
    if (!wanted) writes.push_back(kernel::DeleteNeighbor{n});
  });
  model.ForEachAddress([&](const Address& a) {
    if (a.protocol != config.protocol) return;
    if (!vm_of_interface.contains(link_name(a.ifindex))) {
      writes.push_back(kernel::DeleteAddress{a});
    }
  });
  return writes;
}

}  // namespace vmnet

namespace vmnet {

std::vector<kernel::Write> PlanOrphans(const KernelModel& model, const HostConfig& config,
                                       const std::vector<const VmSpec*>& desired) {
  absl::flat_hash_map<IpAddress, AddressOwner> owner;
  absl::flat_hash_map<std::string, std::string> vm_of_interface;
  std::set<kernel::NftElement> wanted;
  std::vector<kernel::NftElement> wanted_limits;
  for (const VmSpec* spec : desired) {
    for (const IpAddress& a : spec->addresses) {
      owner[a] = {spec->interface, spec->mac.has_value()};
    }
    vm_of_interface[spec->interface] = spec->vm_id;
    if (config.port_security) {
      for (kernel::NftElement& e : PortSecurityElements(*spec)) {
        if (std::holds_alternative<kernel::NftPacketRateLimit>(e))
          wanted_limits.push_back(e);
        wanted.insert(std::move(e));
      }
    }
  }
  std::vector<kernel::Write> writes = PlanOrphans(model, config, owner, vm_of_interface);
  if (config.port_security && model.PortSecurityBaseMatches(*config.port_security)) {
    model.ForEachNftElement([&](const kernel::NftElement& e) {
      if (!wanted.contains(e) && !ReplacedByWanted(e, wanted_limits))
        writes.push_back(kernel::DeleteNftElement{e});
    });
  }
  PlanBandwidthOrphans(model, desired, &writes);
  return writes;
}

}  // namespace vmnet
