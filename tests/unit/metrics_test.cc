#include "vmnet/metrics/metrics.h"

#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <future>
#include <thread>

#include "fake_kernel.h"
#include "prometheus/text_serializer.h"
#include "vmnet/metrics/announcer_metrics.h"

namespace vmnet {
namespace {

using testing::FakeKernel;

class MetricsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vmnet-metrics-test.XXXXXX";
    dir_ = mkdtemp(tmpl);
    kernel_.AddLink("eth0", true);
    kernel_.AddLink("vme1a");
    options_.host.uplinks = {"eth0"};
    store_.emplace(std::move(*StateStore::Open(dir_)));
    reconciler_ = std::make_unique<Reconciler>(&kernel_, &*store_, &events_, options_);
    ASSERT_TRUE(reconciler_->Start().ok());
    collector_ = std::make_unique<MetricsCollector>(reconciler_.get(), &kernel_, &events_,
                                                    &requests_, "test");
  }
  void TearDown() override {
    reconciler_.reset();
    std::filesystem::remove_all(dir_);
  }

  void Attach(const std::string& vm, const std::string& interface,
              const std::string& ip) {
    std::promise<absl::StatusOr<VmView>> done;
    reconciler_->Attach(*ParseVmSpec(vm, interface, {ip}, "", options_.rules), false, "",
                        [&](absl::StatusOr<VmView> v) { done.set_value(std::move(v)); });
    ASSERT_TRUE(done.get_future().get().ok());
  }
  void Detach(const std::string& vm) {
    std::promise<absl::Status> done;
    reconciler_->Detach(vm, false, "", [&](absl::Status s) { done.set_value(s); });
    ASSERT_TRUE(done.get_future().get().ok());
  }

  // The value of the series with these labels, or -1 when it is absent.
  double Value(const std::string& family,
               const std::map<std::string, std::string>& labels) {
    for (const auto& f : collector_->Collect()) {
      if (f.name != family) continue;
      for (const auto& m : f.metric) {
        bool match = true;
        for (const auto& [k, v] : labels) {
          bool found = false;
          for (const auto& l : m.label) found |= l.name == k && l.value == v;
          match &= found;
        }
        if (match)
          return f.type == prometheus::MetricType::Counter ? m.counter.value
                                                           : m.gauge.value;
      }
    }
    return -1;
  }

  std::string dir_;
  FakeKernel kernel_;
  ReconcilerOptions options_;
  std::optional<StateStore> store_;
  EventLog events_{"test", 100};
  RequestStats requests_;
  std::unique_ptr<Reconciler> reconciler_;
  std::unique_ptr<MetricsCollector> collector_;
};

TEST_F(MetricsTest, CountersAreTheLinkStatisticsFromTheVmsPointOfView) {
  Attach("vm-1", "vme1a", "198.51.100.201");
  kernel::LinkStats s;
  s.rx_bytes = 1000;  // the host link received: the VM transmitted
  s.tx_bytes = 5000;  // the host link transmitted: the VM received
  s.rx_packets = 10;
  s.tx_packets = 50;
  s.rx_dropped = 3;
  s.tx_errors = 2;
  kernel_.SetStats("vme1a", s);
  std::map<std::string, std::string> vm = {{"vm_id", "vm-1"}, {"interface", "vme1a"}};
  EXPECT_EQ(Value("vmnet_vm_receive_bytes_total", vm), 5000);
  EXPECT_EQ(Value("vmnet_vm_transmit_bytes_total", vm), 1000);
  EXPECT_EQ(Value("vmnet_vm_receive_packets_total", vm), 50);
  EXPECT_EQ(Value("vmnet_vm_transmit_packets_total", vm), 10);
  EXPECT_EQ(Value("vmnet_vm_transmit_dropped_total", vm), 3);
  EXPECT_EQ(Value("vmnet_vm_receive_errors_total", vm), 2);
  EXPECT_EQ(Value("vmnet_vm_info", vm), 1);
  EXPECT_EQ(Value("vmnet_vm_state", {{"vm_id", "vm-1"}, {"state", "programmed"}}), 1);
  EXPECT_EQ(Value("vmnet_vm_state", {{"vm_id", "vm-1"}, {"state", "pending"}}), 0);
  EXPECT_EQ(Value("vmnet_vms", {{"state", "programmed"}}), 1);
  EXPECT_GT(Value("vmnet_kernel_writes_total", {{"object", "route"}, {"result", "ok"}}),
            0);
}

