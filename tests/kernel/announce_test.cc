// The announcer against the real kernel, in the test's own namespace (see
// netns_main.cc): a veth pair a/b, the announcer sending on a, b's kernel
// as the neighbour that must learn (its neighbour table, read with iproute2)
// and answer probes (as Linux answers ARP probes and DAD).
//
// Linux ignores an ARP update to an entry within `locktime` (1 s) of its
// last update, gratuitous ARP excepted on recent kernels; the test sets b's
// locktime to 0 in its namespace so the result does not hang on that.
#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <linux/capability.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstring>
#include <future>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "kernel_test.h"
#include "vmnet/announce/announcer.h"

namespace vmnet {
namespace {

// An upper bound on a duration of the code under test, for a sanitizer build
// ten times as much: its bounds tell a stuck timer from a working one, not
// speed.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr int kSlowdown = 10;
#else
constexpr int kSlowdown = 1;
#endif
absl::Duration Slack(absl::Duration bound) { return bound * kSlowdown; }

using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

IpAddress Ip(const char* s) { return *IpAddress::Parse(s); }

MacAddress MacOf(const std::string& link) {
  std::string text = Sh("cat /sys/class/net/" + link + "/address");
  return MacAddress::Parse(absl::StripTrailingAsciiWhitespace(text))
      .value_or(MacAddress());
}

// Runs `command` until its output contains `want` or about 3 s have gone.
std::string WaitFor(const std::string& command, const std::string& want) {
  std::string out;
  for (int i = 0; i < 60; ++i) {
    out = Sh(command);
    if (out.find(want) != std::string::npos) break;
    usleep(50'000);
  }
  return out;
}

class AnnouncerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!KernelTestsIsolated()) GTEST_SKIP() << KernelTestsSkipReason();
    Sh("ip link del dev a 2>/dev/null");
    ASSERT_EQ(
        Sh("ip link add name a type veth peer name b && ip link set dev a up && ip link "
           "set dev b up "
           "&& "
           "ip addr add 198.51.100.1/24 dev b && "
           "ip -6 addr add 2001:db8:1::1/64 dev b nodad && "
           "echo 0 > /proc/sys/net/ipv4/neigh/b/locktime && "
           "ip neigh replace 198.51.100.201 lladdr 02:00:00:00:00:99 nud stale dev b && "
           "ip -6 neigh replace 2001:db8:1::201 lladdr 02:00:00:00:00:99 nud stale "
           "dev b"),
        "");
    a_ = if_nametoindex("a");
    b_ = if_nametoindex("b");
    ASSERT_NE(a_, 0);
    ASSERT_NE(b_, 0);
    a_mac_ = MacOf("a");
    b_mac_ = MacOf("b");
    ASSERT_FALSE(a_mac_.IsZero());
    ASSERT_FALSE(b_mac_.IsZero());
  }

  void TearDown() override {
    if (KernelTestsIsolated()) Sh("ip link del dev a 2>/dev/null");
  }

  std::unique_ptr<Announcer> Make(int count, absl::Duration interval) {
    auto announcer = Announcer::Create({count, interval});
    EXPECT_TRUE(announcer.ok()) << announcer.status();
    return announcer.ok() ? std::move(*announcer) : nullptr;
  }

  Announcement On_a(const char* address) {
    Announcement a;
    a.ifindex = a_;
    a.interface = "a";
    a.mac = a_mac_;
    a.address = Ip(address);
    return a;
  }

  std::vector<Announcer::Conflict> ProbeAndWait(Announcer& announcer,
                                                std::vector<IpAddress> addresses,
                                                absl::Duration timeout) {
    auto promise = std::make_shared<std::promise<std::vector<Announcer::Conflict>>>();
    auto future = promise->get_future();
    announcer.ProbeAddresses({{a_, "a", a_mac_}}, std::move(addresses), timeout,
                             [promise](std::vector<Announcer::Conflict> c) {
                               promise->set_value(std::move(c));
                             });
    if (future.wait_for(std::chrono::seconds(5)) != std::future_status::ready) {
      ADD_FAILURE() << "done was not called";
      return {};
    }
    return future.get();
  }

  int a_ = 0, b_ = 0;
  MacAddress a_mac_, b_mac_;
};

TEST_F(AnnouncerTest, NeighboursLearnTheAnnouncedMac) {
  auto announcer = Make(1, absl::Seconds(1));
  ASSERT_TRUE(announcer);
  Announcement v6 = On_a("2001:db8:1::201");
  v6.source = Ip("fe80::1");
  v6.router = true;
  announcer->Announce({On_a("198.51.100.201"), v6});

  std::string want = "lladdr " + a_mac_.ToString();
  EXPECT_THAT(WaitFor("ip -4 neigh show 198.51.100.201 dev b", want),
              HasSubstr("198.51.100.201 " + want));
  std::string v6_entry = WaitFor("ip -6 neigh show 2001:db8:1::201 dev b", want);
  EXPECT_THAT(v6_entry, HasSubstr("2001:db8:1::201 " + want + " router"));
  EXPECT_EQ(announcer->stats().announcements_sent, 2u);
  EXPECT_EQ(announcer->stats().send_errors, 0u);
}

