// The traffic-control writes, dumps and events against the real kernel, in
// the test's private namespace: what vmnetd installs for bandwidth limits is
// what `tc` shows, reads back equal, changes in place and raises events.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <linux/if_ether.h>

#include "kernel_test.h"
#include "vmnet/kernel/netlink_kernel.h"
#include "vmnet/kernel/tc_codec.h"
#include "vmnet/kernel/tc_kernel.h"

namespace vmnet::kernel {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

class TcKernelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!KernelTestsIsolated()) GTEST_SKIP() << KernelTestsSkipReason();
    Sh("ip link del vme1a 2>/dev/null; ip link del vmb1a 2>/dev/null");
    ASSERT_EQ(Sh("ip link add vme1a type veth peer name vm0 && ip link set vme1a up && "
                 "ip link set vm0 up"),
              "");
    auto k = NetlinkKernel::Create({});
    ASSERT_TRUE(k.ok()) << k.status();
    kernel_ = std::move(*k);
    vme_ = IfIndex("vme1a");
    ASSERT_NE(vme_, 0);
  }
  void TearDown() override {
    if (KernelTestsIsolated())
      Sh("ip link del vme1a 2>/dev/null; ip link del vmb1a 2>/dev/null");
  }
  int IfIndex(const std::string& name) {
    auto links = kernel_->DumpLinks();
    if (!links.ok()) return 0;
    for (const Link& l : *links) {
      if (l.name == name) return l.ifindex;
    }
    return 0;
  }
  void ExpectAllOk(const std::vector<absl::Status>& results) {
    for (const auto& s : results) EXPECT_TRUE(s.ok()) << s;
  }
  const Qdisc* Find(const Snapshot& s, int ifindex, uint32_t parent) {
    for (const Qdisc& q : s.qdiscs) {
      if (q.ifindex == ifindex && q.parent == parent) return &q;
    }
    return nullptr;
  }

  std::unique_ptr<NetlinkKernel> kernel_;
  int vme_ = 0;
};

