// The reconciler's behaviour over the fake kernel: what a user of the API
// would check on the host, without needing privileges.
#include "vmnet/reconciler/reconciler.h"

#include <errno.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <linux/neighbour.h>
#include <linux/rtnetlink.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <set>
#include <thread>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "fake_clock.h"
#include "fake_kernel.h"
#include "vmnet/events/event_log.h"

namespace vmnet {
namespace {

using testing::FakeKernel;
using ::testing::HasSubstr;

constexpr uint8_t kProto = 237;

IpAddress Ip(const char* s) { return *IpAddress::Parse(s); }

// Collects every event the log hands it.
class RecordingWatcher : public Watcher {
 public:
  bool Push(const Chunk& chunk) override {
    std::vector<v1::WatchEvent> parsed = chunk.Parse();
    vmnet::MutexLock lock(&mu_);
    events_.insert(events_.end(), parsed.begin(), parsed.end());
    return true;
  }
  void PushBacklog(const Chunk& chunk) override { Push(chunk); }
  void Close(absl::Status) override {}
  std::vector<v1::WatchEvent> events() const {
    vmnet::MutexLock lock(&mu_);
    return events_;
  }

 private:
  mutable vmnet::Mutex mu_;
  std::vector<v1::WatchEvent> events_;
};

class ReconcilerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vmnet-reconciler-test.XXXXXX";
    dir_ = mkdtemp(tmpl);
    uplink_ = kernel_.AddLink("eth0", true);
    kernel_.AddForeignAddress("eth0", "198.51.100.1/24");
    options_.host.uplinks = {"eth0"};
    options_.host.protocol = kProto;
    options_.proxy_check_interval = std::chrono::milliseconds(20);
  }

  void TearDown() override {
    StopAgent();
    std::filesystem::remove_all(dir_);
  }

  void StartAgent() {
    auto store = StateStore::Open(dir_);
    ASSERT_TRUE(store.ok()) << store.status();
    store_.emplace(std::move(*store));
    events_ = std::make_unique<EventLog>("test", 1000);
    ASSERT_TRUE(events_->Subscribe(&watcher_, "", 0, false).ok());
    reconciler_ =
        std::make_unique<Reconciler>(&kernel_, &*store_, events_.get(), options_);
    ASSERT_TRUE(reconciler_->Start().ok());
  }

  void StopAgent() {
    if (events_) events_->Unsubscribe(&watcher_);
    reconciler_.reset();
    store_.reset();
  }

  absl::StatusOr<VmView> Attach(const std::string& vm_id, const std::string& interface,
                                std::vector<std::string> addresses,
                                const std::string& mac = "", bool validate_only = false) {
    auto spec = ParseVmSpec(vm_id, interface, addresses, mac, options_.rules);
    if (!spec.ok()) return spec.status();
    std::promise<absl::StatusOr<VmView>> done;
    reconciler_->Attach(*spec, validate_only, "",
                        [&](absl::StatusOr<VmView> v) { done.set_value(std::move(v)); });
    return done.get_future().get();
  }

  absl::Status Detach(const std::string& vm_id, bool allow_missing = false) {
    std::promise<absl::Status> done;
    reconciler_->Detach(vm_id, allow_missing, "",
                        [&](absl::Status s) { done.set_value(std::move(s)); });
    return done.get_future().get();
  }

  // Waits for a condition with a deadline (no fixed sleeps).
  template <typename Pred>
  bool WaitFor(Pred pred, std::chrono::milliseconds deadline = std::chrono::seconds(5)) {
    auto until = std::chrono::steady_clock::now() + deadline;
    while (std::chrono::steady_clock::now() < until) {
      if (pred()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return pred();
  }

  // The VM's state; nullopt for a VM the agent does not hold, so that a VM
  // that vanished never passes for a pending one.
  std::optional<VmState> StateOf(const std::string& vm_id) {
    auto vm = reconciler_->FindVm(vm_id);
    if (!vm) return std::nullopt;
    return vm->state;
  }

  const kernel::Route* FindRoute(const kernel::Snapshot& s, const char* ip) {
    for (const auto& r : s.routes) {
      if (r.destination == IpPrefix::Host(Ip(ip))) return &r;
    }
    return nullptr;
  }
  const kernel::Neighbor* FindNeighbor(const kernel::Snapshot& s, int ifindex,
                                       const char* ip, bool proxy) {
    for (const auto& n : s.neighbors) {
      if (n.ifindex == ifindex && n.address == Ip(ip) && n.proxy == proxy) return &n;
    }
    return nullptr;
  }
  const kernel::Address* FindAddress(const kernel::Snapshot& s, int ifindex,
                                     const char* p) {
    for (const auto& a : s.addresses) {
      if (a.ifindex == ifindex && a.prefix == *IpPrefix::Parse(p)) return &a;
    }
    return nullptr;
  }
  const kernel::Link* FindLink(const kernel::Snapshot& s, int ifindex) {
    for (const auto& l : s.links) {
      if (l.ifindex == ifindex) return &l;
    }
    return nullptr;
  }
  bool HoldsVm(int ifindex, const char* ip) {
    auto s = kernel_.State();
    const auto* r = FindRoute(s, ip);
    const auto* l = FindLink(s, ifindex);
    return r != nullptr && r->ifindex == ifindex && r->protocol == kProto &&
           FindNeighbor(s, uplink_, ip, true) != nullptr &&
           FindAddress(s, ifindex, "169.255.30.1/32") != nullptr && l != nullptr && l->up;
  }
  size_t CountEvents(v1::EventType type) {
    size_t n = 0;
    for (const auto& e : watcher_.events()) n += e.type() == type;
    return n;
  }

  FakeKernel kernel_;
  std::string dir_;
  int uplink_ = 0;
  ReconcilerOptions options_;
  std::optional<StateStore> store_;
  std::unique_ptr<EventLog> events_;
  RecordingWatcher watcher_;
  std::unique_ptr<Reconciler> reconciler_;
};

TEST_F(ReconcilerTest, AttachProgramsEveryObjectOfTheRecipe) {
  int vme = kernel_.AddLink("vme1a");
  StartAgent();
  auto vm = Attach("vm-1", "vme1a", {"198.51.100.201"}, "02:00:00:00:00:01");
  ASSERT_TRUE(vm.ok()) << vm.status();
  EXPECT_EQ(vm->state, VmState::kProgrammed);

  auto s = kernel_.State();
  const auto* link = FindLink(s, vme);
  EXPECT_TRUE(link->up);
  EXPECT_EQ(link->ipv4_forwarding, true);
  EXPECT_EQ(FindLink(s, uplink_)->ipv4_forwarding, true);
  const auto* route = FindRoute(s, "198.51.100.201");
  ASSERT_NE(route, nullptr);
  EXPECT_EQ(route->ifindex, vme);
  EXPECT_EQ(route->scope, RT_SCOPE_LINK);
  EXPECT_EQ(route->protocol, kProto);
  const auto* proxy = FindNeighbor(s, uplink_, "198.51.100.201", true);
  ASSERT_NE(proxy, nullptr);
  EXPECT_EQ(proxy->protocol, kProto);
  const auto* gw = FindAddress(s, vme, "169.255.30.1/32");
  ASSERT_NE(gw, nullptr);
  EXPECT_EQ(gw->scope, RT_SCOPE_LINK);
  const auto* neigh = FindNeighbor(s, vme, "198.51.100.201", false);
  ASSERT_NE(neigh, nullptr);
  EXPECT_EQ(neigh->lladdr->ToString(), "02:00:00:00:00:01");
  EXPECT_TRUE(neigh->state & NUD_PERMANENT);
  EXPECT_EQ(CountEvents(v1::EVENT_TYPE_VM_ADDED), 1u);
}

// The attach's event says how many kernel writes it took, by kind, not each
// write: the Watch history retains it, one per VM.
TEST_F(ReconcilerTest, AttachEventCountsItsWritesByKind) {
  kernel_.AddLink("vme1a");
  StartAgent();
  size_t before = kernel_.writes_applied();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}, "02:00:00:00:00:01").ok());
  size_t writes = kernel_.writes_applied() - before;
  std::vector<std::string> details;
  for (const v1::WatchEvent& e : watcher_.events()) {
    if (e.type() == v1::EVENT_TYPE_VM_ADDED) details.push_back(e.detail());
  }
  ASSERT_EQ(details.size(), 1u);
  const std::string& detail = details[0];
  EXPECT_TRUE(
      absl::StartsWith(detail, absl::StrCat("attached: ", writes, " kernel writes (")))
      << detail;
  // The gateway address, the route, the proxy entry on eth0, the MAC's neighbour.
  for (const char* kind :
       {" address=1", " route=1", " proxy_neighbor=1", " neighbor=1"}) {
    EXPECT_TRUE(absl::StrContains(detail, kind)) << detail << " lacks" << kind;
  }
  EXPECT_FALSE(absl::StrContains(detail, "198.51.100.201")) << detail;
}

