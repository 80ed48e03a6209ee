// Encode -> parse round trips of the netlink codec, and hostile bytes.
#include "vmnet/kernel/netlink_codec.h"

#include <gtest/gtest.h>
#include <linux/neighbour.h>
#include <linux/rtnetlink.h>

#include <algorithm>
#include <memory>
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

// Mutated route messages: the walker hands out only messages inside the
// buffer, and whatever a parser accepts is well-formed (a route: family v4 or
// v6, a prefix length that fits the address, a gateway of the same family;
// likewise for the other kinds a mutated type turns it into).
// Each input sits in an allocation of exactly its size, so a read past it is
// an AddressSanitizer error. Both outcomes must occur: mutations that are
// rejected and mutations that still parse, or the loop proves nothing.
TEST(NetlinkCodecTest, HostileBytesNeverCrashTheParsers) {
  std::mt19937 rng(1234);
  Route r;
  r.destination = *IpPrefix::Parse("203.0.113.0/24");
  r.ifindex = 2;
  auto good = EncodeWrite(AddRoute{r});
  {
    auto event = ParseEvent(Header(good));
    ASSERT_TRUE(event.has_value()) << "the unmutated message must parse";
    ASSERT_TRUE(std::holds_alternative<RouteEvent>(*event));
    EXPECT_EQ(std::get<RouteEvent>(*event).route.destination, r.destination);
  }
  size_t parsed = 0, rejected = 0;
  for (int round = 0; round < 20000; ++round) {
    auto bytes = good;
    int flips = 1 + static_cast<int>(rng() % 4);
    for (int i = 0; i < flips; ++i)
      bytes[rng() % bytes.size()] = static_cast<uint8_t>(rng());
    bytes.resize(rng() % (bytes.size() + 8));
    std::unique_ptr<uint8_t[]> exact(new uint8_t[bytes.size() + 1]);  // +1: never size 0
    std::copy(bytes.begin(), bytes.end(), exact.get());
    const uint8_t* begin = exact.get();
    const uint8_t* end = begin + bytes.size();
    ForEachMessage(begin, bytes.size(), [&](const nlmsghdr* msg) {
      const auto* at = reinterpret_cast<const uint8_t*>(msg);
      ASSERT_GE(at, begin);
      ASSERT_LE(at + sizeof(nlmsghdr), end);
      ASSERT_LE(at + msg->nlmsg_len, end) << "a message reaching past the buffer";
      auto event = ParseEvent(msg);
      if (!event) {
        ++rejected;
        return;
      }
      ++parsed;
      // A mutated type may make it another kind of message; each kind keeps its rules.
      if (const auto* route = std::get_if<RouteEvent>(&*event)) {
        const Route& got = route->route;
        const IpAddress& dst = got.destination.address;
        ASSERT_TRUE(dst.is_v4() || dst.is_v6()) << "round " << round;
        EXPECT_LE(got.destination.length, dst.bit_length()) << "round " << round;
        if (got.gateway.family() != IpAddress::Family::kNone) {
          EXPECT_EQ(got.gateway.family(), dst.family()) << "round " << round;
        }
      } else if (const auto* n = std::get_if<NeighborEvent>(&*event)) {
        EXPECT_TRUE(n->neighbor.address.is_v4() || n->neighbor.address.is_v6())
            << "round " << round;
      } else if (const auto* a = std::get_if<AddressEvent>(&*event)) {
        const IpPrefix& prefix = a->address.prefix;
        ASSERT_TRUE(prefix.address.is_v4() || prefix.address.is_v6())
            << "round " << round;
        EXPECT_LE(prefix.length, prefix.address.bit_length()) << "round " << round;
      }
    });
  }
  EXPECT_GT(parsed, 100u) << "hardly any mutation parsed: the loop tests only rejection";
  EXPECT_GT(rejected, 100u) << "no mutation was rejected: the parser validates nothing";
}

}  // namespace
}  // namespace vmnet::kernel
