// The announcer's frames byte by byte, their checksums recomputed here
// independently, and the answer parser on good, truncated and garbage frames.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <random>

#include "vmnet/announce/frames.h"

namespace vmnet::announce {
namespace {

using ::testing::ElementsAreArray;

IpAddress Ip(const char* s) { return *IpAddress::Parse(s); }
MacAddress Mac(const char* s) { return *MacAddress::Parse(s); }

const MacAddress kMac = Mac("02:00:00:00:00:01");
const MacAddress kOther = Mac("02:00:00:00:00:99");

// The one's-complement sum of the IPv6 pseudo-header and the ICMPv6 message
// of an IPv6 frame, checksum included: 0xffff when the checksum is right.
// Written apart from frames.cc on purpose.
uint16_t FoldedSum(const Frame& f) {
  std::vector<uint8_t> d(f.begin() + 22, f.begin() + 54);  // source, destination
  size_t length = f.size() - 54;
  d.push_back(0);
  d.push_back(0);
  d.push_back(static_cast<uint8_t>(length >> 8));
  d.push_back(static_cast<uint8_t>(length));
  d.insert(d.end(), {0, 0, 0, 58});
  d.insert(d.end(), f.begin() + 54, f.end());
  if (d.size() % 2) d.push_back(0);
  uint64_t sum = 0;
  for (size_t i = 0; i < d.size(); i += 2) sum += (d[i] << 8) | d[i + 1];
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return static_cast<uint16_t>(sum);
}

TEST(AnnounceFramesTest, GratuitousArp) {
  // clang-format off
  const uint8_t want[] = {
      0xff, 0xff, 0xff, 0xff, 0xff, 0xff,  // broadcast
      0x02, 0x00, 0x00, 0x00, 0x00, 0x01,  // link MAC
      0x08, 0x06,                          // ARP
      0x00, 0x01, 0x08, 0x00, 6, 4,        // Ethernet, IPv4
      0x00, 0x01,                          // request
      0x02, 0x00, 0x00, 0x00, 0x00, 0x01,  // sha
      198,  51,   100,  7,                 // spa
      0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // tha
      198,  51,   100,  7,                 // tpa
  };
  // clang-format on
  EXPECT_THAT(GratuitousArp(kMac, Ip("198.51.100.7")), ElementsAreArray(want));
}

TEST(AnnounceFramesTest, ArpProbe) {
  // clang-format off
  const uint8_t want[] = {
      0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01,
      0x08, 0x06, 0x00, 0x01, 0x08, 0x00, 6,    4,    0x00, 0x01,  // request
      0x02, 0x00, 0x00, 0x00, 0x00, 0x01,                          // sha
      0,    0,    0,    0,                                         // spa 0.0.0.0
      0x00, 0x00, 0x00, 0x00, 0x00, 0x00,                          // tha
      203,  0,    113,  9,                                         // tpa
  };
  // clang-format on
  EXPECT_THAT(ArpProbe(kMac, Ip("203.0.113.9")), ElementsAreArray(want));
}

TEST(AnnounceFramesTest, UnsolicitedNeighborAdvertisement) {
  // clang-format off
  const uint8_t want[] = {
      0x33, 0x33, 0x00, 0x00, 0x00, 0x01,  // all nodes
      0x02, 0x00, 0x00, 0x00, 0x00, 0x01,  // link MAC
      0x86, 0xdd,                          // IPv6
      0x60, 0x00, 0x00, 0x00,              // version 6
      0x00, 32,                            // payload length
      58,   255,                           // ICMPv6, hop limit 255
      0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,  // fe80::1
      0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,  // ff02::1
      136,  0,    0x28, 0x5c,                                // NA, code, checksum
      0x20, 0,    0,    0,                                   // Override only
      0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7,  // target
      2,    1,    0x02, 0x00, 0x00, 0x00, 0x00, 0x01,              // target lladdr
  };
  // clang-format on
  Frame f = UnsolicitedNeighborAdvertisement(kMac, Ip("2001:db8:1::7"), Ip("fe80::1"),
                                             /*router=*/false);
  EXPECT_THAT(f, ElementsAreArray(want));
  EXPECT_EQ(FoldedSum(f), 0xffff);
}

TEST(AnnounceFramesTest, RouterAdvertisementWithoutSourceUsesTheTarget) {
  Frame f = UnsolicitedNeighborAdvertisement(kMac, Ip("2001:db8:1::7"), IpAddress(),
                                             /*router=*/true);
  ASSERT_EQ(f.size(), 86u);
  EXPECT_EQ(IpAddress::FromBytes(IpAddress::Family::kV6, f.data() + 22),
            Ip("2001:db8:1::7"));
  EXPECT_EQ(f[58], 0xa0) << "Router and Override";
  EXPECT_EQ(f[56], 0x79);
  EXPECT_EQ(f[57], 0x1c);
  EXPECT_EQ(FoldedSum(f), 0xffff);
}

TEST(AnnounceFramesTest, DadNeighborSolicitation) {
  // clang-format off
  const uint8_t want[] = {
      0x33, 0x33, 0xff, 0x00, 0x00, 0x07,  // solicited-node group's MAC
      0x02, 0x00, 0x00, 0x00, 0x00, 0x01,  // link MAC
      0x86, 0xdd, 0x60, 0x00, 0x00, 0x00,
      0x00, 24,                                                 // payload length
      58,   255,                                                // ICMPv6, hop limit
      0,    0,    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,    0, 0,  // ::
      0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 7,  // ff02::1:ff00:7
      135,  0,    0x4c, 0xe0,                                   // NS, code, checksum
      0,    0,    0,    0,                                      // reserved
      0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7,  // target
  };
  // clang-format on
  Frame f = DadNeighborSolicitation(kMac, Ip("2001:db8:1::7"));
  EXPECT_THAT(f, ElementsAreArray(want));
  EXPECT_EQ(FoldedSum(f), 0xffff);
}

TEST(AnnounceFramesTest, SolicitedNodeMulticast) {
  EXPECT_EQ(SolicitedNodeMulticast(Ip("2001:db8::12:3456:789a")),
            Ip("ff02::1:ff56:789a"));
}

TEST(AnnounceFramesTest, ChecksumOfOddLength) {
  // RFC 1071's example bytes, as a message after an all-zero pseudo-header
  // of length 8 and next header 58: sum 0xddf2 + 8 + 58.
  const uint8_t message[] = {0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7};
  IpAddress zero = Ip("::");
  EXPECT_EQ(Icmpv6Checksum(zero, zero, message),
            static_cast<uint16_t>(~(0xddf2 + 8 + 58)));
  const uint8_t odd[] = {0x12, 0x34, 0x56};  // 0x1234 + 0x5600 + 3 + 58
  EXPECT_EQ(Icmpv6Checksum(zero, zero, odd),
            static_cast<uint16_t>(~(0x1234 + 0x5600 + 3 + 58)));
}

// Frames as another machine would send them.
Frame ArpFrom(const MacAddress& sha, const char* spa, const char* tpa, uint8_t op) {
  Frame f = GratuitousArp(sha, Ip(spa));
  f[21] = op;
  IpAddress t = Ip(tpa);
  std::copy(t.bytes(), t.bytes() + 4, f.begin() + 38);
  return f;
}

TEST(AnnounceFramesTest, ArpRepliesAndRequestsClaimTheirSenderAddress) {
  auto claim = ParseClaim(ArpFrom(kOther, "198.51.100.1", "0.0.0.0", 2), kMac);
  ASSERT_TRUE(claim);
  EXPECT_EQ(claim->address, Ip("198.51.100.1"));
  EXPECT_EQ(claim->mac, kOther);
  claim = ParseClaim(ArpFrom(kOther, "198.51.100.1", "198.51.100.9", 1), kMac);
  ASSERT_TRUE(claim);
  EXPECT_EQ(claim->address, Ip("198.51.100.1"));
  // A probe from another machine claims its target; our own frames nothing.
  claim = ParseClaim(ArpProbe(kOther, Ip("198.51.100.5")), kMac);
  ASSERT_TRUE(claim);
  EXPECT_EQ(claim->address, Ip("198.51.100.5"));
  EXPECT_FALSE(ParseClaim(ArpProbe(kMac, Ip("198.51.100.5")), kMac));
  EXPECT_FALSE(ParseClaim(GratuitousArp(kMac, Ip("198.51.100.5")), kMac));
  // A reply from 0.0.0.0 claims nothing.
  EXPECT_FALSE(ParseClaim(ArpFrom(kOther, "0.0.0.0", "198.51.100.5", 2), kMac));
}

TEST(AnnounceFramesTest, ArpOfOtherKindsIsIgnored) {
  Frame f = ArpFrom(kOther, "198.51.100.1", "0.0.0.0", 3);  // RARP request
  EXPECT_FALSE(ParseClaim(f, kMac));
  f = ArpFrom(kOther, "198.51.100.1", "0.0.0.0", 2);
  f[17] = 0xdd;  // protocol type IPv6
  EXPECT_FALSE(ParseClaim(f, kMac));
  f = ArpFrom(kOther, "198.51.100.1", "0.0.0.0", 2);
  f[18] = 8;  // hardware length
  EXPECT_FALSE(ParseClaim(f, kMac));
  // A multicast sender hardware address is nobody's.
  EXPECT_FALSE(
      ParseClaim(ArpFrom(Mac("01:00:5e:00:00:01"), "198.51.100.1", "0.0.0.0", 2), kMac));
}

TEST(AnnounceFramesTest, NeighborAdvertisementClaimsItsTargetForItsOption) {
  Frame f =
      UnsolicitedNeighborAdvertisement(kOther, Ip("2001:db8:1::1"), Ip("fe80::2"), false);
  auto claim = ParseClaim(f, kMac);
  ASSERT_TRUE(claim);
  EXPECT_EQ(claim->address, Ip("2001:db8:1::1"));
  EXPECT_EQ(claim->mac, kOther);
  EXPECT_FALSE(ParseClaim(f, kOther)) << "our own advertisement";
}

// An NA without options, with a correct checksum: the MAC is the Ethernet
// source.
TEST(AnnounceFramesTest, NeighborAdvertisementWithoutOptionUsesTheEthernetSource) {
  Frame f =
      UnsolicitedNeighborAdvertisement(kOther, Ip("2001:db8:1::1"), Ip("fe80::2"), false);
  f.resize(f.size() - 8);
  f[19] = 24;  // payload length
  f[56] = f[57] = 0;
  IpAddress src = IpAddress::FromBytes(IpAddress::Family::kV6, f.data() + 22);
  IpAddress dst = IpAddress::FromBytes(IpAddress::Family::kV6, f.data() + 38);
  uint16_t sum = Icmpv6Checksum(src, dst, absl::MakeConstSpan(f).subspan(54));
  f[56] = sum >> 8;
  f[57] = sum & 0xff;
  ASSERT_EQ(FoldedSum(f), 0xffff);
  auto claim = ParseClaim(f, kMac);
  ASSERT_TRUE(claim);
  EXPECT_EQ(claim->mac, kOther);
}

TEST(AnnounceFramesTest, DadSolicitationFromAnotherMachineClaimsItsTarget) {
  auto claim = ParseClaim(DadNeighborSolicitation(kOther, Ip("2001:db8:1::5")), kMac);
  ASSERT_TRUE(claim);
  EXPECT_EQ(claim->address, Ip("2001:db8:1::5"));
  EXPECT_EQ(claim->mac, kOther);
  EXPECT_FALSE(ParseClaim(DadNeighborSolicitation(kMac, Ip("2001:db8:1::5")), kMac));
}

TEST(AnnounceFramesTest, InvalidNeighborDiscoveryIsIgnored) {
  Frame good =
      UnsolicitedNeighborAdvertisement(kOther, Ip("2001:db8:1::1"), Ip("fe80::2"), false);
  ASSERT_TRUE(ParseClaim(good, kMac));
  Frame f = good;
  f[21] = 64;  // hop limit: forwarded from off link
  EXPECT_FALSE(ParseClaim(f, kMac));
  f = good;
  f[57] ^= 1;  // checksum
  EXPECT_FALSE(ParseClaim(f, kMac));
  f = good;
  f[55] = 1;  // code
  EXPECT_FALSE(ParseClaim(f, kMac));
  f = good;
  f[79] = 0;  // option length 0
  EXPECT_FALSE(ParseClaim(f, kMac));
  f = good;
  f[19] = 200;  // payload length beyond the frame
  EXPECT_FALSE(ParseClaim(f, kMac));
  f = good;
  f[20] = 0;  // hop-by-hop options header first
  EXPECT_FALSE(ParseClaim(f, kMac));
}

TEST(AnnounceFramesTest, TruncatedFramesAreIgnored) {
  for (const Frame& whole : {ArpFrom(kOther, "198.51.100.1", "0.0.0.0", 2),
                             UnsolicitedNeighborAdvertisement(kOther, Ip("2001:db8:1::1"),
                                                              Ip("fe80::2"), false),
                             DadNeighborSolicitation(kOther, Ip("2001:db8:1::5"))}) {
    ASSERT_TRUE(ParseClaim(whole, kMac));
    for (size_t n = 0; n < whole.size(); ++n) {
      // A copy of exactly n bytes, so ASan sees any read past it.
      std::vector<uint8_t> cut(whole.begin(), whole.begin() + n);
      EXPECT_FALSE(ParseClaim(cut, kMac)) << n << " bytes";
    }
  }
}

TEST(AnnounceFramesTest, GarbageNeverClaims) {
  std::mt19937 random(7);
  for (int i = 0; i < 20000; ++i) {
    std::vector<uint8_t> junk(random() % 120);
    for (uint8_t& b : junk) b = static_cast<uint8_t>(random());
    if (junk.size() >= 14 && i % 2 == 0) {  // half of it with a plausible type
      junk[12] = i % 4 == 0 ? 0x08 : 0x86;
      junk[13] = i % 4 == 0 ? 0x06 : 0xdd;
    }
    auto claim = ParseClaim(junk, kMac);
    if (claim) {
      EXPECT_NE(claim->mac, kMac);
    }
  }
}

}  // namespace
}  // namespace vmnet::announce
