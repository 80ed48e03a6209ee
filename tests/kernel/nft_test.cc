// NftKernel against the real kernel, in the test's own namespace (see
// netns_main.cc). What it claims is checked with `nft`, `ip` and
// `conntrack` inside that namespace, and with real packets from a "VM": a
// veth peer in a child namespace of its own, removed in TearDown.
#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <iostream>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "kernel_test.h"
#include "vmnet/kernel/nft_kernel.h"

namespace vmnet::kernel {
namespace {

using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

IpAddress Ip(const char* s) { return *IpAddress::Parse(s); }
IpPrefix Prefix(const char* s) { return *IpPrefix::Parse(s); }

int CountRules() {
  return std::stoi(
      Sh("nft -j list ruleset | /usr/bin/python3 -c 'import json,sys; "
         "print(sum(1 for o in json.load(sys.stdin)[\"nftables\"] if \"rule\" in o))'"));
}

class NftKernelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!KernelTestsIsolated()) GTEST_SKIP() << KernelTestsSkipReason();
    Sh("nft delete table inet vmnet 2>/dev/null; nft delete table arp vmnet 2>/dev/null");
    vm_ns_ = absl::StrCat("nftvm", getpid());
    auto k = NftKernel::Create({});
    ASSERT_TRUE(k.ok()) << k.status();
    kernel_ = std::move(*k);
  }

  void TearDown() override {
    if (!KernelTestsIsolated()) return;
    Sh("ip link del vme1a 2>/dev/null; ip netns del " + vm_ns_ + " 2>/dev/null");
    Sh("ip link del eth0 2>/dev/null; ip netns del " + x_ns() + " 2>/dev/null");
    Sh("for t in 'inet vmnet' 'arp vmnet' 'inet other' 'arp other'; do "
       "nft delete table $t 2>/dev/null; done");
  }

  // The VM: vm0 in its own namespace, 198.51.100.201 and 2001:db8:1::201,
  // routed host-side by /32 and /128 routes on vme1a; the gateway
  // 169.255.30.1 and fe80::ffff:1:1 on vme1a. Neighbours are permanent on
  // both sides, so no test depends on ARP/ND (except the ARP test).
  void MakeVm() {
    ASSERT_EQ(Sh("ip netns add " + vm_ns_), "");
    std::string in_vm = "ip netns exec " + vm_ns_ + " ";
    ASSERT_EQ(
        Sh("ip link add vme1a type veth peer name vm0 netns " + vm_ns_ +
           " && ip link set vme1a address 02:00:00:00:00:aa && ip link set vme1a up"
           " && ip addr add 169.255.30.1/32 dev vme1a scope link noprefixroute"
           " && ip -6 addr add fe80::ffff:1:1/64 dev vme1a nodad"
           " && ip route add 198.51.100.201/32 dev vme1a scope link"
           " && ip route add 203.0.113.0/28 dev vme1a scope link"
           " && ip neigh replace 203.0.113.5 lladdr 02:00:00:00:00:01 dev vme1a nud "
           "permanent"
           " && ip -6 route add 2001:db8:1::201/128 dev vme1a"
           " && ip -6 addr replace 2001:db8:ffff::1/128 dev lo"
           " && ip neigh replace 198.51.100.201 lladdr 02:00:00:00:00:01 dev vme1a nud "
           "permanent"
           " && ip -6 neigh replace 2001:db8:1::201 lladdr 02:00:00:00:00:01 dev vme1a "
           "nud permanent && " +
           in_vm +
           "sh -c 'ip link set lo up && ip link set vm0 address 02:00:00:00:00:01"
           " && ip link set vm0 up && ip addr add 198.51.100.201/32 dev vm0"
           " && ip addr add 198.51.100.202/32 dev vm0 && ip addr add 203.0.113.5/32 dev "
           "vm0"
           " && ip -6 addr add 2001:db8:1::201/128 dev vm0 nodad"
           " && ip -6 addr add 2001:db8:1::202/128 dev vm0 nodad"
           " && ip route add 169.255.30.1 dev vm0 scope link"
           " && ip route add default via 169.255.30.1 dev vm0"
           " && ip -6 route add default via fe80::ffff:1:1 dev vm0"
           " && ip neigh replace 169.255.30.1 lladdr 02:00:00:00:00:aa dev vm0 nud "
           "permanent"
           " && ip -6 neigh replace fe80::ffff:1:1 lladdr 02:00:00:00:00:aa dev vm0 nud "
           "permanent'"),
        "");
  }

  // X: lan0 in a namespace of its own, 198.51.100.10/24 and 2001:db8:2::10/64,
  // behind the host's eth0 (198.51.100.1, 2001:db8:2::1), which proxies ARP
  // for the VM's address; the host forwards.
  std::string x_ns() const { return vm_ns_ + "x"; }
  void MakeX() {
    std::string x_ns = this->x_ns();
    std::string in_x = "ip netns exec " + x_ns + " ";
    ASSERT_EQ(
        Sh("ip netns add " + x_ns +
           " && ip link add eth0 type veth peer name lan0 netns " + x_ns +
           " && ip link set eth0 address 02:00:00:00:00:11 && ip link set eth0 up"
           " && ip addr add 198.51.100.1/24 dev eth0"
           " && ip -6 neigh replace 2001:db8:2::10 lladdr 02:00:00:00:00:10 dev eth0 nud "
           "permanent"
           " && ip neigh replace 198.51.100.10 lladdr 02:00:00:00:00:10 dev eth0 nud "
           "permanent"
           " && ip neigh add proxy 198.51.100.201 dev eth0"
           " && ip -6 addr add 2001:db8:2::1/64 dev eth0 nodad"
           " && sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 && " +
           in_x +
           "sh -c 'ip link set lo up && ip link set lan0 address 02:00:00:00:00:10"
           " && ip link set lan0 up"
           " && ip addr add 198.51.100.10/24 dev lan0"
           " && ip -6 addr add 2001:db8:2::10/64 dev lan0 nodad"
           " && ip route add default via 198.51.100.1"
           " && ip -6 route add default via 2001:db8:2::1"
           " && ip neigh replace 198.51.100.1 lladdr 02:00:00:00:00:11 dev lan0 nud "
           "permanent"
           " && ip -6 neigh replace 2001:db8:2::1 lladdr 02:00:00:00:00:11 dev lan0 nud "
           "permanent'"),
        "");
  }

  std::string InVm(const std::string& command) {
    return Sh("ip netns exec " + vm_ns_ + " " + command);
  }
  // Pings from the VM; true when every echo was answered.
  bool PingFromVm(const std::string& from, const std::string& to, int count) {
    return InVm(absl::StrCat("ping -q -c ", count, " -i 0.2 -W 1 -I ", from, " ", to,
                             " >/dev/null 2>&1 && echo ok")) == "ok\n";
  }

  std::vector<NftWrite> VmWrites(const std::string& ifname, int n, bool add = true) {
    std::vector<NftWrite> w;
    auto put = [&](NftElement e) {
      if (add) {
        w.push_back(AddNftElement{std::move(e)});
      } else {
        w.push_back(DeleteNftElement{std::move(e)});
      }
    };
    put(NftVmLink{ifname});
    put(NftSourcePrefix{ifname, IpPrefix::Host(IpAddress::V4(0xc6336400 + n))});
    put(NftSourcePrefix{ifname, Prefix(absl::StrCat("2001:db8:1::", n, "/128").c_str())});
    put(NftArpSender{ifname, IpAddress::V4(0xc6336400 + n)});
    return w;
  }

  void ExpectAllOk(const std::vector<absl::Status>& results) {
    for (const auto& s : results) EXPECT_TRUE(s.ok()) << s;
  }

  uint64_t DropPackets(const std::string& ifname, DropReason reason) {
    auto counters = kernel_->ReadDropCounters();
    EXPECT_TRUE(counters.ok()) << counters.status();
    if (!counters.ok()) return 0;
    for (const DropCounter& c : *counters) {
      if (c.ifname == ifname && c.reason == reason) return c.packets;
    }
    ADD_FAILURE() << "no counter " << DropReasonName(reason) << " for " << ifname;
    return 0;
  }

  // Events until `pred` holds for one of them, or the deadline passes.
  std::vector<NftEvent> WaitForEvent(const std::function<bool(const NftEvent&)>& pred) {
    std::vector<NftEvent> seen;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(3);
    while (std::chrono::steady_clock::now() < deadline) {
      pollfd p{kernel_->event_fd(), POLLIN, 0};
      poll(&p, 1, 100);
      std::vector<NftEvent> batch;
      EXPECT_TRUE(kernel_->ReadEvents(&batch).ok());
      for (auto& e : batch) seen.push_back(e);
      for (const auto& e : batch) {
        if (pred(e)) return seen;
      }
    }
    ADD_FAILURE() << "no such event; saw " << seen.size();
    return seen;
  }
  void DrainEvents() {
    std::vector<NftEvent> ignored;
    ASSERT_TRUE(kernel_->ReadEvents(&ignored).ok());
  }

  const PortSecurityConfig config_{{{VmToHostPort::Protocol::kUdp, 53}}};
  std::string vm_ns_;
  std::unique_ptr<NftKernel> kernel_;
};