TEST_F(ReconcilerTest, AcknowledgedAttachIsAlreadyOnDisk) {
  kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}).ok());
  std::ifstream f(store_->path(), std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(f)),
                    std::istreambuf_iterator<char>());
  auto state = StateStore::Decode(bytes);
  ASSERT_TRUE(state.ok()) << state.status();
  ASSERT_EQ(state->vms.size(), 1u);
  EXPECT_EQ(state->vms[0].spec.vm_id, "vm-1");
}

// An attach with an egress limit is answered PROGRAMMED: the ifb's tbf and
// the redirect to it ride on the ifb's create, so one pass installs all;
// the events of what the create made change nothing after (no second event).
TEST_F(ReconcilerTest, AttachWithAnEgressLimitIsProgrammedInOnePass) {
  int vme = kernel_.AddLink("vme1a");
  kernel_.AddLink("vme2b");
  StartAgent();
  auto spec = ParseVmSpec("vm-1", "vme1a", {"198.51.100.201"}, "", options_.rules);
  ASSERT_TRUE(spec.ok()) << spec.status();
  spec->bandwidth.egress_bits_per_second = 20'000'000;
  std::promise<absl::StatusOr<VmView>> done;
  reconciler_->Attach(*spec, false, "",
                      [&](absl::StatusOr<VmView> v) { done.set_value(std::move(v)); });
  absl::StatusOr<VmView> vm = done.get_future().get();
  ASSERT_TRUE(vm.ok()) << vm.status();
  EXPECT_EQ(vm->state, VmState::kProgrammed) << vm->message;
  kernel::Snapshot s = kernel_.State();
  int ifb = 0;
  for (const kernel::Link& l : s.links) {
    if (l.name == "vmb1a" && l.kind == "ifb" && l.up) ifb = l.ifindex;
  }
  ASSERT_NE(ifb, 0);
  bool tbf = false, redirect = false;
  for (const kernel::Qdisc& q : s.qdiscs) {
    tbf |= q.ifindex == ifb && q.kind == "tbf" && q.rate_bytes_per_second == 2'500'000;
  }
  for (const kernel::TcFilter& f : s.filters) {
    redirect |= f.ifindex == vme && f.redirect_ifindex == ifb;
  }
  EXPECT_TRUE(tbf);
  EXPECT_TRUE(redirect);
  // Another VM's pass reads the kernel's events of the ifb first and plans
  // vm-1 again: a write for it would be a second event (a repair).
  ASSERT_TRUE(Attach("vm-2", "vme2b", {"198.51.100.202"}).ok());
  std::vector<std::string> vm1_events;
  for (const v1::WatchEvent& e : watcher_.events()) {
    if (e.vm().vm_id() == "vm-1") vm1_events.push_back(e.detail());
  }
  EXPECT_EQ(vm1_events.size(), 1u) << ::testing::PrintToString(vm1_events);
}

TEST_F(ReconcilerTest, SameSpecAgainWritesNothing) {
  kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}).ok());
  size_t writes = kernel_.writes_applied();
  auto again = Attach("vm-1", "vme1a", {"198.51.100.201"});
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->state, VmState::kProgrammed);
  EXPECT_EQ(kernel_.writes_applied(), writes);
}

TEST_F(ReconcilerTest, ChangedSpecTouchesOnlyWhatChanged) {
  int vme = kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201", "198.51.100.202"}).ok());
  size_t writes = kernel_.writes_applied();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201", "198.51.100.203"}).ok());
  // .202 out (route + proxy), .203 in (route + proxy); .201 untouched.
  EXPECT_EQ(kernel_.writes_applied(), writes + 4);
  auto s = kernel_.State();
  EXPECT_EQ(FindRoute(s, "198.51.100.202"), nullptr);
  EXPECT_EQ(FindNeighbor(s, uplink_, "198.51.100.202", true), nullptr);
  EXPECT_TRUE(HoldsVm(vme, "198.51.100.203"));
  EXPECT_TRUE(HoldsVm(vme, "198.51.100.201"));
}

TEST_F(ReconcilerTest, DetachRemovesOnlyWhatAttachInstalled) {
  int vme = kernel_.AddLink("vme1a");
  kernel::Route foreign_route;
  foreign_route.destination = *IpPrefix::Parse("203.0.113.0/24");
  foreign_route.ifindex = uplink_;
  foreign_route.protocol = RTPROT_STATIC;
  kernel_.AddForeignRoute(foreign_route);
  kernel::Neighbor foreign_proxy;
  foreign_proxy.ifindex = uplink_;
  foreign_proxy.address = Ip("198.51.100.99");
  foreign_proxy.proxy = true;
  kernel_.AddForeignNeighbor(foreign_proxy);
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}, "02:00:00:00:00:01").ok());
  ASSERT_TRUE(Detach("vm-1").ok());

  auto s = kernel_.State();
  EXPECT_EQ(FindRoute(s, "198.51.100.201"), nullptr);
  EXPECT_EQ(FindNeighbor(s, uplink_, "198.51.100.201", true), nullptr);
  EXPECT_EQ(FindNeighbor(s, vme, "198.51.100.201", false), nullptr);
  EXPECT_EQ(FindAddress(s, vme, "169.255.30.1/32"), nullptr);
  ASSERT_NE(FindLink(s, vme), nullptr) << "the hypervisor's link must stay";
  EXPECT_TRUE(FindLink(s, vme)->up) << "the link's up/down state is left alone";
  EXPECT_EQ(FindLink(s, vme)->ipv4_forwarding, false);
  EXPECT_NE(FindNeighbor(s, uplink_, "198.51.100.99", true), nullptr);
  EXPECT_EQ(s.routes.size(), 1u);
  EXPECT_NE(FindAddress(s, uplink_, "198.51.100.1/24"), nullptr);
  EXPECT_EQ(CountEvents(v1::EVENT_TYPE_VM_REMOVED), 1u);
}

