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

struct VmSpec {
  std::string vm_id;
  std::string interface;
  std::vector<IpAddress> addresses;  // sorted (IPv4 before IPv6), no duplicates
  std::optional<MacAddress> mac;

  bool has_ipv6() const { return !addresses.empty() && addresses.back().is_v6(); }

  bool operator==(const VmSpec&) const = default;
};

// The rules that do not depend on the host's current state.
struct SpecRules {
  std::regex interface_pattern{std::string(kDefaultInterfacePattern)};
  IpAddress gateway = *IpAddress::Parse(kDefaultGateway);
  IpAddress gateway6 = *IpAddress::Parse(kDefaultGateway6);
  size_t max_addresses = 64;
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

// "ip_addresses[i]" for the address at sorted position `position`.
std::string AddressField(const std::vector<size_t>& request_index, size_t position);

// Printable ASCII only, at most 128 bytes: what a request_id may be, so
// that it can go into a log line as it is.
absl::Status ValidateRequestId(absl::string_view request_id);

}  // namespace vmnet