TEST_F(NftKernelTest, BaseIsInstalledOnceAndMatches) {
  auto before = kernel_->Dump();
  ASSERT_TRUE(before.ok()) << before.status();
  EXPECT_FALSE(before->fingerprint.has_value());
  EXPECT_FALSE(before->BaseMatches(config_));

  ExpectAllOk(kernel_->Apply({EnsurePortSecurityBase{config_}}));
  std::string listing = Sh("nft list ruleset");
  EXPECT_THAT(listing, HasSubstr("table inet vmnet"));
  EXPECT_THAT(listing, HasSubstr("table arp vmnet"));
  EXPECT_THAT(listing, HasSubstr("hook prerouting priority raw; policy accept;"));
  EXPECT_THAT(Sh("nft list set inet vmnet vm_to_host_allow"), HasSubstr("udp . 53"));

  auto snap = kernel_->Dump();
  ASSERT_TRUE(snap.ok()) << snap.status();
  EXPECT_TRUE(snap->base_intact) << snap->damage;
  EXPECT_TRUE(snap->BaseMatches(config_));
  EXPECT_FALSE(snap->BaseMatches(PortSecurityConfig{}));
  EXPECT_THAT(snap->elements, IsEmpty());

  // Nothing to do: nothing written, the ruleset generation unchanged.
  std::string gen = Sh("nft list ruleset | md5sum");
  EXPECT_TRUE(kernel_->Apply({}).empty());
  EXPECT_EQ(Sh("nft list ruleset | md5sum"), gen);

  // A rule removed by hand: the dump says the base is damaged.
  Sh("nft flush chain inet vmnet input");
  snap = kernel_->Dump();
  ASSERT_TRUE(snap.ok());
  EXPECT_FALSE(snap->base_intact);
  EXPECT_THAT(snap->damage, HasSubstr("input"));

  ExpectAllOk(kernel_->Apply({DeletePortSecurityBase{}}));
  EXPECT_THAT(Sh("nft list ruleset"), Not(HasSubstr("vmnet")));
  ExpectAllOk(kernel_->Apply({DeletePortSecurityBase{}}));  // absent: OK
  // Elements of absent tables: NOT_FOUND (the table is missing, not the
  // element); the caller rebuilds the base instead.
  auto gone = kernel_->Apply({DeleteNftElement{NftVmLink{"vme1a"}}});
  ASSERT_EQ(gone.size(), 1u);
  EXPECT_TRUE(absl::IsNotFound(gone[0])) << gone[0];
}