TEST_F(MetricsTest, DetachedVmSeriesDisappear) {
  Attach("vm-1", "vme1a", "198.51.100.201");
  EXPECT_GE(Value("vmnet_vm_receive_bytes_total", {{"vm_id", "vm-1"}}), 0);
  Detach("vm-1");
  EXPECT_EQ(Value("vmnet_vm_receive_bytes_total", {{"vm_id", "vm-1"}}), -1);
  EXPECT_EQ(Value("vmnet_vm_info", {{"vm_id", "vm-1"}}), -1);
}

TEST_F(MetricsTest, PendingVmHasStateButNoTrafficSeries) {
  Attach("vm-2", "vme2b", "198.51.100.202");
  EXPECT_EQ(Value("vmnet_vm_receive_bytes_total", {{"vm_id", "vm-2"}}), -1);
  EXPECT_EQ(Value("vmnet_vm_state", {{"vm_id", "vm-2"}, {"state", "pending"}}), 1);
}

TEST_F(MetricsTest, TextExpositionHasHelpAndNoTimestamps) {
  Attach("vm-1", "vme1a", "198.51.100.201");
  requests_.Record("AttachVm", 0);
  std::string text = prometheus::TextSerializer().Serialize(collector_->Collect());
  EXPECT_NE(text.find("# HELP vmnet_vm_receive_bytes_total Bytes the VM received"),
            std::string::npos);
  EXPECT_NE(text.find("vmnet_grpc_requests_total{method=\"AttachVm\",code=\"OK\"} 1"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("vmnet_reconcile_duration_seconds_bucket{le=\"+Inf\"}"),
            std::string::npos);
  // A sample line is "name{labels} value" with no third (timestamp) field.
  EXPECT_EQ(text.find("} 1 "), std::string::npos);
}

// vmnet_drift_repairs_total{object}: each repair counts once, under the kind
// of the object that was put back, and nowhere else.
TEST_F(MetricsTest, DriftRepairsAreCountedByObjectKind) {
  Attach("vm-1", "vme1a", "198.51.100.201");
  for (const char* object : {"route", "proxy_neighbor", "address", "link"}) {
    EXPECT_EQ(Value("vmnet_drift_repairs_total", {{"object", object}}), 0) << object;
  }
  kernel_.DeleteRoute(IpPrefix::Host(*IpAddress::Parse("198.51.100.201")));
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (Value("vmnet_drift_repairs_total", {{"object", "route"}}) < 1 &&
         std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  EXPECT_EQ(Value("vmnet_drift_repairs_total", {{"object", "route"}}), 1);
  for (const char* object : {"proxy_neighbor", "address", "link", "neighbor"}) {
    EXPECT_EQ(Value("vmnet_drift_repairs_total", {{"object", object}}), 0) << object;
  }
  EXPECT_EQ(Value("vmnet_kernel_writes_total", {{"object", "route"}, {"result", "ok"}}),
            2)
      << "the route written at attach and once more for the repair";
}

TEST(AnnouncerMetricsTest, ReadsTheAnnouncerCountersAtEachScrape) {
  Announcer::Stats stats;
  AnnouncerMetrics metrics([&stats] { return stats; });
  stats.announcements_sent = 6;
  stats.send_errors = 1;
  stats.probes_sent = 4;
  stats.conflicts = 2;
  std::string text = prometheus::TextSerializer().Serialize(metrics.Collect());
  for (const char* line : {
           "# HELP vmnet_announcements_sent_total Gratuitous ARP and unsolicited "
           "neighbour advertisement frames sent.",
           "# TYPE vmnet_announcements_sent_total counter",
           "vmnet_announcements_sent_total 6",
           "# HELP vmnet_announce_send_errors_total Announcement and probe frames the "
           "kernel refused (a link gone or down).",
           "vmnet_announce_send_errors_total 1",
           "# HELP vmnet_dad_probes_sent_total ARP probe and duplicate-address-detection "
           "frames sent (--dad).",
           "vmnet_dad_probes_sent_total 4",
           "# HELP vmnet_dad_conflicts_total VM addresses another machine answered for "
           "(--dad).",
           "vmnet_dad_conflicts_total 2",
       }) {
    EXPECT_NE(text.find(std::string(line) + "\n"), std::string::npos) << line << "\n"
                                                                      << text;
  }
}

}  // namespace
}  // namespace vmnet