TEST_F(ReconcilerTest, DetachUnknownIsNotFoundUnlessAllowed) {
  StartAgent();
  EXPECT_EQ(Detach("nope").code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(Detach("nope", true).ok());
}

TEST_F(ReconcilerTest, PendingUntilTheInterfaceAppearsThenFollowsIt) {
  StartAgent();
  auto vm = Attach("vm-1", "vme1a", {"198.51.100.201"});
  ASSERT_TRUE(vm.ok());
  EXPECT_EQ(vm->state, VmState::kPending);
  EXPECT_THAT(vm->message, HasSubstr("vme1a does not exist"));

  int first = kernel_.AddLink("vme1a");
  EXPECT_TRUE(WaitFor([&] { return HoldsVm(first, "198.51.100.201"); }));
  EXPECT_TRUE(WaitFor([&] { return StateOf("vm-1") == VmState::kProgrammed; }));

  kernel_.RemoveLink("vme1a");
  EXPECT_TRUE(WaitFor([&] { return StateOf("vm-1") == VmState::kPending; }));

  int second = kernel_.AddLink("vme1a");
  ASSERT_NE(first, second);
  EXPECT_TRUE(WaitFor([&] { return HoldsVm(second, "198.51.100.201"); }));
  EXPECT_TRUE(WaitFor([&] { return StateOf("vm-1") == VmState::kProgrammed; }));
}

// Issue 13, case 2: a rename is the VM's link leaving (PENDING, nothing
// published, our objects on the renamed link swept) and, renamed back, the
// link coming back.
TEST_F(ReconcilerTest, ARenamedLinkIsTheLinkLeavingAndComingBack) {
  int vme = kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}).ok());
  ASSERT_TRUE(HoldsVm(vme, "198.51.100.201"));
  kernel_.RenameLink("vme1a", "vme1f");
  EXPECT_TRUE(WaitFor([&] { return StateOf("vm-1") == VmState::kPending; }));
  EXPECT_TRUE(WaitFor([&] {
    auto s = kernel_.State();
    return FindRoute(s, "198.51.100.201") == nullptr &&
           FindNeighbor(s, uplink_, "198.51.100.201", true) == nullptr &&
           FindAddress(s, vme, "169.255.30.1/32") == nullptr;
  })) << "the renamed link keeps the VM's objects, or the uplink still publishes it";
  kernel_.RenameLink("vme1f", "vme1a");
  EXPECT_TRUE(WaitFor([&] { return StateOf("vm-1") == VmState::kProgrammed; }));
  EXPECT_TRUE(WaitFor([&] { return HoldsVm(vme, "198.51.100.201"); }));
}

TEST_F(ReconcilerTest, DriftIsRepaired) {
  int vme = kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}, "02:00:00:00:00:01").ok());

  kernel_.DeleteRoute(IpPrefix::Host(Ip("198.51.100.201")));
  EXPECT_TRUE(WaitFor([&] { return HoldsVm(vme, "198.51.100.201"); }));
  EXPECT_TRUE(WaitFor([&] { return CountEvents(v1::EVENT_TYPE_DRIFT_REPAIRED) >= 1; }));

  // Proxy entries raise no event: the periodic proxy dump finds it.
  kernel_.DeleteNeighbor(uplink_, Ip("198.51.100.201"), true);
  EXPECT_TRUE(WaitFor([&] { return HoldsVm(vme, "198.51.100.201"); }));

  kernel_.DeleteNeighbor(vme, Ip("198.51.100.201"), false);
  EXPECT_TRUE(WaitFor([&] {
    return FindNeighbor(kernel_.State(), vme, "198.51.100.201", false) != nullptr;
  }));

  // A link set down loses its routes silently; it is set up and refilled.
  kernel_.SetLinkUp("vme1a", false);
  EXPECT_TRUE(WaitFor([&] { return HoldsVm(vme, "198.51.100.201"); }));
  // The kernel holds the repair before the pass ends and its event is sent.
  EXPECT_TRUE(WaitFor([&] {
    return reconciler_->counters().drift_repairs ==
           CountEvents(v1::EVENT_TYPE_DRIFT_REPAIRED);
  }));
  EXPECT_EQ(reconciler_->counters().drift_repairs,
            CountEvents(v1::EVENT_TYPE_DRIFT_REPAIRED));
}

// The gateway address is the VM link's only IPv4 address: deleting it makes
// the kernel flush the link's IPv4 routes and neighbour entries, and the route
// raises no event. All of it is put back.
TEST_F(ReconcilerTest, ADeletedGatewayAddressAndWhatWentWithItArePutBack) {
  int vme = kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}, "02:00:00:00:00:01").ok());
  size_t writes = kernel_.writes_applied();
  kernel_.DeleteAddress("vme1a", "169.255.30.1/32");
  // The address, the route and the neighbour entry written again (the agent
  // may be quicker than the test's look at the gap).
  EXPECT_TRUE(WaitFor([&] {
    return kernel_.writes_applied() >= writes + 3 && HoldsVm(vme, "198.51.100.201") &&
           FindNeighbor(kernel_.State(), vme, "198.51.100.201", false) != nullptr;
  })) << "the gateway address, the route or the neighbour entry was not put back";
  EXPECT_EQ(StateOf("vm-1"), VmState::kProgrammed);
}

TEST_F(ReconcilerTest, ForeignObjectInTheWayFailsTheVmUntilItGoes) {
  kernel_.AddLink("vme1a");
  kernel::Route foreign;
  foreign.destination = IpPrefix::Host(Ip("198.51.100.201"));
  foreign.ifindex = uplink_;
  foreign.protocol = RTPROT_STATIC;
  kernel_.AddForeignRoute(foreign);
  StartAgent();
  auto vm = Attach("vm-1", "vme1a", {"198.51.100.201"});
  ASSERT_TRUE(vm.ok());
  EXPECT_EQ(vm->state, VmState::kFailed);
  EXPECT_THAT(vm->message, HasSubstr("route 198.51.100.201/32"));
  EXPECT_THAT(vm->message, HasSubstr("is not vmnetd's"));
  // Never overwritten:
  EXPECT_EQ(FindRoute(kernel_.State(), "198.51.100.201")->protocol, RTPROT_STATIC);

  kernel_.DeleteRoute(IpPrefix::Host(Ip("198.51.100.201")));
  EXPECT_TRUE(WaitFor([&] { return StateOf("vm-1") == VmState::kProgrammed; }));
}