TEST_F(NftKernelTest, ElementsAreAddedAndDeletedIncrementally) {
  ExpectAllOk(kernel_->Apply({EnsurePortSecurityBase{config_}}));
  std::vector<NftWrite> writes = VmWrites("vme1a", 201);
  writes.push_back(AddNftElement{NftSourcePrefix{"vme1a", Prefix("203.0.113.0/24")}});
  writes.push_back(AddNftElement{NftSourcePrefix{"vme1a", Prefix("::/0")}});
  ExpectAllOk(kernel_->Apply(writes));
  EXPECT_THAT(Sh("nft list set inet vmnet src4"),
              HasSubstr("\"vme1a\" . 198.51.100.201"));
  EXPECT_THAT(Sh("nft list set inet vmnet src4_ranges"),
              HasSubstr("\"vme1a\" . 203.0.113.0/24"));
  EXPECT_THAT(Sh("nft list set inet vmnet src6_ranges"), HasSubstr("\"vme1a\" . ::/0"));
  EXPECT_THAT(Sh("nft list set inet vmnet vm_links"), HasSubstr("\"vme1a\""));
  EXPECT_THAT(Sh("nft list map inet vmnet to_host"),
              HasSubstr("\"vme1a\" : \"to_host.vme1a\""));
  EXPECT_THAT(Sh("nft list set arp vmnet arp_src4"),
              HasSubstr("\"vme1a\" . 198.51.100.201"));
  EXPECT_THAT(Sh("nft list counters table inet vmnet"),
              HasSubstr("spoofed_source.vme1a"));

  auto snap = kernel_->Dump();
  ASSERT_TRUE(snap.ok()) << snap.status();
  EXPECT_TRUE(snap->BaseMatches(config_)) << snap->damage;
  std::vector<NftElement> want = {NftVmLink{"vme1a"},
                                  NftSourcePrefix{"vme1a", Prefix("198.51.100.201/32")},
                                  NftSourcePrefix{"vme1a", Prefix("203.0.113.0/24")},
                                  NftSourcePrefix{"vme1a", Prefix("::/0")},
                                  NftSourcePrefix{"vme1a", Prefix("2001:db8:1::201/128")},
                                  NftArpSender{"vme1a", Ip("198.51.100.201")}};
  std::sort(want.begin(), want.end());
  EXPECT_EQ(snap->elements, want);
  EXPECT_THAT(snap->incomplete_vm_links, IsEmpty());

  // Adding what exists is OK, and completes a VM link that lost a part.
  Sh("nft delete element inet vmnet to_host '{ \"vme1a\" }'");
  snap = kernel_->Dump();
  ASSERT_TRUE(snap.ok());
  EXPECT_THAT(snap->incomplete_vm_links, Contains("vme1a"));
  ExpectAllOk(kernel_->Apply(writes));
  snap = kernel_->Dump();
  ASSERT_TRUE(snap.ok());
  EXPECT_EQ(snap->elements, want);

  // Deleting: the named OK-on-absent rule.
  auto deleted = kernel_->Apply(
      {DeleteNftElement{NftSourcePrefix{"vme1a", Prefix("203.0.113.0/24")}},
       DeleteNftElement{NftSourcePrefix{"vme1a", Prefix("203.0.113.0/24")}},
       DeleteNftElement{NftArpSender{"vme1b", Ip("198.51.100.9")}}});
  ExpectAllOk(deleted);
  EXPECT_THAT(Sh("nft list set inet vmnet src4_ranges"),
              Not(HasSubstr("203.0.113.0/24")));
  ExpectAllOk(kernel_->Apply(VmWrites("vme1a", 201, /*add=*/false)));
  snap = kernel_->Dump();
  ASSERT_TRUE(snap.ok());
  std::vector<NftElement> rest = {NftSourcePrefix{"vme1a", Prefix("::/0")}};
  EXPECT_EQ(snap->elements, rest);
  EXPECT_THAT(Sh("nft list counters"), Not(HasSubstr("vme1a")));
}

TEST_F(NftKernelTest, FailureRollsBackTheTransactionAndNamesTheWrite) {
  // No base: the sets do not exist.
  auto results = kernel_->Apply({AddNftElement{NftVmLink{"vme1a"}},
                                 AddNftElement{NftVmLink{"name-too-long-for-a-link"}}});
  ASSERT_EQ(results.size(), 2u);
  EXPECT_TRUE(absl::IsNotFound(results[0])) << results[0];
  EXPECT_THAT(results[0].message(), HasSubstr("vme1a"));
  EXPECT_THAT(results[0].message(), HasSubstr("errno"));
  EXPECT_TRUE(absl::IsInvalidArgument(results[1])) << results[1];

  ExpectAllOk(kernel_->Apply({EnsurePortSecurityBase{config_}}));
  // Overlapping ranges of one link: the kernel refuses the second; the
  // first, in the same transaction, is rolled back.
  results = kernel_->Apply(
      {AddNftElement{NftArpSender{"vme1a", Ip("198.51.100.201")}},
       AddNftElement{NftSourcePrefix{"vme1a", Prefix("198.51.100.0/24")}},
       AddNftElement{NftSourcePrefix{"vme1a", Prefix("198.51.100.0/25")}}});
  ASSERT_EQ(results.size(), 3u);
  EXPECT_TRUE(absl::IsAborted(results[0])) << results[0];
  EXPECT_TRUE(absl::IsAlreadyExists(results[2])) << results[2];
  EXPECT_THAT(results[2].message(), HasSubstr("198.51.100.0/25"));
  EXPECT_THAT(Sh("nft list set arp vmnet arp_src4"), Not(HasSubstr("vme1a")));
  EXPECT_EQ(NonOverlappingPrefixes({Prefix("198.51.100.0/25"), Prefix("198.51.100.0/24"),
                                    Prefix("198.51.100.201/32"), Prefix("::/0"),
                                    Prefix("2001:db8::1/128")}),
            (std::vector<IpPrefix>{Prefix("198.51.100.0/24"), Prefix("::/0")}));
}

TEST_F(NftKernelTest, RuleCountDoesNotDependOnTheNumberOfVms) {
  ExpectAllOk(kernel_->Apply({EnsurePortSecurityBase{config_}}));
  std::vector<NftWrite> writes;
  for (int i = 0; i < 10; ++i) {
    for (auto& w : VmWrites(absl::StrCat("vme", i), i)) writes.push_back(w);
  }
  ExpectAllOk(kernel_->Apply(writes));
  int rules_10 = CountRules();
  writes.clear();
  for (int i = 10; i < 1000; ++i) {
    auto vm = VmWrites(absl::StrCat("vme", i), i % 250);
    // Distinct addresses per VM: 2001:db8:1::<i> and 198.51.100.x are
    // keyed by link, so the same address on two links is two elements.
    for (auto& w : vm) writes.push_back(w);
  }
  ExpectAllOk(kernel_->Apply(writes));
  EXPECT_EQ(CountRules(), rules_10);
  EXPECT_EQ(rules_10, 33);  // 27 in inet vmnet, 6 in arp vmnet
  auto snap = kernel_->Dump();
  ASSERT_TRUE(snap.ok()) << snap.status();
  EXPECT_TRUE(snap->BaseMatches(config_));
  EXPECT_EQ(snap->elements.size(), 4000u);
}

TEST_F(NftKernelTest, EventsReportOthersChanges) {
  ExpectAllOk(kernel_->Apply({EnsurePortSecurityBase{config_}}));
  ExpectAllOk(kernel_->Apply(VmWrites("vme1a", 201)));
  // Our own writes are marked as ours.
  auto own = WaitForEvent([](const NftEvent& e) {
    return e.own && e.element == NftElement{NftArpSender{"vme1a", Ip("198.51.100.201")}};
  });
  for (const auto& e : own) EXPECT_TRUE(e.own) << e.ToString();

  Sh("nft delete element inet vmnet src4 '{ \"vme1a\" . 198.51.100.201 }'");
  WaitForEvent([](const NftEvent& e) {
    return !e.own && e.kind == NftEvent::Kind::kElementDeleted &&
           e.element == NftElement{NftSourcePrefix{"vme1a", Prefix("198.51.100.201/32")}};
  });
  Sh("nft flush set inet vmnet src6");
  WaitForEvent([](const NftEvent& e) {
    return !e.own && e.kind == NftEvent::Kind::kElementDeleted &&
           e.element ==
               NftElement{NftSourcePrefix{"vme1a", Prefix("2001:db8:1::201/128")}};
  });
  Sh("nft delete counter inet vmnet spoofed_source.vme1a 2>&1");  // in use: refused
  Sh("nft add rule inet vmnet input accept");
  WaitForEvent([](const NftEvent& e) {
    return !e.own && e.kind == NftEvent::Kind::kBaseChanged &&
           e.what.find("rule") != std::string::npos;
  });
  Sh("nft delete table inet vmnet");
  WaitForEvent([](const NftEvent& e) {
    return !e.own && e.kind == NftEvent::Kind::kBaseChanged &&
           e.what == "delete table inet vmnet";
  });
  // Another table's changes are not reported.
  DrainEvents();
  Sh("nft add table inet other; nft add set inet other s '{ type ipv4_addr; }'; "
     "nft add element inet other s '{ 203.0.113.9 }'");
  std::vector<NftEvent> events;
  pollfd p{kernel_->event_fd(), POLLIN, 0};
  poll(&p, 1, 200);
  ASSERT_TRUE(kernel_->ReadEvents(&events).ok());
  EXPECT_THAT(events, IsEmpty());
}

