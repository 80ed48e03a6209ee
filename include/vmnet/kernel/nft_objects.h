// Port security in kernel terms: the nftables objects vmnetd owns, as small
// value types. Nothing above the kernel layer sees a libnftnl object.
//
// vmnetd owns two tables, `inet vmnet` and `arp vmnet`, and never touches any
// other. Their chains and rules (the "base") do not depend on the VMs: every
// per-VM fact is a set or map element or a named counter, so the rule count
// is the same for 10 or 10,000 VMs and a packet from a VM costs one lookup
// per check. The base is shown in docs/port-security.md as `nft list ruleset` prints
// it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "vmnet/net/address.h"

namespace vmnet::kernel {

// Why a packet from a VM was dropped. Each reason has one named counter per
// VM link.
enum class DropReason : uint8_t {
  kSpoofedSource = 0,  // IPv4/IPv6 source not the VM's (nor allowed, nor link-local)
  kSpoofedArpNd,       // ARP sender not the VM's; NA target not the VM's; RA, redirect
  kToHost,             // to one of the host's own addresses, not allowed
  // Over the VM's packet-rate limit (bandwidth.egress_packets_per_second);
  // the counter belongs to the NftPacketRateLimit, not to the NftVmLink.
  kEgressPacketRate,
};
constexpr int kDropReasons = 4;
// "spoofed_source", "spoofed_arp_nd", "to_host", "egress_pps_dropped":
// also the counters' and maps' names in the ruleset.
const char* DropReasonName(DropReason reason);

// One `--vm-to-host-allow` entry, e.g. udp/53.
struct VmToHostPort {
  enum class Protocol : uint8_t { kTcp = 6, kUdp = 17 };
  Protocol protocol = Protocol::kTcp;
  uint16_t port = 0;

  auto operator<=>(const VmToHostPort&) const = default;
  std::string ToString() const;  // "tcp/80"
};

// What the base depends on.
struct PortSecurityConfig {
  std::vector<VmToHostPort> vm_to_host_allow;

