#include "vmnet/net/address.h"

#include <gtest/gtest.h>

namespace vmnet {
namespace {

TEST(IpAddressTest, ParsesAndPrintsCanonicalForms) {
  EXPECT_EQ(IpAddress::Parse("198.51.100.7")->ToString(), "198.51.100.7");
  EXPECT_EQ(IpAddress::Parse("2001:DB8:0::1")->ToString(), "2001:db8::1");
  EXPECT_FALSE(IpAddress::Parse(""));
  EXPECT_FALSE(IpAddress::Parse("198.51.100"));
  EXPECT_FALSE(IpAddress::Parse("198.51.100.256"));
  EXPECT_FALSE(IpAddress::Parse(" 198.51.100.1"));
  EXPECT_FALSE(IpAddress::Parse(std::string(5000, '1')));
}

TEST(IpAddressTest, Classifies) {
  EXPECT_TRUE(IpAddress::Parse("0.0.0.0")->IsUnspecified());
  EXPECT_TRUE(IpAddress::Parse("127.0.0.2")->IsLoopback());
  EXPECT_TRUE(IpAddress::Parse("224.0.0.1")->IsMulticast());
  EXPECT_TRUE(IpAddress::Parse("169.254.1.1")->IsLinkLocal());
  EXPECT_TRUE(IpAddress::Parse("255.255.255.255")->IsLimitedBroadcast());
  EXPECT_TRUE(IpAddress::Parse("::ffff:198.51.100.1")->IsV4Mapped());
  EXPECT_TRUE(IpAddress::Parse("fe80::1")->IsLinkLocal());
  EXPECT_FALSE(IpAddress::Parse("198.51.100.1")->IsLinkLocal());
}

TEST(IpPrefixTest, ContainsAndBroadcast) {
  auto p = *IpPrefix::Parse("198.51.100.0/24");
  EXPECT_TRUE(p.Contains(*IpAddress::Parse("198.51.100.200")));
  EXPECT_FALSE(p.Contains(*IpAddress::Parse("198.51.101.1")));
  EXPECT_EQ(p.Last().ToString(), "198.51.100.255");
  EXPECT_EQ(IpPrefix::Parse("203.0.113.64/26")->Last().ToString(), "203.0.113.127");
  EXPECT_EQ(IpPrefix::Parse("198.51.100.7")->ToString(), "198.51.100.7/32");
  EXPECT_FALSE(IpPrefix::Parse("198.51.100.0/33"));
  EXPECT_FALSE(IpPrefix::Parse("198.51.100.0/-1"));
}

TEST(MacAddressTest, ParsesStrictly) {
  EXPECT_EQ(MacAddress::Parse("02:AB:cd:00:00:01")->ToString(), "02:ab:cd:00:00:01");
  EXPECT_EQ(MacAddress::Parse("02-ab-cd-00-00-01")->ToString(), "02:ab:cd:00:00:01");
  EXPECT_FALSE(MacAddress::Parse("02:ab:cd:00:00"));
  EXPECT_FALSE(MacAddress::Parse("02:ab:cd:00:00:0g"));
  EXPECT_FALSE(MacAddress::Parse("zz"));
  EXPECT_TRUE(MacAddress::Parse("01:00:5e:00:00:01")->IsMulticast());
  EXPECT_TRUE(MacAddress::Parse("00:00:00:00:00:00")->IsZero());
}

}  // namespace
}  // namespace vmnet