TEST_F(NftKernelTest, EventOverflowAsksForADump) {
  auto k = NftKernel::Create({.event_rcvbuf = 4096});
  ASSERT_TRUE(k.ok());
  ExpectAllOk(kernel_->Apply({EnsurePortSecurityBase{config_}}));
  std::vector<NftWrite> writes;
  for (int i = 0; i < 200; ++i) {
    for (auto& w : VmWrites(absl::StrCat("vme", i), i)) writes.push_back(w);
  }
  ExpectAllOk(kernel_->Apply(writes));
  std::vector<NftEvent> events;
  EXPECT_TRUE(absl::IsResourceExhausted((*k)->ReadEvents(&events)));
}

TEST_F(NftKernelTest, OtherTablesAreNeverTouched) {
  Sh("nft add table inet other && nft add set inet other s '{ type ipv4_addr; }' && "
     "nft add element inet other s '{ 203.0.113.9 }' && "
     "nft add chain inet other c '{ type filter hook prerouting priority 0; }' && "
     "nft add rule inet other c ip saddr 203.0.113.99 drop && "
     "nft add table arp other");
  std::string other = Sh("nft list table inet other; nft list table arp other");
  ASSERT_THAT(other, HasSubstr("203.0.113.99"));
  ExpectAllOk(kernel_->Apply({EnsurePortSecurityBase{config_}}));
  ExpectAllOk(kernel_->Apply(VmWrites("vme1a", 201)));
  ASSERT_TRUE(kernel_->Dump().ok());
  ASSERT_TRUE(kernel_->ReadDropCounters().ok());
  ExpectAllOk(kernel_->Apply({EnsurePortSecurityBase{PortSecurityConfig{}}}));
  ExpectAllOk(kernel_->Apply(VmWrites("vme1a", 201, false)));
  ExpectAllOk(kernel_->Apply({DeletePortSecurityBase{}}));
  EXPECT_EQ(Sh("nft list table inet other; nft list table arp other"), other);
}

TEST_F(NftKernelTest, SpoofedPacketsAreDroppedAndCounted) {
  MakeVm();
  // Without port security the spoofed ping reaches the host (the control).
  ASSERT_TRUE(PingFromVm("198.51.100.201", "169.255.30.1", 1));

  ExpectAllOk(kernel_->Apply({EnsurePortSecurityBase{config_}}));
  ExpectAllOk(kernel_->Apply(VmWrites("vme1a", 201)));
  // (a) the VM's own addresses pass, IPv4 and IPv6.
  EXPECT_TRUE(PingFromVm("198.51.100.201", "169.255.30.1", 2));
  EXPECT_TRUE(PingFromVm("2001:db8:1::201", "2001:db8:ffff::1", 2));
  EXPECT_EQ(DropPackets("vme1a", DropReason::kSpoofedSource), 0u);
  // Packets from other links are not looked at.
  EXPECT_EQ(
      Sh("ping -q -c 1 -W 1 127.0.0.1 >/dev/null && ping -q -c 1 -W 1 ::1 >/dev/null "
         "&& echo ok"),
      "ok\n");
  // (b) spoofed sources are dropped, and counted exactly.
  EXPECT_FALSE(PingFromVm("198.51.100.202", "169.255.30.1", 3));
  EXPECT_EQ(DropPackets("vme1a", DropReason::kSpoofedSource), 3u);
  EXPECT_FALSE(PingFromVm("203.0.113.5", "169.255.30.1", 2));
  EXPECT_FALSE(PingFromVm("2001:db8:1::202", "2001:db8:ffff::1", 2));
  EXPECT_EQ(DropPackets("vme1a", DropReason::kSpoofedSource), 7u);
  // An allowed prefix lets exactly itself through.
  ExpectAllOk(kernel_->Apply(
      {AddNftElement{NftSourcePrefix{"vme1a", Prefix("203.0.113.0/28")}}}));
  EXPECT_TRUE(PingFromVm("203.0.113.5", "169.255.30.1", 1));
  EXPECT_FALSE(PingFromVm("198.51.100.202", "169.255.30.1", 1));
  EXPECT_EQ(DropPackets("vme1a", DropReason::kSpoofedSource), 8u);
  EXPECT_EQ(DropPackets("vme1a", DropReason::kToHost), 0u);
}

TEST_F(NftKernelTest, ForeignArpSenderPlantsNoNeighbour) {
  MakeVm();
  // An ARP request for the gateway with sender 203.0.113.5, from vm0.
  auto send_arp = [&](const std::string& sender) {
    return InVm(
        "/usr/bin/python3 -c \"import socket; s=socket.socket(socket.AF_PACKET, "
        "socket.SOCK_RAW); "
        "s.bind(('vm0', 0)); mac=bytes.fromhex('020000000001'); "
        "pkt=b'\\xff'*6+mac+b'\\x08\\x06'+bytes.fromhex('0001080006040001')+mac+"
        "socket.inet_aton('" +
        sender +
        "')+b'\\x00'*6+socket.inet_aton('169.255.30.1'); "
        "s.send(pkt)\"");
  };
  // The control: without port security the foreign sender is planted.
  EXPECT_EQ(send_arp("203.0.113.5"), "");
  auto planted = [&](const std::string& a) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (std::chrono::steady_clock::now() < deadline) {
      if (Sh("ip neigh show dev vme1a " + a) != "") return true;
      poll(nullptr, 0, 20);
    }
    return false;
  };
  ASSERT_TRUE(planted("203.0.113.5"));
  Sh("ip neigh flush dev vme1a to 203.0.113.0/24");

  ExpectAllOk(kernel_->Apply({EnsurePortSecurityBase{config_}}));
  ExpectAllOk(kernel_->Apply(VmWrites("vme1a", 201)));
  EXPECT_EQ(send_arp("203.0.113.6"), "");
  EXPECT_EQ(send_arp("198.51.100.202"), "");
  EXPECT_EQ(send_arp("198.51.100.201"), "");  // its own: accepted
  EXPECT_EQ(DropPackets("vme1a", DropReason::kSpoofedArpNd), 2u);
  EXPECT_EQ(Sh("ip neigh show dev vme1a 203.0.113.6"), "");
  EXPECT_EQ(Sh("ip neigh show dev vme1a 198.51.100.202"), "");
}

