// Value types for IP and MAC addresses: parsed once at the edge, compared and
// hashed cheaply everywhere else.
#pragma once

#include <array>
#include <compare>
#include <cstdint>
#include <optional>
#include <string>

#include "absl/hash/hash.h"
#include "absl/strings/string_view.h"

namespace vmnet {

// An IPv4 or IPv6 address in network byte order.
class IpAddress {
 public:
  enum class Family : uint8_t { kNone = 0, kV4 = 4, kV6 = 6 };

  IpAddress() = default;
  static IpAddress V4(uint32_t host_order);
  static IpAddress FromBytes(Family family, const void* bytes);
  // Accepts the standard text forms (inet_pton's: "198.51.100.7",
  // "2001:db8::1"); no surrounding space, no NUL, no prefix length.
  static std::optional<IpAddress> Parse(absl::string_view text);

  Family family() const { return family_; }
  bool is_v4() const { return family_ == Family::kV4; }
  bool is_v6() const { return family_ == Family::kV6; }
  int bit_length() const { return is_v4() ? 32 : 128; }
  // The address bytes: 4 for IPv4, 16 for IPv6.
  const uint8_t* bytes() const { return bytes_.data(); }
  size_t size() const { return is_v4() ? 4 : (is_v6() ? 16 : 0); }
  uint32_t v4_host_order() const;

  bool IsUnspecified() const;
  bool IsLoopback() const;
  bool IsMulticast() const;
  bool IsLinkLocal() const;
  bool IsLimitedBroadcast() const;
  bool IsV4Mapped() const;

  std::string ToString() const;

  auto operator<=>(const IpAddress&) const = default;
  template <typename H>
  friend H AbslHashValue(H h, const IpAddress& a) {
    return H::combine(std::move(h), a.family_, a.bytes_);
  }

 private:
  Family family_ = Family::kNone;
  std::array<uint8_t, 16> bytes_{};
};

// An address and a prefix length, e.g. 198.51.100.0/24.
struct IpPrefix {
  IpAddress address;
  int length = 0;

  static IpPrefix Host(const IpAddress& a) { return {a, a.bit_length()}; }
  // "198.51.100.0/24"; a bare address is a host prefix.
  static std::optional<IpPrefix> Parse(absl::string_view text);
  bool Contains(const IpAddress& a) const;
  // The prefix with its host bits cleared.
  IpPrefix Masked() const;
  // The highest address of the prefix (the IPv4 subnet broadcast).
  IpAddress Last() const;
  std::string ToString() const;

  auto operator<=>(const IpPrefix&) const = default;
  template <typename H>
  friend H AbslHashValue(H h, const IpPrefix& p) {
    return H::combine(std::move(h), p.address, p.length);
  }
};

// A 48-bit Ethernet address.
class MacAddress {
 public:
  MacAddress() = default;
  explicit MacAddress(const std::array<uint8_t, 6>& bytes) : bytes_(bytes) {}
  // Accepts "aa:bb:cc:dd:ee:ff" (either case) and "aa-bb-cc-dd-ee-ff"; one
  // separator throughout.
  static std::optional<MacAddress> Parse(absl::string_view text);

  const uint8_t* bytes() const { return bytes_.data(); }
  bool IsZero() const;
  bool IsMulticast() const { return (bytes_[0] & 1) != 0; }
  // Lower case, colon separated.
  std::string ToString() const;

  auto operator<=>(const MacAddress&) const = default;
  template <typename H>
  friend H AbslHashValue(H h, const MacAddress& m) {
    return H::combine(std::move(h), m.bytes_);
  }

 private:
  std::array<uint8_t, 6> bytes_{};
};

}  // namespace vmnet
