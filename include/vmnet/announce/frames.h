// The Ethernet frames the announcer sends and reads: gratuitous ARP and
// unsolicited Neighbour Advertisements, which tell a link's neighbours the
// MAC now behind an address, and the duplicate-address probes (ARP probe,
// RFC 5227; DAD Neighbour Solicitation, RFC 4862) with the parser for their
// answers. Pure functions over bytes: no sockets, no state.
//
// The parsers take untrusted bytes (anything an AF_PACKET socket received)
// and never read past the span they are given.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "absl/types/span.h"
#include "vmnet/net/address.h"

namespace vmnet::announce {

using Frame = std::vector<uint8_t>;

inline constexpr uint16_t kEthertypeArp = 0x0806;
inline constexpr uint16_t kEthertypeIpv6 = 0x86dd;
inline constexpr size_t kEthernetHeaderSize = 14;

// Gratuitous ARP: a broadcast ARP request from `mac` with sender and target
// protocol address both `address` (IPv4).
Frame GratuitousArp(const MacAddress& mac, const IpAddress& address);

// Unsolicited Neighbour Advertisement to all nodes (ff02::1) for `target`
// (IPv6) from `mac`: Override set, Solicited clear, Router as `router`, with
// the Target Link-Layer Address option. `source` is the IPv6 source (the
// link's link-local address); when it is not IPv6, `target` is used.
Frame UnsolicitedNeighborAdvertisement(const MacAddress& mac, const IpAddress& target,
                                       const IpAddress& source, bool router);

// ARP probe (RFC 5227): a broadcast ARP request from `mac` with sender
// protocol address 0.0.0.0 and target protocol address `address`.
Frame ArpProbe(const MacAddress& mac, const IpAddress& address);

// Duplicate Address Detection Neighbour Solicitation (RFC 4862) for
// `address` (IPv6): source ::, to its solicited-node multicast group, no
// source link-layer option.
Frame DadNeighborSolicitation(const MacAddress& mac, const IpAddress& address);

// ff02::1:ffXX:XXXX, the solicited-node multicast group of `address`.
IpAddress SolicitedNodeMulticast(const IpAddress& address);

// The ICMPv6 checksum of `message` (whose checksum field is taken as it is:
// zero it to compute, keep it to verify, when the result must be 0) over the
// IPv6 pseudo-header of `source` and `destination`.
uint16_t Icmpv6Checksum(const IpAddress& source, const IpAddress& destination,
                        absl::Span<const uint8_t> message);

// An address some machine other than us uses or wants, read from a frame
// received while probing: `address` and the MAC that claims it.
struct Claim {
  IpAddress address;
  MacAddress mac;
};

// The claim a received frame makes, if any, where `own` is the MAC of the
// link it came in on (frames from `own` make no claim):
//  - an ARP request or reply (Ethernet/IPv4) claims its sender protocol
//    address for its sender hardware address; an ARP probe (sender 0.0.0.0)
//    claims its target protocol address (RFC 5227's simultaneous probe);
//  - a Neighbour Advertisement claims its target, for the MAC of its Target
//    Link-Layer Address option, else the Ethernet source;
//  - a DAD Neighbour Solicitation (source ::) claims its target, for the
//    Ethernet source (RFC 4862's simultaneous DAD).
// IPv6 messages must be valid Neighbour Discovery: hop limit 255, code 0, a
// correct checksum, well-formed options.
std::optional<Claim> ParseClaim(absl::Span<const uint8_t> frame, const MacAddress& own);

}  // namespace vmnet::announce