TEST_F(AnnouncerTest, NeighborAdvertisementWithoutSourceUsesTheTarget) {
  auto announcer = Make(1, absl::Seconds(1));
  ASSERT_TRUE(announcer);
  announcer->Announce({On_a("2001:db8:1::201")});
  std::string want = "lladdr " + a_mac_.ToString();
  std::string entry = WaitFor("ip -6 neigh show 2001:db8:1::201 dev b", want);
  EXPECT_THAT(entry, HasSubstr(want));
  EXPECT_THAT(entry, Not(HasSubstr("router")));
}

// An AF_PACKET socket on b that sees every ARP frame arriving from a.
class ArpCapture {
 public:
  explicit ArpCapture(int ifindex) {
    fd_ = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_ARP));
    sockaddr_ll address = {};
    address.sll_family = AF_PACKET;
    address.sll_protocol = htons(ETH_P_ARP);
    address.sll_ifindex = ifindex;
    if (fd_ >= 0) bind(fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address));
  }
  ~ArpCapture() {
    if (fd_ >= 0) close(fd_);
  }
  bool ok() const { return fd_ >= 0; }

  // The arrival times of the gratuitous ARPs from `mac` for `address` seen
  // within `window`, or up to the `stop_after`th of them.
  std::vector<absl::Time> Garps(const MacAddress& mac, const IpAddress& address,
                                absl::Duration window, size_t stop_after = SIZE_MAX) {
    std::vector<absl::Time> times;
    absl::Time end = absl::Now() + window;
    for (absl::Time now = absl::Now(); now < end && times.size() < stop_after;
         now = absl::Now()) {
      pollfd p = {fd_, POLLIN, 0};
      if (poll(&p, 1, static_cast<int>(absl::ToInt64Milliseconds(end - now)) + 1) <= 0) {
        continue;
      }
      uint8_t f[128];
      ssize_t n = recv(fd_, f, sizeof(f), MSG_DONTWAIT);
      if (n >= 42 && std::memcmp(f + 6, mac.bytes(), 6) == 0 &&
          std::memcmp(f + 28, address.bytes(), 4) == 0 &&
          std::memcmp(f + 38, address.bytes(), 4) == 0) {
        times.push_back(absl::Now());
      }
    }
    return times;
  }

 private:
  int fd_ = -1;
};

TEST_F(AnnouncerTest, SendsCountFramesEveryInterval) {
  ArpCapture capture(b_);
  ASSERT_TRUE(capture.ok()) << std::strerror(errno);
  auto announcer = Make(3, absl::Milliseconds(100));
  ASSERT_TRUE(announcer);
  announcer->Announce({On_a("198.51.100.203")});
  std::vector<absl::Time> times =
      capture.Garps(a_mac_, Ip("198.51.100.203"), absl::Seconds(1));
  ASSERT_EQ(times.size(), 3u);
  for (size_t i = 1; i < times.size(); ++i) {
    EXPECT_GE(times[i] - times[i - 1], absl::Milliseconds(80)) << i;
    EXPECT_LE(times[i] - times[i - 1], Slack(absl::Milliseconds(400))) << i;
  }
  EXPECT_EQ(announcer->stats().announcements_sent, 3u);
}

TEST_F(AnnouncerTest, ANewerAnnouncementRestartsTheCount) {
  ArpCapture capture(b_);
  ASSERT_TRUE(capture.ok());
  auto announcer = Make(2, absl::Milliseconds(300));
  ASSERT_TRUE(announcer);
  announcer->Announce({On_a("198.51.100.204")});
  // After the first frame (seen on the wire, not guessed with a sleep), before
  // the second (300 ms later):
  ASSERT_EQ(capture.Garps(a_mac_, Ip("198.51.100.204"), absl::Seconds(5), 1).size(), 1u);
  announcer->Announce({On_a("198.51.100.204")});
  // The count restarts: now and 300 ms later. Not the first series' second
  // frame as well.
  std::vector<absl::Time> times =
      capture.Garps(a_mac_, Ip("198.51.100.204"), absl::Milliseconds(1200));
  EXPECT_EQ(times.size(), 2u);
}