  bool operator==(const PortSecurityConfig&) const = default;
  // The tag the base carries (table userdata): the ruleset's version and
  // this configuration, in a canonical order. Equal tags, equal bases.
  std::string Fingerprint() const;
};

// A VM link: its name in `vm_links` of both tables, its named drop
// counters (one per reason; spoofed_arp_nd in both tables) and the counter
// maps' elements pointing at them. Every packet from a link listed here is
// checked; packets from other links are not looked at.
struct NftVmLink {
  std::string ifname;
  auto operator<=>(const NftVmLink&) const = default;
};
// A source a VM may send from: one of its addresses (a /32 or /128: a hash
// set) or an allowed source prefix (any length, 0.0.0.0/0 and ::/0
// included: a concatenated-range set). The shorter-than-host prefixes of one
// link must not overlap (the kernel's range sets refuse overlaps): plan them
// with NonOverlappingPrefixes.
struct NftSourcePrefix {
  std::string ifname;
  IpPrefix prefix;
  auto operator<=>(const NftSourcePrefix&) const = default;
};
// An IPv4 address a VM may claim in ARP (as sender). Only the VM's own
// addresses, not its allowed prefixes.
struct NftArpSender {
  std::string ifname;
  IpAddress address;
  auto operator<=>(const NftArpSender&) const = default;
};
// A VM link's packet-rate limit (bandwidth.egress_packets_per_second): a
// named limit object `egress_pps.<ifname>` (rate over N/second, burst B
// packets), a named counter `egress_pps_dropped.<ifname>` of what it
// dropped, and their elements in the `egress_pps` and `egress_pps_dropped`
// maps. One base rule (prerouting, right after the vm_links check) drops a
// packet from a listed link that is over its limit; a link with no element
// is not limited. Adding it replaces the link's limit in the same
// transaction (destroy and re-create: the kernel cannot change a limit
// object in place), so a rate change is never a moment unlimited; the
// counter keeps its value. A snapshot or event reports a limit it cannot
// vouch for (half present, another rate unit or type) with
// packets_per_second 0: never desired, so it is replaced or deleted.
struct NftPacketRateLimit {
  std::string ifname;
  uint64_t packets_per_second = 0;
  uint32_t burst_packets = 0;
  auto operator<=>(const NftPacketRateLimit&) const = default;
};
// The burst vmnetd gives a packet-rate limit: 100 ms of the rate, at least
// 5 packets (nft's default burst).
uint32_t PacketRateBurst(uint64_t packets_per_second);
inline NftPacketRateLimit MakePacketRateLimit(std::string ifname,
                                              uint64_t packets_per_second) {
  return {std::move(ifname), packets_per_second, PacketRateBurst(packets_per_second)};
}
using NftElement =
    std::variant<NftVmLink, NftSourcePrefix, NftArpSender, NftPacketRateLimit>;
std::string ToString(const NftElement& element);

// Removes the prefixes that another one in `prefixes` covers (CIDR
// prefixes either nest or are disjoint, so what remains does not overlap),
// and duplicates. Sorted.
std::vector<IpPrefix> NonOverlappingPrefixes(std::vector<IpPrefix> prefixes);

// Writes. Adds are idempotent: adding what exists is OK (never
// ALREADY_EXISTS), and re-adding an NftVmLink completes one that lost a part.
// Deletes of what is absent are OK.
struct AddNftElement {
  NftElement element;
  bool operator==(const AddNftElement&) const = default;
};
struct DeleteNftElement {
  NftElement element;
  bool operator==(const DeleteNftElement&) const = default;
};
// Replaces vmnetd's tables by a fresh base for `config`: every element is
// dropped (the caller re-adds them, in the same Apply if it wants the
// change to be atomic). Write it only when the snapshot says the base does
// not match: it is not a no-op.
struct EnsurePortSecurityBase {
  PortSecurityConfig config;
  bool operator==(const EnsurePortSecurityBase&) const = default;
};
// Removes vmnetd's tables (port security off). OK when they are absent.
struct DeletePortSecurityBase {
  bool operator==(const DeletePortSecurityBase&) const = default;
};
using NftWrite = std::variant<EnsurePortSecurityBase, DeletePortSecurityBase,
                              AddNftElement, DeleteNftElement>;
std::string ToString(const NftWrite& write);

// What a dump of vmnetd's tables found.
struct NftSnapshot {
  // The `inet vmnet` table's tag (PortSecurityConfig::Fingerprint); absent
  // when the table is.
  std::optional<std::string> fingerprint;
  // Both tables hold exactly the chains, rules and sets the tag promises,
  // and the allow set exactly the configured ports.
  bool base_intact = false;
  // Where base_intact is false, why (for logs).
  std::string damage;
  // Complete elements, sorted.
  std::vector<NftElement> elements;
  // VM links of which some parts exist but not all (say, a counter was
  // deleted by hand): re-add them when desired, delete them otherwise.
  std::vector<std::string> incomplete_vm_links;
  // Elements that vmnetd never writes (e.g. a non-CIDR range added by
  // hand); a count, for logs. Only a rebuilt base removes them.
  int foreign_elements = 0;

  bool BaseMatches(const PortSecurityConfig& config) const {
    return base_intact && fingerprint == config.Fingerprint();
  }
};

// A change to vmnetd's tables the kernel announced. Changes to other
// tables are not reported.
struct NftEvent {
  enum class Kind : uint8_t {
    kElementAdded,
    kElementDeleted,
    // A table, chain, rule or set of the base (or the allow set's
    // elements) was added, changed or deleted: compare the base again
    // (dump) and rebuild it if it no longer matches.
    kBaseChanged,
  };
  Kind kind = Kind::kBaseChanged;
  // For element events: the element the change touched (any part of a VM
  // link reports the NftVmLink; any part of a packet-rate limit an
  // NftPacketRateLimit with packets_per_second 0, the rate unknown).
  std::optional<NftElement> element;
  // Caused by this process's own NftKernel::Apply (same netlink port).
  bool own = false;
  // What the kernel said, e.g. "delete table inet vmnet".
  std::string what;

  std::string ToString() const;
};

// A VM link's drop counter, as a scrape reads it (the VM's view: packets the
// VM sent that the host dropped). spoofed_arp_nd sums ARP and NDP drops.
struct DropCounter {
  std::string ifname;
  DropReason reason = DropReason::kSpoofedSource;
  uint64_t packets = 0;
  uint64_t bytes = 0;
  bool operator==(const DropCounter&) const = default;
  std::string ToString() const;
};

// What DeleteConntrack did.
struct ConntrackDeletion {
  // False when the kernel has no connection tracking in this namespace: then
  // nothing was looked at or loaded.
  bool conntrack_present = false;
  int deleted = 0;
  bool operator==(const ConntrackDeletion&) const = default;
};

}  // namespace vmnet::kernel
