// The port-security value types, and the fake kernel behind
// PortSecurityKernel answering the way NftKernel does (the kernel tests
// check NftKernel itself).
#include "vmnet/kernel/nft_objects.h"

#include <errno.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "fake_port_security_kernel.h"

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
  EXPECT_EQ(a.Fingerprint(), "vmnetd-portsec-1 allow=tcp/80,udp/53");
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
  auto ct = k.DeleteConntrack(*IpAddress::Parse("198.51.100.201"));
  ASSERT_TRUE(ct.ok());
  EXPECT_FALSE(ct->conntrack_present);
}

}  // namespace
}  // namespace vmnet::kernel