TEST_F(NftKernelTest, VmReachesHostOnlyWhereAllowed) {
  MakeVm();
  int listener = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(listener, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  ASSERT_EQ(bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(listener, 16), 0);
  socklen_t len = sizeof(addr);
  getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len);
  int port = ntohs(addr.sin_port);
  auto connect_from_vm = [&] {
    return InVm(absl::StrCat(
        "/usr/bin/python3 -c \"import socket\ntry:\n  socket.create_connection(("
        "'169.255.30.1', ",
        port,
        "), timeout=1); print('connected')\n"
        "except OSError as e: print('not connected')\""));
  };
  ASSERT_EQ(connect_from_vm(), "connected\n");  // the control

  ExpectAllOk(kernel_->Apply({EnsurePortSecurityBase{config_}}));
  ExpectAllOk(kernel_->Apply(VmWrites("vme1a", 201)));
  EXPECT_EQ(connect_from_vm(), "not connected\n");
  EXPECT_GE(DropPackets("vme1a", DropReason::kToHost), 1u);
  EXPECT_TRUE(PingFromVm("198.51.100.201", "169.255.30.1", 1))
      << "ICMP echo stays allowed";

  PortSecurityConfig allow{{{VmToHostPort::Protocol::kTcp, static_cast<uint16_t>(port)}}};
  auto snap = kernel_->Dump();
  ASSERT_TRUE(snap.ok());
  ASSERT_FALSE(snap->BaseMatches(allow));
  // A new base and the elements again, in one transaction.
  std::vector<NftWrite> writes = {EnsurePortSecurityBase{allow}};
  for (auto& w : VmWrites("vme1a", 201)) writes.push_back(w);
  ExpectAllOk(kernel_->Apply(writes));
  EXPECT_EQ(connect_from_vm(), "connected\n");
  close(listener);
}

TEST_F(NftKernelTest, DeleteConntrackRemovesOnlyTheAddressesEntries) {
  ASSERT_EQ(Sh("conntrack -I -p udp -s 198.51.100.201 -d 203.0.113.7 --sport 1000 "
               "--dport 2000 -t 120 >/dev/null 2>&1; "
               "conntrack -I -p udp -s 203.0.113.7 -d 198.51.100.201 --sport 3000 "
               "--dport 4000 -t 120 >/dev/null 2>&1; "
               "conntrack -I -p udp -s 198.51.100.9 -d 203.0.113.7 --sport 1000 "
               "--dport 2000 -t 120 >/dev/null 2>&1; "
               "conntrack -I -p udp -s 2001:db8:1::201 -d 2001:db8::7 --sport 1000 "
               "--dport 2000 -t 120 >/dev/null 2>&1; echo done"),
            "done\n");
  std::string before = Sh("conntrack -L 2>/dev/null");
  ASSERT_THAT(before, HasSubstr("src=198.51.100.201"));
  ASSERT_THAT(before, HasSubstr("dst=198.51.100.201"));

  auto result = kernel_->DeleteConntrack({Ip("198.51.100.201")});
  ASSERT_EQ(result.size(), 1u);
  ASSERT_TRUE(result[0].ok()) << result[0].status();
  EXPECT_TRUE(result[0]->conntrack_present);
  EXPECT_EQ(result[0]->deleted, 2);
  std::string after = Sh("conntrack -L 2>/dev/null");
  EXPECT_THAT(after, Not(HasSubstr("198.51.100.201")));
  EXPECT_THAT(after, HasSubstr("src=198.51.100.9"));
  EXPECT_THAT(after, HasSubstr("src=2001:db8:1::201"));

  result = kernel_->DeleteConntrack({Ip("2001:db8:1::201")});
  ASSERT_TRUE(result[0].ok()) << result[0].status();
  EXPECT_EQ(result[0]->deleted, 1);
  EXPECT_THAT(Sh("conntrack -L 2>/dev/null"), Not(HasSubstr("2001:db8:1::201")));
  // Nothing left to delete: OK.
  result = kernel_->DeleteConntrack({Ip("198.51.100.201")});
  ASSERT_TRUE(result[0].ok());
  EXPECT_EQ(result[0]->deleted, 0);
  Sh("conntrack -F 2>/dev/null");
}

// A UDP conntrack entry from src:sport to dst:2000 (its reply's source is
// dst), inserted with `conntrack -I`.
std::string InsertUdpEntry(const std::string& src, const std::string& dst, int sport) {
  return absl::StrCat("conntrack -I -p udp -s ", src, " -d ", dst, " --sport ", sport,
                      " --dport 2000 -t 120 >/dev/null 2>&1; ");
}