TEST_F(ReconcilerTest, FailedWritesAreRetriedAndSurfaced) {
  int vme = kernel_.AddLink("vme1a");
  StartAgent();
  kernel_.FailWrites(EPERM);
  auto vm = Attach("vm-1", "vme1a", {"198.51.100.201"});
  ASSERT_TRUE(vm.ok());
  EXPECT_EQ(vm->state, VmState::kFailed);
  EXPECT_THAT(vm->message, HasSubstr("errno 1"));
  kernel_.FailWrites(0);
  EXPECT_TRUE(WaitFor([&] { return StateOf("vm-1") == VmState::kProgrammed; }));
  EXPECT_TRUE(HoldsVm(vme, "198.51.100.201"));
}

// Backoff, retries and intervals on a fake clock: nothing sleeps, and time
// moves only when the test says.
class ReconcilerClockTest : public ReconcilerTest {
 protected:
  void SetUp() override {
    ReconcilerTest::SetUp();
    options_.clock = &clock_;
    options_.proxy_check_interval = std::chrono::milliseconds(500);
  }
  // Two round trips through the reconciler's loop: the second pass began
  // after everything the test did before, so it saw the clock as it is now.
  void Sync() {
    ASSERT_TRUE(Detach("no-such-vm", /*allow_missing=*/true).ok());
    ASSERT_TRUE(Detach("no-such-vm", /*allow_missing=*/true).ok());
  }
  FakeClock clock_;
};

TEST_F(ReconcilerClockTest, AFailedVmIsRetriedAfterItsBackoffWhichDoubles) {
  int vme = kernel_.AddLink("vme1a");
  StartAgent();
  kernel_.FailWrites(EPERM);
  auto vm = Attach("vm-1", "vme1a", {"198.51.100.201"});
  ASSERT_TRUE(vm.ok());
  ASSERT_EQ(vm->state, VmState::kFailed);
  // The first retry is due after 100 ms; it fails again, so the next waits 200 ms.
  clock_.Advance(std::chrono::milliseconds(100));
  Sync();
  kernel_.FailWrites(0);
  clock_.Advance(std::chrono::milliseconds(199));
  Sync();
  EXPECT_EQ(StateOf("vm-1"), VmState::kFailed);
  EXPECT_FALSE(HoldsVm(vme, "198.51.100.201"));
  clock_.Advance(std::chrono::milliseconds(1));
  EXPECT_TRUE(WaitFor([&] { return StateOf("vm-1") == VmState::kProgrammed; }));
  EXPECT_TRUE(HoldsVm(vme, "198.51.100.201"));
}

TEST_F(ReconcilerClockTest, ProxyEntriesAreReadBackEveryInterval) {
  int vme = kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}).ok());
  // Deleting a proxy entry raises no kernel event: only the next proxy dump,
  // one interval after the last, finds it.
  kernel_.DeleteNeighbor(uplink_, Ip("198.51.100.201"), true);
  clock_.Advance(std::chrono::milliseconds(400));
  Sync();
  EXPECT_FALSE(HoldsVm(vme, "198.51.100.201"));
  clock_.Advance(std::chrono::milliseconds(100));
  EXPECT_TRUE(WaitFor([&] { return HoldsVm(vme, "198.51.100.201"); }));
}

// The proxy dump is read on its own thread while the reconciler goes on: an
// entry the reconciler writes meanwhile is newer than the dump, and the
// dump's result does not undo it (taken at its word, the dump would make
// the VM look unpublished and its entry be written again).
TEST_F(ReconcilerClockTest, AProxyDumpOlderThanAWriteDoesNotUndoIt) {
  int vme = kernel_.AddLink("vme1a");
  StartAgent();
  // Shared with the hook, which runs on the agent's proxy thread and may
  // outlive this function's locals.
  struct Held {
    std::atomic<int> dumps{0};
    std::promise<void> first_read, release;
    std::shared_future<void> released = release.get_future().share();
    std::atomic<bool> let_go{false};
    void LetGo() {
      if (!let_go.exchange(true)) release.set_value();
    }
  };
  auto held = std::make_shared<Held>();
  kernel_.AfterProxyDumpRead([held] {
    if (++held->dumps == 1) {
      held->first_read.set_value();
      held->released.wait();
    }
  });
  // On every way out, or the agent's proxy thread never stops.
  auto cleanup = absl::MakeCleanup([this, held] {
    kernel_.AfterProxyDumpRead(nullptr);
    held->LetGo();
  });
  clock_.Advance(std::chrono::milliseconds(500));  // a check: its dump holds no entry
  held->first_read.get_future().wait();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}).ok());
  ASSERT_TRUE(HoldsVm(vme, "198.51.100.201"));
  const size_t writes = kernel_.writes_applied();
  held->LetGo();
  // A second check starts only once the first one's result was taken (and
  // the pass that took it is over).
  ASSERT_TRUE(WaitFor([&] {
    clock_.Advance(std::chrono::milliseconds(500));
    return held->dumps.load() >= 2;
  }));
  Sync();
  EXPECT_EQ(kernel_.writes_applied(), writes);
  EXPECT_TRUE(HoldsVm(vme, "198.51.100.201"));
}

TEST_F(ReconcilerClockTest, TheFullResyncComesEveryInterval) {
  options_.full_resync_interval = std::chrono::seconds(300);
  kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}).ok());
  clock_.Advance(std::chrono::seconds(299));
  Sync();
  EXPECT_EQ(reconciler_->counters().full_resyncs, 0u);
  clock_.Advance(std::chrono::seconds(1));
  EXPECT_TRUE(WaitFor([&] { return reconciler_->counters().full_resyncs == 1u; }));
}

// Port security's nftables objects, owned like every other kind.
class PortSecurityTest : public ReconcilerTest {
 protected:
  void SetUp() override {
    ReconcilerTest::SetUp();
    kernel::PortSecurityConfig config;
    config.vm_to_host_allow = {{kernel::VmToHostPort::Protocol::kUdp, 53}};
    options_.host.port_security = config;
  }
  std::set<kernel::NftElement> Elements() { return kernel_.port_security().elements(); }
  static kernel::NftElement Source(const char* link, const char* prefix) {
    return kernel::NftSourcePrefix{link, *IpPrefix::Parse(prefix)};
  }
};