TEST_F(AnnouncerTest, SendErrorsAreCountedNotFatal) {
  auto announcer = Make(1, absl::Seconds(1));
  ASSERT_TRUE(announcer);
  Announcement gone = On_a("198.51.100.205");
  gone.ifindex = 999999;
  Announcement down = On_a("198.51.100.206");
  ASSERT_EQ(Sh("ip link set dev a down"), "");
  announcer->Announce({gone, down});
  for (int i = 0; i < 100 && announcer->stats().send_errors < 2; ++i) usleep(10'000);
  EXPECT_EQ(announcer->stats().send_errors, 2u);
  EXPECT_EQ(announcer->stats().announcements_sent, 0u);
  // And it still works afterwards. (b's carrier went down with a, which
  // flushed its neighbour entries.)
  ASSERT_EQ(
      Sh("ip link set dev a up && "
         "ip neigh replace 198.51.100.201 lladdr 02:00:00:00:00:99 nud stale dev b"),
      "");
  announcer->Announce({On_a("198.51.100.201")});
  EXPECT_THAT(WaitFor("ip -4 neigh show 198.51.100.201 dev b", a_mac_.ToString()),
              HasSubstr(a_mac_.ToString()));
}

TEST_F(AnnouncerTest, ProbesFindTheAddressesOfANeighbour) {
  auto announcer = Make(1, absl::Seconds(1));
  ASSERT_TRUE(announcer);
  absl::Time start = absl::Now();
  auto conflicts = ProbeAndWait(
      *announcer, {Ip("198.51.100.1"), Ip("2001:db8:1::1"), Ip("198.51.100.202")},
      absl::Milliseconds(600));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(590)) << "listens until the timeout";
  ASSERT_EQ(conflicts.size(), 2u);
  std::sort(conflicts.begin(), conflicts.end(),
            [](const auto& x, const auto& y) { return x.address < y.address; });
  EXPECT_EQ(conflicts[0].address, Ip("198.51.100.1"));
  EXPECT_EQ(conflicts[1].address, Ip("2001:db8:1::1"));
  for (const auto& c : conflicts) {
    EXPECT_EQ(c.ifindex, a_);
    EXPECT_EQ(c.interface, "a");
    EXPECT_EQ(c.answered_by, b_mac_) << c.address.ToString();
  }
  Announcer::Stats stats = announcer->stats();
  EXPECT_EQ(stats.probes_sent, 6u) << "three addresses, twice";
  EXPECT_EQ(stats.conflicts, 2u);
}

TEST_F(AnnouncerTest, ProbesOfFreeAddressesFindNothing) {
  auto announcer = Make(1, absl::Seconds(1));
  ASSERT_TRUE(announcer);
  EXPECT_THAT(ProbeAndWait(*announcer, {Ip("198.51.100.202"), Ip("2001:db8:1::202")},
                           absl::Milliseconds(400)),
              IsEmpty());
  EXPECT_EQ(announcer->stats().probes_sent, 4u);
  // Probing again after the first run ended works the same.
  EXPECT_EQ(
      ProbeAndWait(*announcer, {Ip("198.51.100.1")}, absl::Milliseconds(300)).size(), 1u);
}

TEST_F(AnnouncerTest, DestroyedWhileProbingStopsPromptly) {
  auto announcer = Make(3, absl::Seconds(10));
  ASSERT_TRUE(announcer);
  bool called = false;
  announcer->Announce({On_a("198.51.100.201")});
  announcer->ProbeAddresses({{a_, "a", a_mac_}}, {Ip("198.51.100.1")}, absl::Seconds(30),
                            [&](std::vector<Announcer::Conflict>) { called = true; });
  usleep(50'000);
  absl::Time start = absl::Now();
  announcer.reset();
  // Far below the 10 s interval and the 30 s probe it must not wait for.
  EXPECT_LT(absl::Now() - start, Slack(absl::Milliseconds(500)));
  EXPECT_FALSE(called);
}

TEST(AnnouncerCreateTest, RefusesBadOptions) {
  EXPECT_EQ(Announcer::Create({0, absl::Seconds(1)}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Announcer::Create({1, absl::ZeroDuration()}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Without CAP_NET_RAW (dropped in a child), Create names the capability.
TEST(AnnouncerCreateTest, WithoutCapNetRawSaysSo) {
  if (!KernelTestsIsolated()) GTEST_SKIP() << KernelTestsSkipReason();
  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct data[2] = {};
    if (syscall(SYS_capget, &header, data) != 0) _exit(10);
    data[CAP_NET_RAW / 32].effective &= ~(1u << (CAP_NET_RAW % 32));
    if (syscall(SYS_capset, &header, data) != 0) _exit(11);
    auto announcer = Announcer::Create({});
    if (announcer.ok()) _exit(12);
    if (announcer.status().code() != absl::StatusCode::kPermissionDenied) _exit(13);
    if (announcer.status().message().find("CAP_NET_RAW") == absl::string_view::npos) {
      _exit(14);
    }
    _exit(0);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0)
      << "10/11: capget/capset failed, 12: Create succeeded, 13: wrong code, 14: message";
}

}  // namespace
}  // namespace vmnet
