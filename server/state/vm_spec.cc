#include "vmnet/state/vm_spec.h"

#include <algorithm>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"

namespace vmnet {
namespace {

// Quotes untrusted text for an error message: bounded and printable, so a
// hostile value cannot flood a log line or a terminal.
std::string Quote(absl::string_view text) {
  constexpr size_t kMax = 80;
  std::string out = "\"";
  for (size_t i = 0; i < text.size() && i < kMax; ++i) {
    unsigned char c = static_cast<unsigned char>(text[i]);
    if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
      out.push_back(static_cast<char>(c));
    } else {
      absl::StrAppendFormat(&out, "\\x%02x", c);
    }
  }
  if (text.size() > kMax) out += "...";
  return out + "\"";
}

absl::Status Invalid(absl::string_view field, absl::string_view value,
                     absl::string_view reason) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", Quote(value), " ", reason));
}

bool IsVmIdChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
         c == '.' || c == '_' || c == '-';
}

absl::StatusOr<IpAddress> ParseVmAddress(absl::string_view field, absl::string_view text,
                                         const SpecRules& rules) {
  auto address = IpAddress::Parse(text);
  if (!address) return Invalid(field, text, "is not an IP address");
  if (address->IsUnspecified()) return Invalid(field, text, "is the unspecified address");
  if (address->IsMulticast()) return Invalid(field, text, "is a multicast address");
  if (address->IsLoopback()) return Invalid(field, text, "is a loopback address");
  if (address->IsLinkLocal()) return Invalid(field, text, "is a link-local address");
  if (address->is_v6()) {
    if (address->IsV4Mapped()) {
      return Invalid(field, text,
                     "is an IPv4-mapped IPv6 address; give the IPv4 address itself");
    }
    if (*address == rules.gateway6) {
      return Invalid(field, text, "is the VMs' IPv6 gateway address (--gateway6)");
    }
    return *address;
  }
  if (address->IsLimitedBroadcast())
    return Invalid(field, text, "is the broadcast address");
  if ((address->v4_host_order() >> 28) == 0xf) {
    return Invalid(field, text, "is in the reserved range 240.0.0.0/4");
  }
  if (*address == rules.gateway) {
    return Invalid(field, text, "is the VMs' gateway address");
  }
  return *address;
}

}  // namespace

absl::Status ValidateVmId(absl::string_view vm_id, absl::string_view field) {
  if (vm_id.empty()) return Invalid(field, vm_id, "is empty; give 1 to 64 characters");
  if (vm_id.size() > kMaxVmIdLength) {
    return Invalid(
        field, vm_id,
        absl::StrCat("is ", vm_id.size(), " characters long; the maximum is 64"));
  }
  for (char c : vm_id) {
    if (!IsVmIdChar(c)) {
      return Invalid(field, vm_id, "has a character outside [A-Za-z0-9._-]");
    }
  }
  return absl::OkStatus();
}

std::string AddressField(const std::vector<size_t>& request_index, size_t position) {
  size_t index = position < request_index.size() ? request_index[position] : position;
  return absl::StrCat("ip_addresses[", index, "]");
}

namespace {
constexpr absl::string_view kAddressPayload = "type.vmnet/address";
}  // namespace

absl::Status AddressError(absl::StatusCode code, const IpAddress& address,
                          absl::string_view reason) {
  absl::Status s(code,
                 absl::StrCat("ip_addresses: \"", address.ToString(), "\" ", reason));
  s.SetPayload(kAddressPayload, absl::Cord(address.ToString()));
  return s;
}

absl::Status NameAddressField(const absl::Status& status, const VmSpec& spec,
                              const std::vector<size_t>& request_index) {
  auto payload = status.GetPayload(kAddressPayload);
  if (!payload) return status;
  auto address = IpAddress::Parse(std::string(*payload));
  auto at = address
                ? std::lower_bound(spec.addresses.begin(), spec.addresses.end(), *address)
                : spec.addresses.end();
  absl::string_view message = status.message();
  if (at == spec.addresses.end() || *at != *address ||
      !absl::ConsumePrefix(&message, "ip_addresses")) {
    return absl::Status(status.code(), status.message());
  }
  size_t position = static_cast<size_t>(at - spec.addresses.begin());
  return absl::Status(status.code(),
                      absl::StrCat(AddressField(request_index, position), message));
}