TEST_F(PortSecurityTest, AttachInstallsTheVmsElementsAndDetachRemovesThem) {
  kernel_.AddLink("vme1a");
  kernel_.AddLink("vme2a");
  StartAgent();
  ASSERT_TRUE(kernel_.port_security().base().has_value());
  ASSERT_TRUE(Attach("vm-2", "vme2a", {"198.51.100.202"}).ok());
  auto spec = ParseVmSpec("vm-1", "vme1a", {"198.51.100.201", "2001:db8:1::201"}, "",
                          options_.rules);
  ASSERT_TRUE(spec.ok());
  spec->allowed_source_prefixes = {*IpPrefix::Parse("203.0.113.0/24"),
                                   *IpPrefix::Parse("203.0.113.128/25")};
  std::promise<absl::StatusOr<VmView>> done;
  reconciler_->Attach(*spec, false, "",
                      [&](absl::StatusOr<VmView> v) { done.set_value(std::move(v)); });
  auto vm = done.get_future().get();
  ASSERT_TRUE(vm.ok()) << vm.status();
  EXPECT_EQ(vm->state, VmState::kProgrammed);
  std::set<kernel::NftElement> want = {
      kernel::NftVmLink{"vme1a"},
      Source("vme1a", "198.51.100.201/32"),
      Source("vme1a", "2001:db8:1::201/128"),
      Source("vme1a", "203.0.113.0/24"),  // the /25 inside it is left out
      kernel::NftArpSender{"vme1a", Ip("198.51.100.201")},
      kernel::NftVmLink{"vme2a"},
      Source("vme2a", "198.51.100.202/32"),
      kernel::NftArpSender{"vme2a", Ip("198.51.100.202")}};
  EXPECT_EQ(Elements(), want);

  kernel_.port_security().AddConntrackEntries(Ip("198.51.100.201"), 2);
  ASSERT_TRUE(Detach("vm-1").ok());
  EXPECT_EQ(Elements(),
            (std::set<kernel::NftElement>{
                kernel::NftVmLink{"vme2a"}, Source("vme2a", "198.51.100.202/32"),
                kernel::NftArpSender{"vme2a", Ip("198.51.100.202")}}));
  EXPECT_THAT(
      kernel_.port_security().conntrack_deletions(),
      ::testing::UnorderedElementsAre(Ip("198.51.100.201"), Ip("2001:db8:1::201")));
}

TEST_F(PortSecurityTest, ADeletedTableIsRebuiltWithEveryElement) {
  kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}).ok());
  auto before = Elements();
  kernel_.port_security().DeleteTable();
  EXPECT_TRUE(WaitFor([&] {
    return kernel_.port_security().base().has_value() && Elements() == before;
  }));
  EXPECT_TRUE(WaitFor([&] { return CountEvents(v1::EVENT_TYPE_DRIFT_REPAIRED) >= 1; }));
}

TEST_F(PortSecurityTest, ADeletedElementIsPutBack) {
  kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}).ok());
  kernel_.port_security().RemoveElement(Source("vme1a", "198.51.100.201/32"));
  EXPECT_TRUE(
      WaitFor([&] { return Elements().contains(Source("vme1a", "198.51.100.201/32")); }));
}

TEST_F(PortSecurityTest, RestartWithNothingDriftedWritesNoElement) {
  kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}).ok());
  StopAgent();
  size_t transactions = kernel_.port_security().transactions();
  StartAgent();
  EXPECT_EQ(kernel_.port_security().transactions(), transactions);
  EXPECT_EQ(StateOf("vm-1"), VmState::kProgrammed);
}

TEST_F(PortSecurityTest, TurnedOffTheTablesGo) {
  kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}).ok());
  StopAgent();
  options_.host.port_security.reset();
  StartAgent();
  EXPECT_FALSE(kernel_.port_security().base().has_value());
  EXPECT_TRUE(Elements().empty());
}

TEST_F(PortSecurityTest, ASourcePrefixThatIsAnotherVmsAddressIsRefused) {
  kernel_.AddLink("vme1a");
  kernel_.AddLink("vme2a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}).ok());
  auto spec = ParseVmSpec("vm-2", "vme2a", {"198.51.100.202"}, "", options_.rules);
  ASSERT_TRUE(spec.ok());
  spec->allowed_source_prefixes = {*IpPrefix::Parse("198.51.100.201/32")};
  std::promise<absl::StatusOr<VmView>> done;
  reconciler_->Attach(*spec, false, "",
                      [&](absl::StatusOr<VmView> v) { done.set_value(std::move(v)); });
  auto vm = done.get_future().get();
  EXPECT_EQ(vm.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(
      std::string(vm.status().message()),
      HasSubstr("allowed_source_prefixes[0]: \"198.51.100.201/32\" is the address of VM "
                "\"vm-1\""));
  EXPECT_FALSE(reconciler_->FindVm("vm-2"));
}

TEST_F(PortSecurityTest, AnAddressAnotherVmMaySendAsIsRefused) {
  kernel_.AddLink("vme1a");
  kernel_.AddLink("vme2a");
  StartAgent();
  auto spec = ParseVmSpec("vm-1", "vme1a", {"198.51.100.201"}, "", options_.rules);
  ASSERT_TRUE(spec.ok());
  spec->allowed_source_prefixes = {*IpPrefix::Parse("198.51.100.202/32")};
  std::promise<absl::StatusOr<VmView>> done;
  reconciler_->Attach(*spec, false, "",
                      [&](absl::StatusOr<VmView> v) { done.set_value(std::move(v)); });
  ASSERT_TRUE(done.get_future().get().ok());
  auto second = Attach("vm-2", "vme2a", {"198.51.100.202"});
  EXPECT_EQ(second.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(std::string(second.status().message()),
              HasSubstr("is an allowed source of VM \"vm-1\""));
}

TEST_F(PortSecurityTest, ARebuiltBaseTakesEveryVmsElementsAlong) {
  kernel_.AddLink("vme1a");
  kernel_.AddLink("vme2a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}).ok());
  ASSERT_TRUE(Attach("vm-2", "vme2a", {"198.51.100.202"}).ok());
  auto before = Elements();
  // The table goes while the kernel refuses writes; then an event about one
  // VM comes first: the rebuild that follows must carry both VMs' elements.
  kernel_.FailWrites(ENOMEM);
  kernel_.port_security().DeleteTable();
  ASSERT_TRUE(WaitFor([&] { return StateOf("vm-1") == VmState::kFailed; }));
  kernel_.FailWrites(0);
  kernel_.DeleteRoute(IpPrefix::Host(Ip("198.51.100.201")));
  EXPECT_TRUE(WaitFor([&] {
    return kernel_.port_security().base().has_value() && Elements() == before;
  }));
}

TEST_F(ReconcilerTest, RestartWithNothingDriftedWritesNothing) {
  kernel_.AddLink("vme1a");
  kernel_.AddLink("vme2a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}, "02:00:00:00:00:01").ok());
  ASSERT_TRUE(Attach("vm-2", "vme2a", {"198.51.100.202"}).ok());
  StopAgent();
  size_t writes = kernel_.writes_applied();
  StartAgent();
  EXPECT_EQ(kernel_.writes_applied(), writes);
  EXPECT_EQ(StateOf("vm-1"), VmState::kProgrammed);
  EXPECT_EQ(StateOf("vm-2"), VmState::kProgrammed);
}

TEST_F(ReconcilerTest, RestartRemovesOursThatNoVmWantsAndNothingElse) {
  int vme = kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}).ok());
  StopAgent();
  // While the agent was down: its state was lost for vm-1 (the state file
  // and its journal moved aside by an operator), and someone added an unmarked route of
  // their own. (On the uplink: one on vme1a would go with the orphaned gateway address,
  // the link's last IPv4 address, as the kernel flushes a link's IPv4 routes then; see
  // FakeKernel.)
  std::filesystem::remove(dir_ + "/state.bin");
  std::filesystem::remove(dir_ + "/journal.bin");
  kernel::Route theirs;
  theirs.destination = IpPrefix::Host(Ip("198.51.100.250"));
  theirs.ifindex = uplink_;
  theirs.protocol = RTPROT_STATIC;
  kernel_.AddForeignRoute(theirs);
  StartAgent();
  auto s = kernel_.State();
  EXPECT_EQ(FindRoute(s, "198.51.100.201"), nullptr);
  EXPECT_EQ(FindNeighbor(s, uplink_, "198.51.100.201", true), nullptr);
  EXPECT_EQ(FindAddress(s, vme, "169.255.30.1/32"), nullptr);
  EXPECT_NE(FindRoute(s, "198.51.100.250"), nullptr);
}

TEST_F(ReconcilerTest, RefusesWhatCollidesWithOtherVmsOrTheHost) {
  kernel_.AddLink("vme1a");
  kernel_.AddLink("vme2a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}).ok());
  size_t writes = kernel_.writes_applied();

  auto taken = Attach("vm-2", "vme2a", {"198.51.100.201"});
  EXPECT_EQ(taken.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(std::string(taken.status().message()), HasSubstr("held by VM \"vm-1\""));
  auto link_taken = Attach("vm-2", "vme1a", {"198.51.100.202"});
  EXPECT_EQ(link_taken.status().code(), absl::StatusCode::kAlreadyExists);
  auto uplink = Attach("vm-2", "eth0", {"198.51.100.202"});
  // eth0 fails the default pattern first; with a permissive pattern the
  // uplink rule speaks.
  EXPECT_EQ(uplink.status().code(), absl::StatusCode::kInvalidArgument);
  auto own = Attach("vm-2", "vme2a", {"198.51.100.1"});
  EXPECT_THAT(std::string(own.status().message()), HasSubstr("host's own"));
  auto bcast = Attach("vm-2", "vme2a", {"198.51.100.255"});
  EXPECT_THAT(std::string(bcast.status().message()),
              HasSubstr("broadcast address of a subnet"));
  EXPECT_EQ(kernel_.writes_applied(), writes);
  EXPECT_FALSE(reconciler_->FindVm("vm-2"));
}

TEST_F(ReconcilerTest, UplinkIsRefusedAsAVmInterface) {
  options_.rules.interface_pattern = std::regex(".*");
  StartAgent();
  auto uplink = Attach("vm-2", "eth0", {"198.51.100.202"});
  EXPECT_EQ(uplink.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(uplink.status().message()), HasSubstr("is an uplink"));
}

TEST_F(ReconcilerTest, ValidateOnlyChangesNothing) {
  kernel_.AddLink("vme1a");
  StartAgent();
  size_t writes = kernel_.writes_applied();
  auto vm = Attach("vm-1", "vme1a", {"198.51.100.201"}, "", /*validate_only=*/true);
  ASSERT_TRUE(vm.ok());
  EXPECT_EQ(kernel_.writes_applied(), writes);
  EXPECT_FALSE(reconciler_->FindVm("vm-1"));
}

TEST_F(ReconcilerTest, MaxVmsIsEnforced) {
  options_.max_vms = 1;
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}).ok());
  auto second = Attach("vm-2", "vme2a", {"198.51.100.202"});
  EXPECT_EQ(second.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(second.status().message()), HasSubstr("--max-vms"));
}

TEST_F(ReconcilerTest, OverflowTriggersAFullResync) {
  int vme = kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}).ok());
  ASSERT_EQ(reconciler_->counters().full_resyncs, 0u);
  // The route goes and its deletion event is lost in the overflow, in one
  // step: no event can repair it first, only the re-dump can find it.
  kernel_.DeleteRouteLosingEvents(IpPrefix::Host(Ip("198.51.100.201")));
  EXPECT_TRUE(WaitFor([&] { return HoldsVm(vme, "198.51.100.201"); }));
  EXPECT_EQ(reconciler_->counters().event_overflows, 1u);
  EXPECT_EQ(reconciler_->counters().full_resyncs, 1u);
}