TEST_F(NftKernelTest, DeleteConntrackOfABatchRemovesEachAddressesEntriesInOneDump) {
  Sh("conntrack -F 2>/dev/null");
  ASSERT_EQ(Sh(InsertUdpEntry("198.51.100.201", "203.0.113.7", 1000) +     // original
               InsertUdpEntry("203.0.113.7", "198.51.100.202", 1001) +     // reply
               InsertUdpEntry("198.51.100.201", "198.51.100.202", 1002) +  // both
               InsertUdpEntry("2001:db8:1::201", "2001:db8::7", 1003) +    // original
               InsertUdpEntry("2001:db8::7", "2001:db8:1::202", 1004) +    // reply
               // Another address's: they stay.
               InsertUdpEntry("198.51.100.9", "203.0.113.7", 1005) +
               InsertUdpEntry("203.0.113.7", "198.51.100.9", 1006) +
               InsertUdpEntry("2001:db8:1::9", "2001:db8::7", 1007) +
               InsertUdpEntry("2001:db8::7", "2001:db8:1::9", 1008) + "echo done"),
            "done\n");
  std::string before = Sh("conntrack -L 2>/dev/null");
  for (const char* a : {"198.51.100.201", "198.51.100.202", "2001:db8:1::201",
                        "2001:db8:1::202", "198.51.100.9", "2001:db8:1::9"}) {
    ASSERT_THAT(before, HasSubstr(absl::StrCat("=", a, " "))) << before;
  }

  std::vector<IpAddress> batch = {Ip("198.51.100.201"),  Ip("2001:db8:1::201"),
                                  IpAddress(),           Ip("198.51.100.202"),
                                  Ip("2001:db8:1::202"), Ip("198.51.100.201"),
                                  Ip("198.51.100.77")};
  auto result = kernel_->DeleteConntrack(batch);
  ASSERT_EQ(result.size(), batch.size());
  // The entry of .201 to .202 counts for .201, the first of the two.
  std::vector<int> deleted = {2, 1, -1, 1, 1, 0, 0};
  for (size_t i = 0; i < batch.size(); ++i) {
    if (deleted[i] < 0) {
      EXPECT_TRUE(absl::IsInvalidArgument(result[i].status())) << result[i].status();
      continue;
    }
    ASSERT_TRUE(result[i].ok()) << i << ": " << result[i].status();
    EXPECT_TRUE(result[i]->conntrack_present) << i;
    EXPECT_EQ(result[i]->deleted, deleted[i]) << batch[i].ToString() << " (" << i << ")";
  }
  std::string after = Sh("conntrack -L 2>/dev/null");
  for (const char* gone :
       {"198.51.100.201", "198.51.100.202", "2001:db8:1::201", "2001:db8:1::202"}) {
    EXPECT_THAT(after, Not(HasSubstr(absl::StrCat("=", gone, " ")))) << after;
  }
  EXPECT_THAT(after, HasSubstr("src=198.51.100.9 dst=203.0.113.7"));
  EXPECT_THAT(after, HasSubstr("src=203.0.113.7 dst=198.51.100.9"));
  EXPECT_THAT(after, HasSubstr("src=2001:db8:1::9 dst=2001:db8::7"));
  EXPECT_THAT(after, HasSubstr("src=2001:db8::7 dst=2001:db8:1::9"));
  EXPECT_EQ(Sh("conntrack -L 2>/dev/null | grep -c udp"), "4\n") << after;

  // Only IPv6 addresses (a dump of that family only); nothing left: OK.
  result = kernel_->DeleteConntrack({Ip("2001:db8:1::201"), Ip("2001:db8:1::9")});
  ASSERT_EQ(result.size(), 2u);
  ASSERT_TRUE(result[0].ok() && result[1].ok());
  EXPECT_EQ(result[0]->deleted, 0);
  EXPECT_EQ(result[1]->deleted, 2);
  EXPECT_THAT(Sh("conntrack -L 2>/dev/null"), Not(HasSubstr("2001:db8:1::9")));
  EXPECT_THAT(Sh("conntrack -L 2>/dev/null"), HasSubstr("src=198.51.100.9 "));
  // An empty batch asks nothing.
  EXPECT_THAT(kernel_->DeleteConntrack({}), IsEmpty());
  Sh("conntrack -F 2>/dev/null");
}

}  // namespace
}  // namespace vmnet::kernel

namespace vmnet::kernel {
namespace {

TEST_F(NftKernelTest, NeighbourDiscoveryClaimsOnlyTheVmsAddresses) {
  MakeVm();
  ExpectAllOk(kernel_->Apply({EnsurePortSecurityBase{config_}}));
  ExpectAllOk(kernel_->Apply(VmWrites("vme1a", 201)));
  // ICMPv6 from a link-local address of vm0 to all nodes, hop limit 255 (the
  // kernel fills in the checksum): an NA for `target`, or an RA.
  auto send_icmp6 = [&](const std::string& type_and_body) {
    return InVm(
        "/usr/bin/python3 -c \"import socket; s=socket.socket(socket.AF_INET6, "
        "socket.SOCK_RAW, "
        "socket.IPPROTO_ICMPV6); s.setsockopt(socket.IPPROTO_IPV6, "
        "socket.IPV6_MULTICAST_HOPS, 255); s.setsockopt(socket.SOL_SOCKET, "
        "socket.SO_BINDTODEVICE, b'vm0'); s.bind(('fe80::201', 0, 0, "
        "socket.if_nametoindex('vm0'))); " +
        type_and_body +
        "; s.sendto(pkt, ('ff02::1', 0, 0, socket.if_nametoindex('vm0')))\"");
  };
  auto na = [&](const std::string& target) {
    return send_icmp6(
        "pkt=bytes([136,0,0,0,0x20,0,0,0])+socket.inet_pton(socket.AF_INET6, '" + target +
        "')");
  };
  ASSERT_EQ(InVm("ip -6 addr add fe80::201/64 dev vm0 nodad"), "");
  uint64_t before = DropPackets("vme1a", DropReason::kSpoofedArpNd);
  EXPECT_EQ(na("2001:db8:1::201"), "");  // its own: accepted
  EXPECT_EQ(na("fe80::1234"), "");       // link-local: accepted
  EXPECT_EQ(DropPackets("vme1a", DropReason::kSpoofedArpNd), before);
  EXPECT_EQ(na("2001:db8:1::202"), "");
  EXPECT_EQ(na("2001:db8:ffff::1"), "");
  EXPECT_EQ(DropPackets("vme1a", DropReason::kSpoofedArpNd), before + 2);
  // A router advertisement: dropped, whatever it says.
  EXPECT_EQ(send_icmp6("pkt=bytes([134,0,0,0,64,0,0,0,0,0,0,0,0,0,0,0])"), "");
  EXPECT_EQ(DropPackets("vme1a", DropReason::kSpoofedArpNd), before + 3);
  EXPECT_EQ(DropPackets("vme1a", DropReason::kSpoofedSource), 0u);
}

// Run by hand (--gtest_also_run_disabled_tests): prints the ruleset and the
// time to install 10,000 VMs' elements in one Apply and with `nft -f`.
TEST_F(NftKernelTest, DISABLED_MeasureTenThousandVms) {
  ExpectAllOk(kernel_->Apply({EnsurePortSecurityBase{config_}}));
  ExpectAllOk(kernel_->Apply(VmWrites("vme1a", 201)));
  std::cout << Sh("nft list ruleset");
  ExpectAllOk(kernel_->Apply({EnsurePortSecurityBase{config_}}));
  constexpr int kVms = 10000;
  std::vector<NftWrite> writes;
  for (int i = 0; i < kVms; ++i) {
    IpAddress v4 = IpAddress::V4(0xc6336400u + 0x10000u + static_cast<uint32_t>(i));
    std::string name = absl::StrCat("vme", i);
    writes.push_back(AddNftElement{NftVmLink{name}});
    writes.push_back(AddNftElement{NftSourcePrefix{name, IpPrefix::Host(v4)}});
    writes.push_back(AddNftElement{NftSourcePrefix{
        name, Prefix(absl::StrCat("2001:db8:1::", absl::Hex(i), "/128").c_str())}});
    writes.push_back(AddNftElement{NftArpSender{name, v4}});
  }
  auto start = std::chrono::steady_clock::now();
  auto results = kernel_->Apply(writes);
  auto apply_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                      std::chrono::steady_clock::now() - start)
                      .count();
  ExpectAllOk(results);
  start = std::chrono::steady_clock::now();
  auto snap = kernel_->Dump();
  auto dump_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                     std::chrono::steady_clock::now() - start)
                     .count();
  ASSERT_TRUE(snap.ok());
  EXPECT_EQ(snap->elements.size(), 4u * kVms);
  start = std::chrono::steady_clock::now();
  auto counters = kernel_->ReadDropCounters();
  auto counters_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                         std::chrono::steady_clock::now() - start)
                         .count();
  ASSERT_TRUE(counters.ok());
  EXPECT_EQ(counters->size(), 3u * kVms);

  // The same elements with nft -f, into the same (fresh) base.
  ExpectAllOk(kernel_->Apply({EnsurePortSecurityBase{config_}}));
  std::string file = absl::StrCat("/tmp/vmnet-nft-measure-", getpid(), ".nft");
  {
    FILE* f = fopen(file.c_str(), "w");
    ASSERT_NE(f, nullptr);
    for (int i = 0; i < kVms; ++i) {
      IpAddress v4 = IpAddress::V4(0xc6336400u + 0x10000u + static_cast<uint32_t>(i));
      std::string n = absl::StrCat("vme", i);
      fprintf(
          f,
          "add counter inet vmnet spoofed_source.%s\nadd counter inet vmnet "
          "spoofed_arp_nd.%s\nadd counter inet vmnet to_host.%s\nadd counter arp vmnet "
          "spoofed_arp_nd.%s\n",
          n.c_str(), n.c_str(), n.c_str(), n.c_str());
      fprintf(f,
              "add element inet vmnet spoofed_source { \"%s\" : \"spoofed_source.%s\" }\n"
              "add element inet vmnet spoofed_arp_nd { \"%s\" : \"spoofed_arp_nd.%s\" }\n"
              "add element inet vmnet to_host { \"%s\" : \"to_host.%s\" }\n"
              "add element arp vmnet spoofed_arp_nd { \"%s\" : \"spoofed_arp_nd.%s\" }\n",
              n.c_str(), n.c_str(), n.c_str(), n.c_str(), n.c_str(), n.c_str(), n.c_str(),
              n.c_str());
      fprintf(
          f,
          "add element inet vmnet vm_links { \"%s\" }\nadd element arp vmnet vm_links { "
          "\"%s\" }\n",
          n.c_str(), n.c_str());
      fprintf(
          f,
          "add element inet vmnet src4 { \"%s\" . %s }\nadd element inet vmnet src6 { "
          "\"%s\" . 2001:db8:1::%x }\nadd element arp vmnet arp_src4 { \"%s\" . %s }\n",
          n.c_str(), v4.ToString().c_str(), n.c_str(), i, n.c_str(),
          v4.ToString().c_str());
    }
    fclose(f);
  }
  start = std::chrono::steady_clock::now();
  std::string out = Sh("nft -f " + file);
  auto nft_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                    std::chrono::steady_clock::now() - start)
                    .count();
  unlink(file.c_str());
  EXPECT_EQ(out, "");
  snap = kernel_->Dump();
  ASSERT_TRUE(snap.ok());
  EXPECT_EQ(snap->elements.size(), 4u * kVms) << "nft -f installed the same objects";
  std::cout << "10,000 VMs: Apply " << apply_ms << " ms (" << writes.size()
            << " writes), Dump " << dump_ms << " ms, ReadDropCounters " << counters_ms
            << " ms, nft -f " << nft_ms << " ms, rules " << CountRules() << "\n";
}

}  // namespace
}  // namespace vmnet::kernel