absl::StatusOr<Bandwidth> ParseBandwidth(uint64_t ingress_bits_per_second,
                                         uint64_t egress_bits_per_second,
                                         uint64_t burst_bytes,
                                         uint64_t egress_packets_per_second,
                                         const SpecRules& rules) {
  auto rate = [](absl::string_view field, uint64_t v) -> absl::Status {
    if (v == 0 || (v >= kMinBitsPerSecond && v <= kMaxBitsPerSecond)) {
      return absl::OkStatus();
    }
    return absl::InvalidArgumentError(
        absl::StrCat("bandwidth.", field, ": ", v, " bit/s is ",
                     v < kMinBitsPerSecond
                         ? "below the least limit, 8000 bit/s (8 kbit/s)"
                         : "above the greatest limit, 400000000000 bit/s (400 Gbit/s)",
                     "; 0 means unlimited"));
  };
  if (auto s = rate("ingress_bits_per_second", ingress_bits_per_second); !s.ok())
    return s;
  if (auto s = rate("egress_bits_per_second", egress_bits_per_second); !s.ok()) return s;
  if (burst_bytes != 0) {
    if (burst_bytes < kMinBurstBytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "bandwidth.burst_bytes: ", burst_bytes,
          " bytes is smaller than one MTU-sized packet (1514 bytes: a 1500-byte packet "
          "with its Ethernet header); 0 means the default"));
    }
    if (burst_bytes > kMaxBurstBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("bandwidth.burst_bytes: ", burst_bytes,
                       " bytes is more than the greatest burst, 1073741824 (1 GiB)"));
    }
    uint64_t lowest = 0;
    for (uint64_t r : {ingress_bits_per_second, egress_bits_per_second}) {
      if (r != 0 && (lowest == 0 || r < lowest)) lowest = r;
    }
    if (lowest != 0 && burst_bytes * 8 > lowest * kMaxBurstSeconds) {
      return absl::InvalidArgumentError(
          absl::StrCat("bandwidth.burst_bytes: ", burst_bytes, " bytes last more than ",
                       kMaxBurstSeconds, " s at the lowest limit, ", lowest, " bit/s"));
    }
  }
  if (egress_packets_per_second > kMaxPacketsPerSecond) {
    return absl::InvalidArgumentError(
        absl::StrCat("bandwidth.egress_packets_per_second: ", egress_packets_per_second,
                     " is above the greatest limit, 1000000000"));
  }
  if (egress_packets_per_second != 0 && !rules.port_security) {
    return absl::FailedPreconditionError(
        "bandwidth.egress_packets_per_second: a packet-rate limit is enforced by port "
        "security's nftables ruleset, and this vmnetd runs with --port-security=false; "
        "leave it 0, limit egress_bits_per_second instead, or turn port security on");
  }
  Bandwidth out;
  out.ingress_bits_per_second = ingress_bits_per_second;
  out.egress_bits_per_second = egress_bits_per_second;
  out.burst_bytes = static_cast<uint32_t>(burst_bytes);
  out.egress_packets_per_second = egress_packets_per_second;
  return out;
}

absl::StatusOr<std::vector<IpPrefix>> ParseSourcePrefixes(
    absl::Span<const std::string> prefixes, const SpecRules& rules) {
  if (prefixes.size() > rules.max_addresses) {
    return absl::InvalidArgumentError(absl::StrCat(
        "allowed_source_prefixes: has ", prefixes.size(),
        " prefixes; the limit (--max-addresses-per-vm) is ", rules.max_addresses));
  }
  std::vector<IpPrefix> out;
  for (size_t i = 0; i < prefixes.size(); ++i) {
    std::string field = absl::StrCat("allowed_source_prefixes[", i, "]");
    const std::string& text = prefixes[i];
    auto prefix =
        text.find('/') == std::string::npos ? std::nullopt : IpPrefix::Parse(text);
    if (!prefix) {
      return Invalid(
          field, text,
          "is not a prefix in CIDR notation (e.g. 203.0.113.0/24, 2001:db8::/48)");
    }
    if (!(prefix->address == prefix->Masked().address)) {
      return Invalid(
          field, text,
          absl::StrCat("has host bits set; the prefix is ", prefix->Masked().ToString()));
    }
    const IpAddress& a = prefix->address;
    if (prefix->length > 0) {
      if (a.IsMulticast()) return Invalid(field, text, "is a multicast prefix");
      if (a.IsLoopback()) return Invalid(field, text, "is a loopback prefix");
      if (a.IsLinkLocal()) {
        return Invalid(field, text,
                       "is link-local; link-local sources reach the host and are never "
                       "forwarded anyway");
      }
      if (a.is_v6() && a.IsV4Mapped()) {
        return Invalid(field, text, "is IPv4-mapped; give the IPv4 prefix itself");
      }
    }
    if (std::find(out.begin(), out.end(), *prefix) != out.end()) {
      return Invalid(field, text, "is given twice");
    }
    out.push_back(*prefix);
  }
  return out;
}

