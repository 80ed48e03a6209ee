#include "vmnet/metrics/announcer_metrics.h"

#include <string>
#include <utility>

#include "prometheus/client_metric.h"
#include "prometheus/metric_type.h"

namespace vmnet {

AnnouncerMetrics::AnnouncerMetrics(std::function<Announcer::Stats()> stats)
    : stats_(std::move(stats)) {}

std::vector<prometheus::MetricFamily> AnnouncerMetrics::Collect() const {
  Announcer::Stats stats = stats_();
  auto counter = [](std::string name, std::string help, uint64_t value) {
    prometheus::MetricFamily f{
        std::move(name), std::move(help), prometheus::MetricType::Counter, {}};
    prometheus::ClientMetric m;
    m.counter.value = static_cast<double>(value);
    f.metric.push_back(std::move(m));
    return f;
  };
  return {
      counter("vmnet_announcements_sent_total",
              "Gratuitous ARP and unsolicited neighbour advertisement frames sent.",
              stats.announcements_sent),
      counter("vmnet_announce_send_errors_total",
              "Announcement and probe frames the kernel refused (a link gone or down).",
              stats.send_errors),
      counter("vmnet_dad_probes_sent_total",
              "ARP probe and duplicate-address-detection frames sent (--dad).",
              stats.probes_sent),
      counter("vmnet_dad_conflicts_total",
              "VM addresses another machine answered for (--dad).", stats.conflicts),
  };
}

}  // namespace vmnet