TEST_F(ReconcilerTest, RevisionsKeepIncreasingAcrossRestarts) {
  kernel_.AddLink("vme1a");
  StartAgent();
  auto first = Attach("vm-1", "vme1a", {"198.51.100.201"});
  ASSERT_TRUE(first.ok());
  StopAgent();
  StartAgent();
  auto second = Attach("vm-1", "vme1a", {"198.51.100.202"});
  ASSERT_TRUE(second.ok());
  EXPECT_GT(second->revision, first->revision);
}

// Records what the reconciler asks of the announcer; the test answers probes.
class RecordingAnnouncer : public AddressAnnouncer {
 public:
  void Announce(std::vector<Announcement> items) override {
    vmnet::MutexLock lock(&mu_);
    for (Announcement& item : items) announced_.push_back(std::move(item));
  }
  void Probe(std::vector<ProbeLink> links, std::vector<IpAddress> addresses,
             ProbeDone done) override {
    vmnet::MutexLock lock(&mu_);
    probes_.push_back({std::move(links), std::move(addresses), std::move(done)});
  }
  // "interface address" of each announcement, "+router" when flagged.
  std::vector<std::string> announced() const {
    vmnet::MutexLock lock(&mu_);
    std::vector<std::string> out;
    for (const Announcement& i : announced_) {
      out.push_back(absl::StrCat(i.interface, " ", i.address.ToString(),
                                 i.router ? " +router" : ""));
    }
    return out;
  }
  void Clear() {
    vmnet::MutexLock lock(&mu_);
    announced_.clear();
  }
  size_t probes() const {
    vmnet::MutexLock lock(&mu_);
    return probes_.size();
  }
  std::vector<IpAddress> probed(size_t i) const {
    vmnet::MutexLock lock(&mu_);
    return probes_[i].addresses;
  }
  void Answer(size_t i, std::vector<Conflict> conflicts) {
    ProbeDone done;
    {
      vmnet::MutexLock lock(&mu_);
      done = probes_[i].done;
    }
    done(std::move(conflicts));
  }

 private:
  struct Probe_ {
    std::vector<ProbeLink> links;
    std::vector<IpAddress> addresses;
    ProbeDone done;
  };
  mutable vmnet::Mutex mu_;
  std::vector<Announcement> announced_;
  std::vector<Probe_> probes_;
};

class AnnounceTest : public ReconcilerTest {
 protected:
  void SetUp() override {
    ReconcilerTest::SetUp();
    options_.announcer = &announcer_;
  }
  bool HasProxy(const char* address) {
    for (const kernel::Neighbor& n : kernel_.State().neighbors) {
      if (n.proxy && n.address == Ip(address)) return true;
    }
    return false;
  }
  RecordingAnnouncer announcer_;
};

TEST_F(AnnounceTest, AttachAnnouncesTheAddressesOnUplinksAndTheGatewaysOnTheVmLink) {
  kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201", "2001:db8:1::201"}).ok());
  EXPECT_THAT(announcer_.announced(),
              ::testing::UnorderedElementsAre(
                  "eth0 198.51.100.201", "eth0 2001:db8:1::201", "vme1a 169.255.30.1",
                  "vme1a fe80::ffff:1:1 +router"));
  // The same spec again changes nothing and announces nothing.
  announcer_.Clear();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201", "2001:db8:1::201"}).ok());
  EXPECT_THAT(announcer_.announced(), ::testing::IsEmpty());
}

