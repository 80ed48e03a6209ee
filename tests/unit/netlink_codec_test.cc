// Encode -> parse round trips of the netlink codec, and hostile bytes.
#include "vmnet/kernel/netlink_codec.h"

#include <gtest/gtest.h>
#include <linux/neighbour.h>
#include <linux/rtnetlink.h>

#include <random>

namespace vmnet::kernel {
namespace {

const nlmsghdr* Header(const std::vector<uint8_t>& bytes) {
  return reinterpret_cast<const nlmsghdr*>(bytes.data());
}

TEST(NetlinkCodecTest, RouteRoundTrip) {
  Route r;
  r.destination = IpPrefix::Host(*IpAddress::Parse("198.51.100.201"));
  r.ifindex = 7;
  r.protocol = 237;
  r.scope = RT_SCOPE_LINK;
  auto bytes = EncodeWrite(AddRoute{r});
  auto* h = Header(bytes);
  EXPECT_EQ(h->nlmsg_type, RTM_NEWROUTE);
  EXPECT_TRUE(h->nlmsg_flags & NLM_F_EXCL) << "never overwrite someone else's route";
  auto parsed = ParseRoute(h);
  ASSERT_TRUE(parsed);
  EXPECT_EQ(*parsed, r);
}

TEST(NetlinkCodecTest, NeighborRoundTrip) {
  Neighbor n;
  n.ifindex = 3;
  n.address = *IpAddress::Parse("198.51.100.201");
  n.proxy = true;
  n.protocol = 237;
  n.state = NUD_PERMANENT;
  auto parsed = ParseNeighbor(Header(EncodeWrite(SetNeighbor{n})));
  ASSERT_TRUE(parsed);
  EXPECT_EQ(*parsed, n);
}

TEST(NetlinkCodecTest, AddressRoundTrip) {
  Address a;
  a.ifindex = 3;
  a.prefix = *IpPrefix::Parse("169.255.30.1/32");
  a.scope = RT_SCOPE_LINK;
  a.protocol = 237;
  a.flags = 0x200;
  auto parsed = ParseAddress(Header(EncodeWrite(AddAddress{a})));
  ASSERT_TRUE(parsed);
  EXPECT_EQ(*parsed, a);
}

TEST(NetlinkCodecTest, HostileBytesNeverCrashTheParsers) {
  std::mt19937 rng(1234);
  Route r;
  r.destination = *IpPrefix::Parse("203.0.113.0/24");
  r.ifindex = 2;
  auto good = EncodeWrite(AddRoute{r});
  for (int round = 0; round < 20000; ++round) {
    auto bytes = good;
    int flips = 1 + static_cast<int>(rng() % 4);
    for (int i = 0; i < flips; ++i)
      bytes[rng() % bytes.size()] = static_cast<uint8_t>(rng());
    bytes.resize(rng() % (bytes.size() + 8));
    ForEachMessage(bytes.data(), bytes.size(),
                   [](const nlmsghdr* msg) { (void)ParseEvent(msg); });
  }
}

}  // namespace
}  // namespace vmnet::kernel
