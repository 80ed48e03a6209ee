// The reconciler's decisions as pure functions of (desired spec, kernel
// model, host config) -> kernel writes. No I/O, so every rule is unit
// tested over a model built by hand.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "vmnet/kernel/objects.h"
#include "vmnet/net/defaults.h"
#include "vmnet/reconciler/kernel_model.h"
#include "vmnet/state/vm_spec.h"
#include "vmnet/vm/vm.h"

namespace vmnet {

struct HostConfig {
  std::vector<std::string> uplinks;
  IpAddress gateway = *IpAddress::Parse(kDefaultGateway);
  // The VMs' IPv6 gateway: a link-local address on each VM link of a VM
  // with IPv6 addresses.
  IpAddress gateway6 = *IpAddress::Parse(kDefaultGateway6);
  // Port security (vmnetd's nftables tables) for every VM; absent: off,
  // and vmnetd's tables are removed.
  std::optional<kernel::PortSecurityConfig> port_security;
  // The rtm_protocol number that marks our routes, proxy entries,
  // neighbour entries and gateway addresses.
  uint8_t protocol = kDefaultRouteProtocol;
};

struct VmPlan {
  // The writes that bring the kernel to the spec; empty when it is there.
  std::vector<kernel::Write> writes;
  // kPending: the link is missing. kFailed: an object we do not own stands
  // where ours must be (`message` names it); the writes that do not collide
  // are still planned. kProgrammed otherwise (once the writes succeed).
  VmState state = VmState::kProgrammed;
  std::string message;
};

// What the kernel must hold for `spec`.
VmPlan PlanVm(const VmSpec& spec, const KernelModel& model, const HostConfig& config);

// Removes what we installed for `old_spec` and no longer want: everything
// when `new_spec` is null (detach), otherwise what the new spec dropped.
std::vector<kernel::Write> PlanRemoval(const VmSpec& old_spec, const VmSpec* new_spec,
                                       const KernelModel& model,
                                       const HostConfig& config);

// Forwarding on for every uplink that exists. With `ipv6` (some VM has an
// IPv6 address) also IPv6: proxy_ndp on the uplinks, accept_ra 2 where it
// was 1 while forwarding is still off (forwarding would make the kernel
// ignore the uplink's router advertisements), then
// net.ipv6.conf.all.forwarding (IPv6 has no per-link forwarding switch).
std::vector<kernel::Write> PlanUplinks(const KernelModel& model, const HostConfig& config,
                                       bool ipv6);

// The port-security elements a VM's spec asks for: its link, each address
// as a permitted source (and IPv4 ones as ARP senders), and its allowed
// source prefixes (those another one covers left out). Sorted.
std::vector<kernel::NftElement> PortSecurityElements(const VmSpec& spec);
// Whether deleting `e` must be left out because an element of `wanted`
// replaces it: a packet-rate limit of another rate on the same link (its
// add destroys and re-creates the limit in one transaction; a delete
// planned beside it would remove the new one).
bool ReplacedByWanted(const kernel::NftElement& e,
                      const std::vector<kernel::NftElement>& wanted);

// Whether host-wide writes (PlanUplinks) drop objects of every VM, which
// must then all be planned again in the same pass (a rebuilt port-security
// base loses every element).
bool ReplansEveryVm(const std::vector<kernel::Write>& host_writes);

// Where a desired VM address lives.
struct AddressOwner {
  std::string interface;
  bool has_mac = false;  // the VM's spec asks for a permanent neighbour entry
};

// Objects marked with our protocol that belong to no desired VM (left by a
// VM detached while the agent was down, say). `owner_of_address` maps each
// desired VM address to its owner.
std::vector<kernel::Write> PlanOrphans(
    const KernelModel& model, const HostConfig& config,
    const absl::flat_hash_map<IpAddress, AddressOwner>& owner_of_address,
    const absl::flat_hash_map<std::string, std::string>& vm_of_interface);
// The same for the desired VMs' specs, port-security elements included.
std::vector<kernel::Write> PlanOrphans(const KernelModel& model, const HostConfig& config,
                                       const std::vector<const VmSpec*>& desired);

}  // namespace vmnet