TEST_F(AnnounceTest, APendingVmIsAnnouncedWhenItsInterfaceAppearsAndAfterARestart) {
  StartAgent();
  auto vm = Attach("vm-1", "vme1a", {"198.51.100.201"});
  ASSERT_TRUE(vm.ok());
  EXPECT_EQ(vm->state, VmState::kPending);
  EXPECT_THAT(announcer_.announced(), ::testing::IsEmpty());
  kernel_.AddLink("vme1a");
  EXPECT_TRUE(WaitFor([&] {
    return ::testing::Matches(::testing::Contains("eth0 198.51.100.201"))(
        announcer_.announced());
  }));
  StopAgent();
  announcer_.Clear();
  StartAgent();
  EXPECT_THAT(announcer_.announced(), ::testing::Contains("eth0 198.51.100.201"));
}

TEST_F(AnnounceTest, DadConflictFailsTheVmNamingTheMacAndPublishesNothing) {
  options_.dad = true;
  kernel_.AddLink("vme1a");
  StartAgent();
  auto vm = Attach("vm-1", "vme1a", {"198.51.100.201"});
  ASSERT_TRUE(vm.ok());
  EXPECT_EQ(vm->state, VmState::kPending);
  EXPECT_THAT(vm->message, HasSubstr("--dad"));
  ASSERT_TRUE(WaitFor([&] { return announcer_.probes() == 1; }));
  EXPECT_THAT(announcer_.probed(0), ::testing::ElementsAre(Ip("198.51.100.201")));
  announcer_.Answer(
      0, {{Ip("198.51.100.201"), "eth0", *MacAddress::Parse("02:00:00:00:00:99")}});
  ASSERT_TRUE(
      WaitFor([&] { return reconciler_->FindVm("vm-1")->state == VmState::kFailed; }));
  EXPECT_THAT(
      reconciler_->FindVm("vm-1")->message,
      ::testing::AllOf(HasSubstr("198.51.100.201"), HasSubstr("02:00:00:00:00:99")));
  EXPECT_FALSE(HasProxy("198.51.100.201"));
  // Nothing published: no route either (a route would draw the LAN's
  // traffic for the other machine's address into the VM).
  EXPECT_EQ(FindRoute(kernel_.State(), "198.51.100.201"), nullptr);
  EXPECT_EQ(reconciler_->counters().dad_conflicts, 1u);
  EXPECT_THAT(announcer_.announced(), ::testing::IsEmpty());
  // Attaching again retries the check; this time nobody answers.
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}).ok());
  ASSERT_TRUE(WaitFor([&] { return announcer_.probes() == 2; }));
  announcer_.Answer(1, {});
  ASSERT_TRUE(WaitFor(
      [&] { return reconciler_->FindVm("vm-1")->state == VmState::kProgrammed; }));
  EXPECT_TRUE(HasProxy("198.51.100.201"));
  EXPECT_THAT(announcer_.announced(), ::testing::Contains("eth0 198.51.100.201"));
}

TEST_F(AnnounceTest, DadChecksOnlyNewAddressesAndNotAfterARestart) {
  options_.dad = true;
  kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}).ok());
  ASSERT_TRUE(WaitFor([&] { return announcer_.probes() == 1; }));
  announcer_.Answer(0, {});
  ASSERT_TRUE(WaitFor([&] { return HasProxy("198.51.100.201"); }));
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201", "198.51.100.202"}).ok());
  ASSERT_TRUE(WaitFor([&] { return announcer_.probes() == 2; }));
  EXPECT_THAT(announcer_.probed(1), ::testing::ElementsAre(Ip("198.51.100.202")));
  // The published address stays published while the new one is checked.
  EXPECT_TRUE(HasProxy("198.51.100.201"));
  EXPECT_FALSE(HasProxy("198.51.100.202"));
  announcer_.Answer(1, {});
  ASSERT_TRUE(WaitFor([&] { return HasProxy("198.51.100.202"); }));
  StopAgent();
  StartAgent();
  EXPECT_EQ(reconciler_->FindVm("vm-1")->state, VmState::kProgrammed);
  EXPECT_EQ(announcer_.probes(), 2u);
}

// README: an uplink back (down, then up: the kernel flushed its proxy
// entries) publishes and announces the VMs' addresses on it again.
TEST_F(AnnounceTest, AnUplinkThatComesBackIsAnnouncedOnAgain) {
  kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201", "2001:db8:1::201"}).ok());
  kernel_.SetLinkUp("eth0", false);
  ASSERT_TRUE(WaitFor([&] { return !HasProxy("198.51.100.201"); }));
  announcer_.Clear();
  kernel_.SetLinkUp("eth0", true);
  EXPECT_TRUE(WaitFor([&] {
    return HasProxy("198.51.100.201") && HasProxy("2001:db8:1::201") &&
           ::testing::Matches(::testing::IsSupersetOf(
               {"eth0 198.51.100.201", "eth0 2001:db8:1::201"}))(announcer_.announced());
  })) << ::testing::PrintToString(announcer_.announced());
}

// README: a --dad conflict "is not retried by itself": however much time
// passes (past every retry backoff and full resync), no second probe.
class DadClockTest : public AnnounceTest {
 protected:
  void SetUp() override {
    AnnounceTest::SetUp();
    options_.clock = &clock_;
    options_.dad = true;
  }
  void Sync() {
    ASSERT_TRUE(Detach("no-such-vm", /*allow_missing=*/true).ok());
    ASSERT_TRUE(Detach("no-such-vm", /*allow_missing=*/true).ok());
  }
  FakeClock clock_;
};

TEST_F(DadClockTest, AConflictIsNotRetriedByItself) {
  kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(Attach("vm-1", "vme1a", {"198.51.100.201"}).ok());
  ASSERT_TRUE(WaitFor([&] { return announcer_.probes() == 1; }));
  announcer_.Answer(
      0, {{Ip("198.51.100.201"), "eth0", *MacAddress::Parse("02:00:00:00:00:99")}});
  ASSERT_TRUE(WaitFor([&] { return StateOf("vm-1") == VmState::kFailed; }));
  for (int i = 0; i < 20; ++i) {
    clock_.Advance(std::chrono::minutes(30));  // 10 h: every backoff and resync
    Sync();
  }
  EXPECT_EQ(announcer_.probes(), 1u);
  EXPECT_EQ(StateOf("vm-1"), VmState::kFailed);
  EXPECT_FALSE(HasProxy("198.51.100.201"));
}