namespace vmnet::kernel {
namespace {

// X on a LAN behind eth0: every legitimate path still works with port
// security on (X to the VM, the VM to X, forwarded both ways, IPv4 and
// IPv6), and a spoofed source never reaches X.
TEST_F(NftKernelTest, LegitimatePathsThroughTheHostStillWork) {
  MakeVm();
  MakeX();
  std::string in_x = "ip netns exec " + x_ns() + " ";
  ExpectAllOk(kernel_->Apply({EnsurePortSecurityBase{config_}}));
  ExpectAllOk(kernel_->Apply(VmWrites("vme1a", 201)));
  EXPECT_TRUE(PingFromVm("198.51.100.201", "198.51.100.10", 2));
  EXPECT_TRUE(PingFromVm("2001:db8:1::201", "2001:db8:2::10", 2));
  EXPECT_EQ(Sh(in_x + "ping -q -c 2 -i 0.2 -W 1 198.51.100.201 >/dev/null && " + in_x +
               "ping -q -c 2 -i 0.2 -W 1 2001:db8:1::201 >/dev/null && echo ok"),
            "ok\n");
  // The spoofed ping is dropped before routing: X sees none of it (a
  // counter in X's own namespace).
  ASSERT_EQ(
      Sh(in_x + "nft add table inet sniff && " + in_x +
         "nft add chain inet sniff c '{ type filter hook prerouting priority 0; }' && " +
         in_x + "nft add rule inet sniff c ip saddr 198.51.100.202 counter"),
      "");
  EXPECT_FALSE(PingFromVm("198.51.100.202", "198.51.100.10", 3));
  EXPECT_THAT(Sh(in_x + "nft list chain inet sniff c"),
              HasSubstr("counter packets 0 bytes 0"));
  EXPECT_EQ(DropPackets("vme1a", DropReason::kSpoofedSource), 3u);
  EXPECT_EQ(DropPackets("vme1a", DropReason::kToHost), 0u);
}

}  // namespace
}  // namespace vmnet::kernel

