#include "vmnet/announce/frames.h"

#include <array>
#include <cstring>

namespace vmnet::announce {
namespace {

constexpr uint8_t kIcmpv6 = 58;
constexpr uint8_t kNeighborSolicitation = 135;
constexpr uint8_t kNeighborAdvertisement = 136;
constexpr uint8_t kOptionTargetLinkLayer = 2;
constexpr uint8_t kRouterFlag = 0x80;
constexpr uint8_t kOverrideFlag = 0x20;
constexpr size_t kArpSize = 28;
constexpr size_t kIpv6HeaderSize = 40;
constexpr size_t kNdMessageSize = 24;  // NS and NA: header, flags, target

const std::array<uint8_t, 6> kBroadcast = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
const std::array<uint8_t, 6> kZeroMac = {};

void Put(Frame& f, const uint8_t* bytes, size_t n) {
  f.insert(f.end(), bytes, bytes + n);
}
void Put16(Frame& f, uint16_t v) {
  f.push_back(static_cast<uint8_t>(v >> 8));
  f.push_back(static_cast<uint8_t>(v));
}
uint16_t Get16(const uint8_t* p) { return static_cast<uint16_t>(p[0] << 8 | p[1]); }

void PutEthernet(Frame& f, const uint8_t* destination, const MacAddress& source,
                 uint16_t type) {
  Put(f, destination, 6);
  Put(f, source.bytes(), 6);
  Put16(f, type);
}

// An Ethernet/IPv4 ARP packet after the Ethernet header.
void PutArp(Frame& f, uint16_t op, const MacAddress& sha, const IpAddress& spa,
            const IpAddress& tpa) {
  Put16(f, 1);       // hardware type: Ethernet
  Put16(f, 0x0800);  // protocol type: IPv4
  f.push_back(6);
  f.push_back(4);
  Put16(f, op);
  Put(f, sha.bytes(), 6);
  Put(f, spa.bytes(), 4);
  Put(f, kZeroMac.data(), 6);
  Put(f, tpa.bytes(), 4);
}

IpAddress V6(std::initializer_list<uint8_t> prefix) {
  std::array<uint8_t, 16> b{};
  std::copy(prefix.begin(), prefix.end(), b.begin());
  return IpAddress::FromBytes(IpAddress::Family::kV6, b.data());
}

const IpAddress& AllNodes() {
  static const IpAddress a = V6({0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1});
  return a;
}

// An IPv6 frame carrying the ICMPv6 `message` (checksum field zero), whose
// checksum is filled in here.
Frame Icmpv6Frame(const uint8_t* eth_destination, const MacAddress& mac,
                  const IpAddress& source, const IpAddress& destination, Frame message) {
  uint16_t sum = Icmpv6Checksum(source, destination, message);
  message[2] = static_cast<uint8_t>(sum >> 8);
  message[3] = static_cast<uint8_t>(sum);
  Frame f;
  f.reserve(kEthernetHeaderSize + kIpv6HeaderSize + message.size());
  PutEthernet(f, eth_destination, mac, kEthertypeIpv6);
  Put16(f, 0x6000);  // version 6, traffic class 0, flow label 0
  Put16(f, 0);
  Put16(f, static_cast<uint16_t>(message.size()));
  f.push_back(kIcmpv6);
  f.push_back(255);  // hop limit: Neighbour Discovery requires 255
  Put(f, source.bytes(), 16);
  Put(f, destination.bytes(), 16);
  Put(f, message.data(), message.size());
  return f;
}

// An NS or NA: type, code 0, checksum 0, flags and reserved, target.
Frame NdMessage(uint8_t type, uint8_t flags, const IpAddress& target) {
  Frame m = {type, 0, 0, 0, flags, 0, 0, 0};
  Put(m, target.bytes(), 16);
  return m;
}

uint32_t Sum16(uint32_t sum, const uint8_t* p, size_t n) {
  for (size_t i = 0; i + 1 < n; i += 2) sum += Get16(p + i);
  if (n % 2 != 0) sum += static_cast<uint32_t>(p[n - 1]) << 8;
  return sum;
}

std::optional<Claim> ParseArp(absl::Span<const uint8_t> arp, const MacAddress& own) {
  if (arp.size() < kArpSize) return std::nullopt;
  const uint8_t* p = arp.data();
  uint16_t op = Get16(p + 6);
  if (Get16(p) != 1 || Get16(p + 2) != 0x0800 || p[4] != 6 || p[5] != 4 ||
      (op != 1 && op != 2)) {
    return std::nullopt;
  }
  std::array<uint8_t, 6> sha;
  std::memcpy(sha.data(), p + 8, 6);
  Claim claim;
  claim.mac = MacAddress(sha);
  IpAddress spa = IpAddress::FromBytes(IpAddress::Family::kV4, p + 14);
  IpAddress tpa = IpAddress::FromBytes(IpAddress::Family::kV4, p + 24);
  if (!spa.IsUnspecified()) {
    claim.address = spa;
  } else if (op == 1) {
    claim.address = tpa;  // a probe for tpa
  } else {
    return std::nullopt;
  }
  if (claim.mac == own || claim.mac.IsZero() || claim.mac.IsMulticast())
    return std::nullopt;
  return claim;
}

// The Target Link-Layer Address in the options of an NA, if there is one;
// false when the options are malformed.
bool FindTargetLinkLayer(absl::Span<const uint8_t> options,
                         std::optional<MacAddress>* mac) {
  while (!options.empty()) {
    if (options.size() < 2 || options[1] == 0) return false;
    size_t length = static_cast<size_t>(options[1]) * 8;
    if (length > options.size()) return false;
    if (options[0] == kOptionTargetLinkLayer && length == 8 && !mac->has_value()) {
      std::array<uint8_t, 6> b;
      std::memcpy(b.data(), options.data() + 2, 6);
      *mac = MacAddress(b);
    }
    options.remove_prefix(length);
  }
  return true;
}

std::optional<Claim> ParseNd(absl::Span<const uint8_t> frame, const MacAddress& own) {
  if (frame.size() < kEthernetHeaderSize + kIpv6HeaderSize) return std::nullopt;
  const uint8_t* ip = frame.data() + kEthernetHeaderSize;
  size_t payload = Get16(ip + 4);
  if ((ip[0] >> 4) != 6 || ip[6] != kIcmpv6 || ip[7] != 255 || payload < kNdMessageSize ||
      payload > frame.size() - kEthernetHeaderSize - kIpv6HeaderSize) {
    return std::nullopt;
  }
  IpAddress source = IpAddress::FromBytes(IpAddress::Family::kV6, ip + 8);
  IpAddress destination = IpAddress::FromBytes(IpAddress::Family::kV6, ip + 24);
  absl::Span<const uint8_t> message(ip + kIpv6HeaderSize, payload);
  uint8_t type = message[0];
  if ((type != kNeighborSolicitation && type != kNeighborAdvertisement) ||
      message[1] != 0 || Icmpv6Checksum(source, destination, message) != 0) {
    return std::nullopt;
  }
  std::optional<MacAddress> option_mac;
  if (!FindTargetLinkLayer(message.subspan(kNdMessageSize), &option_mac))
    return std::nullopt;
  Claim claim;
  claim.address = IpAddress::FromBytes(IpAddress::Family::kV6, message.data() + 8);
  if (claim.address.IsMulticast()) return std::nullopt;
  if (type == kNeighborSolicitation) {
    if (!source.IsUnspecified()) return std::nullopt;  // resolution, not DAD
    option_mac.reset();
  }
  std::array<uint8_t, 6> eth_source;
  std::memcpy(eth_source.data(), frame.data() + 6, 6);
  claim.mac = option_mac.value_or(MacAddress(eth_source));
  if (claim.mac == own || claim.mac.IsZero() || claim.mac.IsMulticast())
    return std::nullopt;
  return claim;
}

}  // namespace

Frame GratuitousArp(const MacAddress& mac, const IpAddress& address) {
  Frame f;
  f.reserve(kEthernetHeaderSize + kArpSize);
  PutEthernet(f, kBroadcast.data(), mac, kEthertypeArp);
  PutArp(f, 1, mac, address, address);
  return f;
}

Frame ArpProbe(const MacAddress& mac, const IpAddress& address) {
  Frame f;
  f.reserve(kEthernetHeaderSize + kArpSize);
  PutEthernet(f, kBroadcast.data(), mac, kEthertypeArp);
  PutArp(f, 1, mac, IpAddress::V4(0), address);
  return f;
}

Frame UnsolicitedNeighborAdvertisement(const MacAddress& mac, const IpAddress& target,
                                       const IpAddress& source, bool router) {
  uint8_t flags = kOverrideFlag | (router ? kRouterFlag : 0);
  Frame message = NdMessage(kNeighborAdvertisement, flags, target);
  message.push_back(kOptionTargetLinkLayer);
  message.push_back(1);  // length in units of 8 bytes
  Put(message, mac.bytes(), 6);
  static const uint8_t kAllNodesMac[6] = {0x33, 0x33, 0, 0, 0, 1};
  return Icmpv6Frame(kAllNodesMac, mac, source.is_v6() ? source : target, AllNodes(),
                     std::move(message));
}

Frame DadNeighborSolicitation(const MacAddress& mac, const IpAddress& address) {
  IpAddress group = SolicitedNodeMulticast(address);
  const uint8_t* g = group.bytes();
  const uint8_t eth_destination[6] = {0x33, 0x33, g[12], g[13], g[14], g[15]};
  return Icmpv6Frame(eth_destination, mac, V6({}), group,
                     NdMessage(kNeighborSolicitation, 0, address));
}

IpAddress SolicitedNodeMulticast(const IpAddress& address) {
  const uint8_t* a = address.bytes();
  return V6({0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, a[13], a[14], a[15]});
}

uint16_t Icmpv6Checksum(const IpAddress& source, const IpAddress& destination,
                        absl::Span<const uint8_t> message) {
  uint32_t sum = Sum16(0, source.bytes(), 16);
  sum = Sum16(sum, destination.bytes(), 16);
  uint32_t length = static_cast<uint32_t>(message.size());
  sum += (length >> 16) + (length & 0xffff);
  sum += kIcmpv6;
  sum = Sum16(sum, message.data(), message.size());
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return static_cast<uint16_t>(~sum);
}

std::optional<Claim> ParseClaim(absl::Span<const uint8_t> frame, const MacAddress& own) {
  if (frame.size() < kEthernetHeaderSize) return std::nullopt;
  switch (Get16(frame.data() + 12)) {
    case kEthertypeArp:
      return ParseArp(frame.subspan(kEthernetHeaderSize), own);
    case kEthertypeIpv6:
      return ParseNd(frame, own);
    default:
      return std::nullopt;
  }
}

}  // namespace vmnet::announce