absl::Status ValidateRequestId(absl::string_view request_id) {
  if (request_id.size() > 128) {
    return absl::InvalidArgumentError(absl::StrCat("request_id: is ", request_id.size(),
                                                   " bytes long; the maximum is 128"));
  }
  for (char c : request_id) {
    if (c < 0x20 || c > 0x7e) {
      return Invalid("request_id", request_id, "has a character outside printable ASCII");
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<VmSpec> ParseVmSpec(absl::string_view vm_id, absl::string_view interface,
                                   absl::Span<const std::string> addresses,
                                   absl::string_view mac, const SpecRules& rules,
                                   std::vector<size_t>* request_index) {
  if (auto s = ValidateVmId(vm_id); !s.ok()) return s;
  VmSpec spec;
  spec.vm_id = std::string(vm_id);

  if (interface.empty()) return Invalid("interface", interface, "is empty");
  if (interface.size() > kMaxInterfaceLength) {
    return Invalid(
        "interface", interface,
        absl::StrCat("is ", interface.size(), " bytes long; Linux allows at most 15"));
  }
  // What Linux accepts as a link name (dev_valid_name), whatever the pattern.
  if (interface == "." || interface == "..") {
    return Invalid("interface", interface, "is not a name Linux allows for a link");
  }
  for (char c : interface) {
    if (c == '/' || c == ':' || c <= 0x20 || c >= 0x7f) {
      return Invalid("interface", interface,
                     "has a character Linux does not allow in a link name");
    }
  }
  if (!std::regex_match(interface.begin(), interface.end(), rules.interface_pattern)) {
    return Invalid("interface", interface,
                   "does not match the agent's --interface-pattern");
  }
  spec.interface = std::string(interface);

  if (addresses.empty()) {
    return absl::InvalidArgumentError(
        "ip_addresses: is empty; give at least one address");
  }
  if (addresses.size() > rules.max_addresses) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ip_addresses: has ", addresses.size(),
        " addresses; the limit (--max-addresses-per-vm) is ", rules.max_addresses));
  }
  for (size_t i = 0; i < addresses.size(); ++i) {
    std::string field = absl::StrCat("ip_addresses[", i, "]");
    auto address = ParseVmAddress(field, addresses[i], rules);
    if (!address.ok()) return address.status();
    if (std::find(spec.addresses.begin(), spec.addresses.end(), *address) !=
        spec.addresses.end()) {
      return Invalid(field, addresses[i], "is given twice");
    }
    spec.addresses.push_back(*address);
  }
  std::vector<size_t> order(spec.addresses.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return spec.addresses[a] < spec.addresses[b]; });
  std::vector<IpAddress> sorted;
  sorted.reserve(order.size());
  for (size_t i : order) sorted.push_back(spec.addresses[i]);
  spec.addresses = std::move(sorted);
  if (request_index != nullptr) *request_index = std::move(order);

  if (!mac.empty()) {
    auto parsed = MacAddress::Parse(mac);
    if (!parsed) {
      return Invalid("mac_address", mac, "is not a MAC address like aa:bb:cc:dd:ee:ff");
    }
    if (parsed->IsZero()) return Invalid("mac_address", mac, "is all zeros");
    if (parsed->IsMulticast()) {
      return Invalid("mac_address", mac, "is a multicast MAC; give a unicast one");
    }
    spec.mac = *parsed;
  }
  return spec;
}

}  // namespace vmnet