namespace vmnet::kernel {
namespace {

// Run by hand: iperf3 from X to the VM through the host, port security off,
// then on with 10,000 other VMs' elements installed (issue 12 wants at
// least 0.95x).
TEST_F(NftKernelTest, DISABLED_MeasureForwardingWithTenThousandVms) {
  MakeVm();
  MakeX();
  std::string in_x = "ip netns exec " + x_ns() + " ";
  auto gbits = [&] {
    InVm("iperf3 -s -1 -D >/dev/null 2>&1");
    poll(nullptr, 0, 300);
    return Sh(in_x +
              "iperf3 -c 198.51.100.201 -t 5 -J | /usr/bin/python3 -c 'import json,sys; "
              "print(round(json.load(sys.stdin)[\"end\"][\"sum_received\"][\"bits_per_"
              "second\"]/1e9, 2))'");
  };
  std::vector<NftWrite> writes = {EnsurePortSecurityBase{config_}};
  for (int i = 0; i < 10000; ++i) {
    IpAddress v4 = IpAddress::V4(0xc6336400u + 0x10000u + static_cast<uint32_t>(i));
    std::string name = absl::StrCat("vmx", i);
    writes.push_back(AddNftElement{NftVmLink{name}});
    writes.push_back(AddNftElement{NftSourcePrefix{name, IpPrefix::Host(v4)}});
    writes.push_back(AddNftElement{NftArpSender{name, v4}});
  }
  for (auto& w : VmWrites("vme1a", 201)) writes.push_back(w);
  for (int round = 0; round < 3; ++round) {
    std::cout << "off: " << gbits();
    ExpectAllOk(kernel_->Apply(writes));
    std::cout << "on (10,000 VMs): " << gbits();
    ExpectAllOk(kernel_->Apply({DeletePortSecurityBase{}}));
  }
}

// A packet-rate limit: a limit object and its counter as `nft list ruleset`
// shows them, reached by one base rule; over the rate, the VM's packets are
// dropped and counted; a rate change replaces the object; a link without a
// limit is not limited.
TEST_F(NftKernelTest, PacketRateLimitIsANamedLimitObjectPerVmLink) {
  MakeVm();
  ExpectAllOk(kernel_->Apply({EnsurePortSecurityBase{config_}}));
  ExpectAllOk(kernel_->Apply(VmWrites("vme1a", 201)));
  // No limit: a quick flood all answered.
  EXPECT_EQ(InVm("ping -q -f -c 200 -s 16 -I 198.51.100.201 169.255.30.1 "
                 "| grep -o '200 received'"),
            "200 received\n");

  ExpectAllOk(kernel_->Apply({AddNftElement{MakePacketRateLimit("vme1a", 50)}}));
  std::string listing = Sh("nft list ruleset");
  // (nft leaves out a burst of 5 packets, its default.)
  EXPECT_THAT(listing, HasSubstr("limit egress_pps.vme1a {\n"
                                 "\t\trate over 50/second\n"));
  EXPECT_THAT(listing, HasSubstr("counter egress_pps_dropped.vme1a {"));
  EXPECT_THAT(listing, HasSubstr("map egress_pps {\n\t\ttype ifname : limit\n"
                                 "\t\telements = { \"vme1a\" : \"egress_pps.vme1a\" }"));
  EXPECT_THAT(listing, HasSubstr("map egress_pps_dropped {\n\t\ttype ifname : counter\n"
                                 "\t\telements = { \"vme1a\" : "
                                 "\"egress_pps_dropped.vme1a\" }"));
  EXPECT_THAT(
      listing,
      HasSubstr("iifname != @vm_links accept comment \"vmnetd: not from a VM link: "
                "not checked\"\n\t\tlimit name iifname map @egress_pps goto "
                "drop_egress_pps"));
  auto snap = kernel_->Dump();
  ASSERT_TRUE(snap.ok()) << snap.status();
  EXPECT_TRUE(snap->BaseMatches(config_)) << snap->damage;
  EXPECT_THAT(snap->elements, Contains(NftElement{NftPacketRateLimit{"vme1a", 50, 5}}));
  EXPECT_EQ(snap->foreign_elements, 0);

  // 300 echo requests as fast as the answers come (or 100/s): at 50/s
  // with a burst of 5, many are dropped, and counted.
  std::string out = InVm(
      "ping -q -f -c 300 -s 16 -I 198.51.100.201 169.255.30.1 | grep -o '[0-9]* "
      "received'");
  int received = std::stoi(out);
  uint64_t dropped = DropPackets("vme1a", DropReason::kEgressPacketRate);
  std::cerr << "  [measured] limit 50/s: " << received << " of 300 answered, " << dropped
            << " dropped by the limit\n";
  EXPECT_LT(received, 300);
  // Every unanswered request was the limit's (a stray ND or MLD packet of the
  // VM's may be counted too).
  EXPECT_GE(dropped, 300u - static_cast<uint64_t>(received));
  EXPECT_LE(dropped, 300u - static_cast<uint64_t>(received) + 5);
  EXPECT_EQ(DropPackets("vme1a", DropReason::kSpoofedSource), 0u);

  // Another rate: the object replaced, its counter kept.
  ExpectAllOk(kernel_->Apply({AddNftElement{MakePacketRateLimit("vme1a", 1000)}}));
  EXPECT_THAT(Sh("nft list limits table inet vmnet"),
              HasSubstr("rate over 1000/second burst 100 packets"));
  EXPECT_EQ(DropPackets("vme1a", DropReason::kEgressPacketRate), dropped);
  snap = kernel_->Dump();
  ASSERT_TRUE(snap.ok());
  EXPECT_THAT(snap->elements,
              Contains(NftElement{NftPacketRateLimit{"vme1a", 1000, 100}}));

  // Half deleted by hand: reported with rate 0, and an add repairs it.
  Sh("nft delete element inet vmnet egress_pps_dropped '{ \"vme1a\" }'");
  snap = kernel_->Dump();
  ASSERT_TRUE(snap.ok());
  EXPECT_THAT(snap->elements, Contains(NftElement{NftPacketRateLimit{"vme1a", 0, 0}}));
  ExpectAllOk(kernel_->Apply({AddNftElement{MakePacketRateLimit("vme1a", 1000)}}));
  snap = kernel_->Dump();
  ASSERT_TRUE(snap.ok());
  EXPECT_THAT(snap->elements,
              Contains(NftElement{NftPacketRateLimit{"vme1a", 1000, 100}}));

  // Deleted: every part goes, and the flood is all answered again.
  ExpectAllOk(kernel_->Apply({DeleteNftElement{MakePacketRateLimit("vme1a", 1000)}}));
  listing = Sh("nft list ruleset");
  EXPECT_THAT(listing, Not(HasSubstr("egress_pps.vme1a")));
  EXPECT_THAT(listing, Not(HasSubstr("egress_pps_dropped.vme1a")));
  EXPECT_EQ(InVm("ping -q -f -c 300 -s 16 -I 198.51.100.201 169.255.30.1 "
                 "| grep -o '300 received'"),
            "300 received\n");
}

TEST_F(NftKernelTest, PacketRateLimitEventsNameTheLink) {
  ExpectAllOk(kernel_->Apply({EnsurePortSecurityBase{config_}}));
  ExpectAllOk(kernel_->Apply({AddNftElement{MakePacketRateLimit("vme1a", 200)}}));
  DrainEvents();
  Sh("nft delete element inet vmnet egress_pps '{ \"vme1a\" }'");
  WaitForEvent([](const NftEvent& e) {
    return !e.own && e.kind == NftEvent::Kind::kElementDeleted && e.element &&
           *e.element == NftElement{NftPacketRateLimit{"vme1a", 0, 0}};
  });
}

}  // namespace
}  // namespace vmnet::kernel
