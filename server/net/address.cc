#include "vmnet/net/address.h"

#include <arpa/inet.h>

#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace vmnet {

IpAddress IpAddress::V4(uint32_t host_order) {
  uint32_t net = htonl(host_order);
  return FromBytes(Family::kV4, &net);
}

IpAddress IpAddress::FromBytes(Family family, const void* bytes) {
  IpAddress a;
  a.family_ = family;
  std::memcpy(a.bytes_.data(), bytes, family == Family::kV4 ? 4 : 16);
  return a;
}

std::optional<IpAddress> IpAddress::Parse(absl::string_view text) {
  // inet_pton needs a NUL-terminated string; bound the copy so hostile input
  // cannot make us allocate much.
  if (text.empty() || text.size() > INET6_ADDRSTRLEN ||
      text.find('\0') != absl::string_view::npos) {
    return std::nullopt;
  }
  std::string s(text);
  IpAddress a;
  if (inet_pton(AF_INET, s.c_str(), a.bytes_.data()) == 1) {
    a.family_ = Family::kV4;
    return a;
  }
  if (inet_pton(AF_INET6, s.c_str(), a.bytes_.data()) == 1) {
    a.family_ = Family::kV6;
    return a;
  }
  return std::nullopt;
}

uint32_t IpAddress::v4_host_order() const {
  uint32_t net;
  std::memcpy(&net, bytes_.data(), 4);
  return ntohl(net);
}

bool IpAddress::IsUnspecified() const {
  for (size_t i = 0; i < size(); ++i) {
    if (bytes_[i] != 0) return false;
  }
  return true;
}

bool IpAddress::IsLoopback() const {
  if (is_v4()) return bytes_[0] == 127;
  for (int i = 0; i < 15; ++i) {
    if (bytes_[i] != 0) return false;
  }
  return bytes_[15] == 1;
}

bool IpAddress::IsMulticast() const {
  if (is_v4()) return (bytes_[0] & 0xf0) == 0xe0;
  return bytes_[0] == 0xff;
}

bool IpAddress::IsLinkLocal() const {
  if (is_v4()) return bytes_[0] == 169 && bytes_[1] == 254;
  return bytes_[0] == 0xfe && (bytes_[1] & 0xc0) == 0x80;
}

bool IpAddress::IsLimitedBroadcast() const {
  return is_v4() && v4_host_order() == 0xffffffffu;
}

bool IpAddress::IsV4Mapped() const {
  if (!is_v6()) return false;
  for (int i = 0; i < 10; ++i) {
    if (bytes_[i] != 0) return false;
  }
  return bytes_[10] == 0xff && bytes_[11] == 0xff;
}

std::string IpAddress::ToString() const {
  char buf[INET6_ADDRSTRLEN] = {};
  switch (family_) {
    case Family::kV4:
      inet_ntop(AF_INET, bytes_.data(), buf, sizeof(buf));
      return buf;
    case Family::kV6:
      inet_ntop(AF_INET6, bytes_.data(), buf, sizeof(buf));
      return buf;
    case Family::kNone:
      break;
  }
  return "<none>";
}

std::optional<IpPrefix> IpPrefix::Parse(absl::string_view text) {
  size_t slash = text.find('/');
  auto address = IpAddress::Parse(text.substr(0, slash));
  if (!address) return std::nullopt;
  if (slash == absl::string_view::npos) return Host(*address);
  int length;
  if (!absl::SimpleAtoi(text.substr(slash + 1), &length) || length < 0 ||
      length > address->bit_length()) {
    return std::nullopt;
  }
  return IpPrefix{*address, length};
}

bool IpPrefix::Contains(const IpAddress& a) const {
  if (a.family() != address.family()) return false;
  int full_bytes = length / 8;
  if (std::memcmp(a.bytes(), address.bytes(), full_bytes) != 0) return false;
  int rest = length % 8;
  if (rest == 0) return true;
  uint8_t mask = static_cast<uint8_t>(0xff << (8 - rest));
  return (a.bytes()[full_bytes] & mask) == (address.bytes()[full_bytes] & mask);
}

IpPrefix IpPrefix::Masked() const {
  std::array<uint8_t, 16> b{};
  std::memcpy(b.data(), address.bytes(), address.size());
  for (int bit = length; bit < address.bit_length(); ++bit) {
    b[bit / 8] &= static_cast<uint8_t>(~(0x80 >> (bit % 8)));
  }
  return {IpAddress::FromBytes(address.family(), b.data()), length};
}

IpAddress IpPrefix::Last() const {
  std::array<uint8_t, 16> b{};
  std::memcpy(b.data(), address.bytes(), address.size());
  for (int bit = length; bit < address.bit_length(); ++bit) {
    b[bit / 8] |= static_cast<uint8_t>(0x80 >> (bit % 8));
  }
  return IpAddress::FromBytes(address.family(), b.data());
}

std::string IpPrefix::ToString() const {
  return absl::StrCat(address.ToString(), "/", length);
}

std::optional<MacAddress> MacAddress::Parse(absl::string_view text) {
  // Exactly six two-digit hex groups separated by ':' or '-'.
  if (text.size() != 17) return std::nullopt;
  std::array<uint8_t, 6> bytes{};
  const char separator = text[2];
  if (separator != ':' && separator != '-') return std::nullopt;
  for (int i = 0; i < 6; ++i) {
    if (i > 0 && text[i * 3 - 1] != separator) return std::nullopt;
    uint8_t value = 0;
    for (int j = 0; j < 2; ++j) {
      char c = text[i * 3 + j];
      int digit;
      if (c >= '0' && c <= '9') {
        digit = c - '0';
      } else if (c >= 'a' && c <= 'f') {
        digit = c - 'a' + 10;
      } else if (c >= 'A' && c <= 'F') {
        digit = c - 'A' + 10;
      } else {
        return std::nullopt;
      }
      value = static_cast<uint8_t>(value * 16 + digit);
    }
    bytes[i] = value;
  }
  return MacAddress(bytes);
}

bool MacAddress::IsZero() const {
  for (uint8_t b : bytes_) {
    if (b != 0) return false;
  }
  return true;
}

std::string MacAddress::ToString() const {
  return absl::StrFormat("%02x:%02x:%02x:%02x:%02x:%02x", bytes_[0], bytes_[1], bytes_[2],
                         bytes_[3], bytes_[4], bytes_[5]);
}

}  // namespace vmnet
