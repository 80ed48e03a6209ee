// What a caller asks for one VM, validated. Everything that arrives over
// the network passes through ParseVmSpec before anything else looks at it.
#pragma once

#include <optional>
#include <regex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "vmnet/net/address.h"
#include "vmnet/net/defaults.h"

namespace vmnet {

// Per-VM bandwidth limits, from the VM's point of view (as its traffic
// counters): ingress is what the VM receives, egress what it sends. 0:
// unlimited.
struct Bandwidth {
  uint64_t ingress_bits_per_second = 0;
  uint64_t egress_bits_per_second = 0;
  uint32_t burst_bytes = 0;  // 0: the default (kernel::DefaultBurstBytes)
  uint64_t egress_packets_per_second = 0;

  bool limited() const {
    return ingress_bits_per_second != 0 || egress_bits_per_second != 0 ||
           egress_packets_per_second != 0;
  }
  bool operator==(const Bandwidth&) const = default;
};

// The bounds of a limit (bits per second) and of the burst.
constexpr uint64_t kMinBitsPerSecond = 8000;             // 8 kbit/s
constexpr uint64_t kMaxBitsPerSecond = 400000000000ull;  // 400 Gbit/s
constexpr uint64_t kMinBurstBytes = 1514;        // one 1500-byte packet on Ethernet
constexpr uint64_t kMaxBurstBytes = 1ull << 30;  // 1 GiB
constexpr uint64_t kMaxBurstSeconds = 60;        // of the lowest limit
constexpr uint64_t kMaxPacketsPerSecond = 1000000000ull;

struct VmSpec {
  std::string vm_id;
  std::string interface;
  std::vector<IpAddress> addresses;  // sorted (IPv4 before IPv6), no duplicates
  std::optional<MacAddress> mac;
  // Sources the VM may send from besides its own addresses (port
  // security), in the order given; 0.0.0.0/0 and ::/0 for a VM that routes
  // for others.
  std::vector<IpPrefix> allowed_source_prefixes;
  Bandwidth bandwidth;

  bool has_ipv6() const { return !addresses.empty() && addresses.back().is_v6(); }

  bool operator==(const VmSpec&) const = default;
};

// The rules that do not depend on the host's current state.
struct SpecRules {
  std::regex interface_pattern{std::string(kDefaultInterfacePattern)};
  IpAddress gateway = *IpAddress::Parse(kDefaultGateway);
  IpAddress gateway6 = *IpAddress::Parse(kDefaultGateway6);
  size_t max_addresses = 64;
  // Whether port security is on (--port-security): a packet-rate limit is
  // a limit object in its nftables ruleset, so it needs it.
  bool port_security = false;
};

constexpr size_t kMaxVmIdLength = 64;
constexpr size_t kMaxInterfaceLength = 15;  // IFNAMSIZ - 1

// Checks one vm_id: 1 to 64 characters of [A-Za-z0-9._-]. INVALID_ARGUMENT
// naming `field` and the reason otherwise.
absl::Status ValidateVmId(absl::string_view vm_id, absl::string_view field = "vm_id");

// Validates every field and returns the canonical spec (addresses sorted),
// or INVALID_ARGUMENT whose message names the first bad field and the
// reason. `request_index`, when given, receives for each sorted address its
// index in the request, so later errors can name the field the caller sent.
absl::StatusOr<VmSpec> ParseVmSpec(absl::string_view vm_id, absl::string_view interface,
                                   absl::Span<const std::string> addresses,
                                   absl::string_view mac, const SpecRules& rules,
                                   std::vector<size_t>* request_index = nullptr);

// Validates allowed_source_prefixes: each a CIDR prefix ("203.0.113.0/24",
// "2001:db8:1::/48", "0.0.0.0/0") with no host bits set, not multicast,
// loopback, link-local or IPv4-mapped, none twice, at most
// rules.max_addresses of them. INVALID_ARGUMENT naming
// allowed_source_prefixes[i] and the reason otherwise.
absl::StatusOr<std::vector<IpPrefix>> ParseSourcePrefixes(
    absl::Span<const std::string> prefixes, const SpecRules& rules);

// Validates bandwidth limits: each rate 0 or within [8 kbit/s, 400 Gbit/s],
// the burst 0 or within [1514 bytes, 1 GiB] and at most 60 s at the lowest
// limit, the packet rate (egress_packets_per_second) 0 or within [1, 10^9].
// INVALID_ARGUMENT naming bandwidth.<field> otherwise. A packet rate is
// FAILED_PRECONDITION with port security off (rules.port_security): it is
// enforced by port security's nftables ruleset.
absl::StatusOr<Bandwidth> ParseBandwidth(uint64_t ingress_bits_per_second,
                                         uint64_t egress_bits_per_second,
                                         uint64_t burst_bytes,
                                         uint64_t egress_packets_per_second,
                                         const SpecRules& rules);

// "ip_addresses[i]" for the address at sorted position `position`.
std::string AddressField(const std::vector<size_t>& request_index, size_t position);

// An error about one of a spec's addresses, named by its value (the layers
// below the API know no request): `ip_addresses: "<address>" <reason>`,
// carrying the address so that the API can name the field the caller sent.
absl::Status AddressError(absl::StatusCode code, const IpAddress& address,
                          absl::string_view reason);
// The API's half: an AddressError about an address of `spec` names the
// request's field instead, `ip_addresses[i]: ...`, with `request_index` from
// ParseVmSpec. Any other status is returned as it is.
absl::Status NameAddressField(const absl::Status& status, const VmSpec& spec,
                              const std::vector<size_t>& request_index);

// Printable ASCII only, at most 128 bytes: what a request_id may be, so
// that it can go into a log line as it is.
absl::Status ValidateRequestId(absl::string_view request_id);

}  // namespace vmnet