// One batch, as the reconciler sends it for a new VM: the ifb's create
// carries its tbf and the redirect, written once its ifindex is read back.
TEST_F(TcKernelTest, ShapersAsTcShowsThemAndReadBackEqual) {
  Qdisc to_vm = Tbf(vme_, 20'000'000, DefaultBurstBytes(20'000'000));
  Qdisc ingress{.ifindex = vme_,
                .parent = kIngressParent,
                .handle = kIngressHandle,
                .kind = "ingress"};
  CreateIfb create{"vmb1a", "vme1a", Tbf(0, 400'000'000'000ull, 30000),  // above 2^32 B/s
                   TcFilter{.ifindex = vme_}};
  ExpectAllOk(kernel_->Apply({SetQdisc{to_vm}, SetQdisc{ingress}, create}));
  int ifb = IfIndex("vmb1a");
  ASSERT_NE(ifb, 0);
  Qdisc from_vm = Tbf(ifb, 400'000'000'000ull, 30000);

  EXPECT_THAT(Sh("tc qdisc show dev vme1a root"), HasSubstr("qdisc tbf ed: root refcnt"));
  EXPECT_THAT(Sh("tc qdisc show dev vme1a root"),
              HasSubstr("rate 20Mbit burst 64Kb lat 50ms"));
  EXPECT_THAT(Sh("tc qdisc show dev vmb1a root"), HasSubstr("rate 400Gbit"));
  EXPECT_THAT(Sh("ip -d link show vmb1a"), HasSubstr("ifb"));
  EXPECT_THAT(Sh("ip link show vmb1a"), HasSubstr(",UP"));
  // Up without the kernel's IPv6 setup: no address generation, no link-local.
  EXPECT_THAT(Sh("ip -d link show vmb1a"), HasSubstr("addrgenmode none"));
  EXPECT_EQ(Sh("ip -6 -o addr show dev vmb1a"), "");
  std::string filters = Sh("tc filter show dev vme1a ingress");
  EXPECT_THAT(filters, HasSubstr("pref 237 u32"));
  EXPECT_THAT(filters, HasSubstr("match 00000000/00000000 at 0"));
  EXPECT_THAT(filters, HasSubstr("Egress Redirect to device vmb1a"));

  auto snap = kernel_->Dump();
  ASSERT_TRUE(snap.ok()) << snap.status();
  const Qdisc* root = Find(*snap, vme_, kRootParent);
  ASSERT_NE(root, nullptr);
  EXPECT_TRUE(TbfMatches(*root, to_vm)) << root->ToString() << " vs " << to_vm.ToString();
  const Qdisc* ifb_root = Find(*snap, ifb, kRootParent);
  ASSERT_NE(ifb_root, nullptr);
  EXPECT_TRUE(TbfMatches(*ifb_root, from_vm))
      << ifb_root->ToString() << " vs " << from_vm.ToString();
  EXPECT_FALSE(TbfMatches(*root, Tbf(vme_, 8'000'000, DefaultBurstBytes(20'000'000))));
  ASSERT_NE(Find(*snap, vme_, kIngressParent), nullptr);
  bool found = false;
  for (const TcFilter& f : snap->filters) {
    if (f.ifindex == vme_ && f.prio == kFilterPrio && f.match_all &&
        f.redirect_ifindex == ifb && f.protocol == ETH_P_ALL) {
      found = true;
    }
  }
  EXPECT_TRUE(found) << filters;
  for (const Link& l : snap->links) {
    if (l.name == "vmb1a") {
      EXPECT_EQ(l.kind, "ifb");
    }
    if (l.name == "vme1a") {
      EXPECT_EQ(l.kind, "veth");
    }
  }
}

// Bringing an ifb up is by name, so it must follow only a create of ours
// that succeeded: another's link of that name stays as it was.
TEST_F(TcKernelTest, AnotherLinkWithTheIfbsNameIsLeftDown) {
  ASSERT_EQ(Sh("ip link add vmb1a type veth peer name vm1"), "");
  std::vector<absl::Status> results =
      kernel_->Apply({CreateIfb{"vmb1a", "vme1a", {}, {}}});
  ASSERT_EQ(results.size(), 1u);
  EXPECT_EQ(results[0].code(), absl::StatusCode::kAlreadyExists) << results[0];
  std::string link = Sh("ip -d link show vmb1a");
  EXPECT_THAT(link, HasSubstr("veth"));
  EXPECT_THAT(link, Not(HasSubstr(",UP")));
  EXPECT_THAT(link, HasSubstr("addrgenmode eui64"));
}

// The redirect needs the VM link's ingress qdisc: without it the create's
// follow-up fails, and the CreateIfb says so; the ifb and its tbf stay (the
// next pass finds them and adds what is missing).
TEST_F(TcKernelTest, AFailedRedirectFailsItsCreate) {
  CreateIfb create{"vmb1a", "vme1a", Tbf(0, 8'000'000, 30000), TcFilter{.ifindex = vme_}};
  std::vector<absl::Status> results = kernel_->Apply({create});
  ASSERT_EQ(results.size(), 1u);
  EXPECT_FALSE(results[0].ok());
  EXPECT_THAT(results[0].message(), HasSubstr("created, but its tbf or redirect failed"));
  EXPECT_THAT(Sh("ip link show vmb1a"), HasSubstr(",UP"));
  EXPECT_THAT(Sh("tc qdisc show dev vmb1a root"), HasSubstr("rate 8Mbit"));
  EXPECT_EQ(Sh("tc filter show dev vme1a ingress"), "");
}

TEST_F(TcKernelTest, ReplaceChangesInPlace) {
  ExpectAllOk(kernel_->Apply({SetQdisc{Tbf(vme_, 20'000'000, 65536)}}));
  // Some packets through it (ARP requests for an address nobody has).
  Sh("ip addr add 203.0.113.2/24 dev vme1a && ping -c 2 -i 0.01 -W 0.1 203.0.113.1 "
     ">/dev/null 2>&1");
  std::string before = Sh("tc -s qdisc show dev vme1a root");
  ExpectAllOk(kernel_->Apply({SetQdisc{Tbf(vme_, 8'000'000, 65536)}}));
  std::string after = Sh("tc -s qdisc show dev vme1a root");
  EXPECT_THAT(after, HasSubstr("rate 8Mbit"));
  // The same qdisc, changed: its counters kept (a new one would start at 0 pkt).
  EXPECT_THAT(before, Not(HasSubstr("Sent 0 bytes 0 pkt")));
  EXPECT_THAT(after, Not(HasSubstr("Sent 0 bytes 0 pkt"))) << after;
}

TEST_F(TcKernelTest, DeletesAreOwnedAndIdempotent) {
  // A foreign root qdisc is not deleted by a delete naming our handle.
  Sh("tc qdisc add dev vme1a root handle 1: htb");
  auto results = kernel_->Apply({DeleteQdisc{Tbf(vme_, 20'000'000, 65536)}});
  EXPECT_FALSE(results[0].ok());
  EXPECT_THAT(Sh("tc qdisc show dev vme1a root"), HasSubstr("htb 1:"));
  Sh("tc qdisc del dev vme1a root");
  // Deleting what is gone is fine.
  Qdisc ingress{.ifindex = vme_,
                .parent = kIngressParent,
                .handle = kIngressHandle,
                .kind = "ingress"};
  ExpectAllOk(kernel_->Apply({DeleteTcFilter{TcFilter{.ifindex = vme_}},
                              DeleteQdisc{ingress}, DeleteLink{999999, "vmb-gone"}}));
  Sh("tc qdisc add dev vme1a ingress");
  ExpectAllOk(kernel_->Apply({DeleteTcFilter{TcFilter{.ifindex = vme_}}}));
}

TEST_F(TcKernelTest, EventsReportTcChangesBySomeoneElse) {
  ExpectAllOk(kernel_->Apply({SetQdisc{Tbf(vme_, 20'000'000, 65536)}}));
  std::vector<Event> drained;
  (void)kernel_->ReadEvents(&drained);
  Sh("tc qdisc del dev vme1a root");
  std::vector<Event> events;
  ASSERT_TRUE(kernel_->ReadEvents(&events).ok());
  bool deleted = false;
  for (const Event& e : events) {
    if (const auto* q = std::get_if<QdiscEvent>(&e)) {
      if (q->deleted && q->qdisc.ifindex == vme_ && q->qdisc.handle == kQdiscHandle) {
        deleted = true;
      }
    }
  }
  EXPECT_TRUE(deleted);
}

TEST_F(TcKernelTest, CapabilitiesProbeAnswers) {
  TcCapabilities caps = ProbeTcCapabilities();
  // Whatever the kernel, the probe answers; the log line reads like this.
  EXPECT_THAT(caps.ToString(), HasSubstr("police="));
  std::string config =
      Sh("zcat /proc/config.gz 2>/dev/null | grep -E '^CONFIG_NET_ACT_POLICE='");
  if (!config.empty()) {
    EXPECT_TRUE(caps.police) << config;
  }
}

}  // namespace
}  // namespace vmnet::kernel
