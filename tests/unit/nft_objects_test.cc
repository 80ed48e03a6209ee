// The port-security value types, and the fake kernel behind
// PortSecurityKernel answering the way NftKernel does (the kernel tests
// check NftKernel itself).
#include "vmnet/kernel/nft_objects.h"

#include <errno.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <linux/netfilter/nf_tables.h>
#include <linux/netfilter/nfnetlink.h>

#include "fake_port_security_kernel.h"
#include "vmnet/kernel/nft_codec.h"

namespace vmnet::kernel {
namespace {

using ::testing::HasSubstr;

IpPrefix Prefix(const char* s) { return *IpPrefix::Parse(s); }

TEST(NftObjects, NonOverlappingPrefixesKeepsTheCoveringOnes) {
  EXPECT_EQ(NonOverlappingPrefixes({Prefix("198.51.100.0/25"), Prefix("198.51.100.0/24"),
                                    Prefix("203.0.113.0/24"), Prefix("198.51.100.0/24"),
                                    Prefix("2001:db8::/32"), Prefix("2001:db8:1::/48")}),
            (std::vector<IpPrefix>{Prefix("198.51.100.0/24"), Prefix("203.0.113.0/24"),
                                   Prefix("2001:db8::/32")}));
  EXPECT_EQ(NonOverlappingPrefixes({Prefix("0.0.0.0/0"), Prefix("::/0")}),
            (std::vector<IpPrefix>{Prefix("0.0.0.0/0"), Prefix("::/0")}));
}

TEST(NftObjects, FingerprintIsCanonicalAndShort) {
  PortSecurityConfig a{
      {{VmToHostPort::Protocol::kUdp, 53}, {VmToHostPort::Protocol::kTcp, 80}}};
  PortSecurityConfig b{{{VmToHostPort::Protocol::kTcp, 80},
                        {VmToHostPort::Protocol::kUdp, 53},
                        {VmToHostPort::Protocol::kTcp, 80}}};
  EXPECT_EQ(a.Fingerprint(), b.Fingerprint());
  EXPECT_EQ(a.Fingerprint(), "vmnetd-portsec-2 allow=tcp/80,udp/53");
  EXPECT_NE(a.Fingerprint(), PortSecurityConfig{}.Fingerprint());
  PortSecurityConfig many;
  for (uint16_t p = 1000; p < 1100; ++p)
    many.vm_to_host_allow.push_back({VmToHostPort::Protocol::kTcp, p});
  EXPECT_LE(many.Fingerprint().size(), 100u);
}

TEST(NftObjects, WritesNameTheirObject) {
  EXPECT_EQ(ToString(NftWrite{AddNftElement{NftSourcePrefix{"vme1a", Prefix("::/0")}}}),
            "add permitted source vme1a . ::/0");
  EXPECT_EQ(ToString(NftWrite{DeleteNftElement{NftVmLink{"vme1a"}}}),
            "delete port-security link vme1a");
}

TEST(FakePortSecurityKernel, AnswersLikeTheKernel) {
  testing::FakePortSecurityKernel k;
  auto r = k.Apply({AddNftElement{NftVmLink{"vme1a"}}});
  EXPECT_TRUE(absl::IsNotFound(r[0])) << r[0];

  PortSecurityConfig config{{{VmToHostPort::Protocol::kUdp, 53}}};
  r = k.Apply({EnsurePortSecurityBase{config}, AddNftElement{NftVmLink{"vme1a"}},
               AddNftElement{NftSourcePrefix{"vme1a", Prefix("198.51.100.201/32")}},
               AddNftElement{NftSourcePrefix{"vme1a", Prefix("198.51.100.0/24")}}});
  for (const auto& s : r) EXPECT_TRUE(s.ok()) << s;
  auto snap = k.Dump();
  ASSERT_TRUE(snap.ok());
  EXPECT_TRUE(snap->BaseMatches(config));
  EXPECT_EQ(snap->elements.size(), 3u);

  // Overlapping ranges: refused, and the transaction rolled back.
  r = k.Apply({DeleteNftElement{NftVmLink{"vme1a"}},
               AddNftElement{NftSourcePrefix{"vme1a", Prefix("198.51.100.0/25")}}});
  EXPECT_TRUE(absl::IsAborted(r[0])) << r[0];
  EXPECT_TRUE(absl::IsAlreadyExists(r[1])) << r[1];
  EXPECT_EQ(k.elements().size(), 3u);

  std::vector<NftEvent> events;
  ASSERT_TRUE(k.ReadEvents(&events).ok());
  EXPECT_FALSE(events.empty());
  for (const auto& e : events) EXPECT_TRUE(e.own);

  k.DeleteTable();
  events.clear();
  ASSERT_TRUE(k.ReadEvents(&events).ok());
  ASSERT_EQ(events.size(), 1u);
  EXPECT_FALSE(events[0].own);
  EXPECT_THAT(events[0].what, HasSubstr("delete table"));

  k.SetConntrackPresent(false);
  auto ct = k.DeleteConntrack({*IpAddress::Parse("198.51.100.201")});
  ASSERT_EQ(ct.size(), 1u);
  ASSERT_TRUE(ct[0].ok());
  EXPECT_FALSE(ct[0]->conntrack_present);
}

// The messages of `writes` fed to the dump parser as if the kernel had
// answered a dump with them (destroys skipped: they remove what a fresh
// base does not hold anyway).
NftDumpParser Replay(const std::vector<NftWrite>& writes) {
  NftDumpParser parser;
  for (const NftWrite& w : writes) {
    std::vector<NftMessage> messages;
    EXPECT_TRUE(EncodeNftWrite(w, &messages).ok());
    for (const NftMessage& m : messages) {
      const auto* nlh = reinterpret_cast<const nlmsghdr*>(m.data());
      switch (nlh->nlmsg_type & 0xff) {
        case NFT_MSG_NEWTABLE:
          parser.AddTable(nlh);
          break;
        case NFT_MSG_NEWCHAIN:
          parser.AddChain(nlh);
          break;
        case NFT_MSG_NEWRULE:
          parser.AddRule(nlh);
          break;
        case NFT_MSG_NEWSET:
          parser.AddSet(nlh);
          break;
        case NFT_MSG_NEWSETELEM:
          parser.AddElements(nlh);
          break;
        case NFT_MSG_NEWOBJ:
          parser.AddCounter(nlh);
          break;
        default:
          break;
      }
    }
  }
  return parser;
}

TEST(NftCodec, PacketRateLimitRoundTripsThroughTheDumpParser) {
  const PortSecurityConfig config;
  NftSnapshot snap =
      Replay({EnsurePortSecurityBase{config}, AddNftElement{NftVmLink{"vme1a"}},
              AddNftElement{MakePacketRateLimit("vme1a", 200)}})
          .Finish();
  // (Whether the base matches is the kernel test's: request messages are not
  // exactly what a dump returns.)
  EXPECT_EQ(snap.elements,
            (std::vector<NftElement>{NftVmLink{"vme1a"},
                                     NftPacketRateLimit{"vme1a", 200, 20}}));
  EXPECT_EQ(snap.foreign_elements, 0);

  // Its drop counter is reported as the packet-rate reason, apart from port
  // security's own three.
  auto counters = Replay({EnsurePortSecurityBase{config},
                          AddNftElement{MakePacketRateLimit("vme1a", 200)}})
                      .Counters();
  ASSERT_EQ(counters.size(), 1u);
  EXPECT_EQ(counters[0].reason, DropReason::kEgressPacketRate);
  EXPECT_EQ(counters[0].ifname, "vme1a");
}

TEST(NftCodec, AnAddReplacesTheLimitAndADeleteTakesEveryPart) {
  std::vector<NftMessage> add, del;
  ASSERT_TRUE(
      EncodeNftWrite(AddNftElement{MakePacketRateLimit("vme1a", 200)}, &add).ok());
  ASSERT_TRUE(
      EncodeNftWrite(DeleteNftElement{MakePacketRateLimit("vme1a", 200)}, &del).ok());
  auto types = [](const std::vector<NftMessage>& ms) {
    std::vector<int> out;
    for (const auto& m : ms)
      out.push_back(reinterpret_cast<const nlmsghdr*>(m.data())->nlmsg_type & 0xff);
    return out;
  };
  constexpr int kDestroyElem = 30, kDestroyObj = 31;
  // The limit's element and object destroyed, then the object, the counter
  // and both elements created: one transaction, never unlimited between.
  EXPECT_EQ(types(add),
            (std::vector<int>{kDestroyElem, kDestroyObj, NFT_MSG_NEWOBJ, NFT_MSG_NEWOBJ,
                              NFT_MSG_NEWSETELEM, NFT_MSG_NEWSETELEM}));
  EXPECT_EQ(types(del),
            (std::vector<int>{kDestroyElem, kDestroyObj, kDestroyElem, kDestroyObj}));
  std::vector<NftMessage> bad;
  EXPECT_FALSE(
      EncodeNftWrite(AddNftElement{NftPacketRateLimit{"vme1a", 0, 0}}, &bad).ok());
  EXPECT_FALSE(
      EncodeNftWrite(AddNftElement{MakePacketRateLimit("much-too-long-name", 1)}, &bad)
          .ok());
}

TEST(NftCodec, AHalfPresentLimitIsReportedWithRateZero) {
  // The limit object without its counter (deleted by someone): rate 0, so
  // the plan replaces it (desired) or deletes it (not).
  NftDumpParser parser = Replay({EnsurePortSecurityBase{PortSecurityConfig{}}});
  std::vector<NftMessage> add;
  ASSERT_TRUE(
      EncodeNftWrite(AddNftElement{MakePacketRateLimit("vme1a", 200)}, &add).ok());
  parser.AddCounter(reinterpret_cast<const nlmsghdr*>(add[2].data()));  // the limit only
  EXPECT_EQ(parser.Finish().elements,
            (std::vector<NftElement>{NftPacketRateLimit{"vme1a", 0, 0}}));
}

TEST(NftCodec, LimitEventsNameTheLinkWithUnknownRate) {
  std::vector<NftMessage> add;
  ASSERT_TRUE(
      EncodeNftWrite(AddNftElement{MakePacketRateLimit("vme1a", 200)}, &add).ok());
  int limit_events = 0;
  for (const NftMessage& m : add) {
    for (const NftEvent& e :
         ParseNftEvent(reinterpret_cast<const nlmsghdr*>(m.data()), 0)) {
      ASSERT_TRUE(e.element.has_value()) << e.ToString();
      EXPECT_EQ(*e.element, (NftElement{NftPacketRateLimit{"vme1a", 0, 0}}))
          << e.ToString();
      ++limit_events;
    }
  }
  EXPECT_EQ(limit_events, 4);  // the four creations (destroys are not events here)
}

TEST(NftObjects, PacketRateBurstIsATenthOfASecondAndAtLeastFive) {
  EXPECT_EQ(PacketRateBurst(1), 5u);
  EXPECT_EQ(PacketRateBurst(200), 20u);
  EXPECT_EQ(PacketRateBurst(1000000000), 100000000u);
  EXPECT_EQ(ToString(MakePacketRateLimit("vme1a", 200)),
            "packet-rate limit vme1a over 200/second burst 20 packets");
}

}  // namespace
}  // namespace vmnet::kernel