// README: a VM's permanent neighbour entry is repaired, IPv6 as IPv4.
TEST_F(ReconcilerTest, AnIpv6PermanentNeighbourEntryIsPutBack) {
  int vme = kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(
      Attach("vm-1", "vme1a", {"198.51.100.201", "2001:db8:1::201"}, "02:00:00:00:00:01")
          .ok());
  ASSERT_NE(FindNeighbor(kernel_.State(), vme, "2001:db8:1::201", false), nullptr);
  kernel_.DeleteNeighbor(vme, Ip("2001:db8:1::201"), false);
  EXPECT_TRUE(WaitFor([&] {
    kernel::Snapshot now = kernel_.State();  // the entry points into it
    const auto* n = FindNeighbor(now, vme, "2001:db8:1::201", false);
    return n != nullptr && n->lladdr && n->lladdr->ToString() == "02:00:00:00:00:01" &&
           (n->state & NUD_PERMANENT) && n->protocol == kProto;
  }));
}

// Packet-rate limits (bandwidth.egress_packets_per_second): a limit element
// per limited VM link, replaced in one write when the rate changes.
class PacketRateTest : public PortSecurityTest {
 protected:
  void SetUp() override {
    PortSecurityTest::SetUp();
    options_.rules.port_security = true;
  }
  absl::StatusOr<VmView> AttachLimited(uint64_t pps) {
    auto spec = ParseVmSpec("vm-1", "vme1a", {"198.51.100.201"}, "", options_.rules);
    if (!spec.ok()) return spec.status();
    spec->bandwidth.egress_packets_per_second = pps;
    std::promise<absl::StatusOr<VmView>> done;
    reconciler_->Attach(*spec, false, "",
                        [&](absl::StatusOr<VmView> v) { done.set_value(std::move(v)); });
    return done.get_future().get();
  }
  // The limits the fake kernel holds.
  std::vector<kernel::NftPacketRateLimit> Limits() {
    std::vector<kernel::NftPacketRateLimit> out;
    for (const auto& e : Elements()) {
      if (const auto* l = std::get_if<kernel::NftPacketRateLimit>(&e)) out.push_back(*l);
    }
    return out;
  }
};

TEST_F(PacketRateTest, ALimitIsInstalledReplacedAndRemoved) {
  kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(AttachLimited(200).ok());
  EXPECT_EQ(Limits(), (std::vector<kernel::NftPacketRateLimit>{{"vme1a", 200, 20}}));
  // A changed rate: one add that replaces the limit, no delete beside it
  // (which would remove the new one with the old, or leave the link
  // unlimited between two transactions).
  size_t logged = kernel_.port_security().write_log().size();
  ASSERT_TRUE(AttachLimited(1000).ok());
  EXPECT_EQ(Limits(), (std::vector<kernel::NftPacketRateLimit>{{"vme1a", 1000, 100}}));
  auto log = kernel_.port_security().write_log();
  EXPECT_EQ(std::vector<std::string>(log.begin() + logged, log.end()),
            std::vector<std::string>{
                "add packet-rate limit vme1a over 1000/second burst 100 packets"});
  ASSERT_TRUE(AttachLimited(0).ok());
  EXPECT_TRUE(Limits().empty());
  ASSERT_TRUE(AttachLimited(3).ok());
  EXPECT_EQ(Limits(), (std::vector<kernel::NftPacketRateLimit>{{"vme1a", 3, 5}}));
  ASSERT_TRUE(Detach("vm-1").ok());
  EXPECT_TRUE(Limits().empty());
  EXPECT_TRUE(Elements().empty());
}

TEST_F(PacketRateTest, ADeletedOrAlteredLimitIsRepaired) {
  kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(AttachLimited(200).ok());
  kernel_.port_security().RemoveElement(kernel::MakePacketRateLimit("vme1a", 200));
  EXPECT_TRUE(WaitFor([&] {
    return Limits() == std::vector<kernel::NftPacketRateLimit>{{"vme1a", 200, 20}};
  }));
  // Restarted with nothing drifted: no transaction.
  StopAgent();
  size_t transactions = kernel_.port_security().transactions();
  StartAgent();
  EXPECT_EQ(kernel_.port_security().transactions(), transactions);
}

TEST_F(PacketRateTest, AnUnknownLimitIsReplacedOrSwept) {
  kernel_.AddLink("vme1a");
  kernel_.AddLink("vme2a");
  StartAgent();
  ASSERT_TRUE(AttachLimited(200).ok());
  StopAgent();
  // What a dump reports for a half-present limit, or one vmnetd does not
  // write: rate 0. Here on the limited link and on an unlimited one.
  for (const char* link : {"vme1a", "vme2a"}) {
    ASSERT_TRUE(
        kernel_.port_security()
            .Apply({kernel::AddNftElement{kernel::NftPacketRateLimit{link, 0, 0}}})[0]
            .ok());
  }
  ASSERT_EQ(Limits().size(), 2u);
  size_t logged = kernel_.port_security().write_log().size();
  StartAgent();
  EXPECT_TRUE(WaitFor([&] {
    return Limits() == std::vector<kernel::NftPacketRateLimit>{{"vme1a", 200, 20}};
  }));
  // vme1a's unknown limit replaced (no delete of it), vme2a's swept.
  auto log = kernel_.port_security().write_log();
  EXPECT_THAT(std::vector<std::string>(log.begin() + logged, log.end()),
              ::testing::UnorderedElementsAre(
                  "add packet-rate limit vme1a over 200/second burst 20 packets",
                  "delete packet-rate limit vme2a (not as vmnetd writes it)"));
}

// A limit stored while port security was on, loaded by an agent with it off:
// the VM is FAILED, saying its limit does not hold; the rest of it is there.
TEST_F(PacketRateTest, AStoredLimitWithPortSecurityOffFailsTheVmVisibly) {
  kernel_.AddLink("vme1a");
  StartAgent();
  ASSERT_TRUE(AttachLimited(200).ok());
  StopAgent();
  options_.host.port_security.reset();
  options_.rules.port_security = false;
  StartAgent();
  ASSERT_TRUE(WaitFor([&] { return StateOf("vm-1") == VmState::kFailed; }));
  std::optional<VmView> vm = reconciler_->FindVm("vm-1");
  ASSERT_TRUE(vm.has_value());
  EXPECT_THAT(vm->message,
              HasSubstr("egress_packets_per_second (200/s) is not enforced"));
  EXPECT_NE(FindRoute(kernel_.State(), "198.51.100.201"), nullptr);
}

TEST_F(PacketRateTest, RefusedWithPortSecurityOff) {
  SpecRules rules;
  rules.port_security = false;
  auto b = ParseBandwidth(0, 0, 0, 200, rules);
  ASSERT_EQ(b.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(b.status().message()),
              ::testing::StartsWith("bandwidth.egress_packets_per_second: "));
  EXPECT_THAT(std::string(b.status().message()), HasSubstr("--port-security=false"));
  rules.port_security = true;
  b = ParseBandwidth(0, 0, 0, 200, rules);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->egress_packets_per_second, 200u);
  EXPECT_TRUE(b->limited());
  b = ParseBandwidth(0, 0, 0, kMaxPacketsPerSecond + 1, rules);
  EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(b.status().message()),
              ::testing::StartsWith("bandwidth.egress_packets_per_second: "));
  EXPECT_TRUE(ParseBandwidth(0, 0, 0, kMaxPacketsPerSecond, rules).ok());
  EXPECT_TRUE(ParseBandwidth(0, 0, 0, 1, rules).ok());
}

}  // namespace
}  // namespace vmnet
