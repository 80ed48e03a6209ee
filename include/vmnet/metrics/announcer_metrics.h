// The announcer's counters (announce/announcer.h, Announcer::stats()), read
// at scrape time. Collect() may run on several threads at once.
//
// Exported:
//   vmnet_announcements_sent_total, vmnet_announce_send_errors_total
//   vmnet_dad_probes_sent_total, vmnet_dad_conflicts_total
#pragma once

#include <functional>
#include <vector>

#include "prometheus/collectable.h"
#include "prometheus/metric_family.h"
#include "vmnet/announce/announcer.h"

namespace vmnet {

class AnnouncerMetrics : public prometheus::Collectable {
 public:
  // `stats` is called at each scrape, on the scraping thread; what it reads
  // (vmnetd: the Announcer) must outlive the collector's registration.
  explicit AnnouncerMetrics(std::function<Announcer::Stats()> stats);

  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  const std::function<Announcer::Stats()> stats_;
};

}  // namespace vmnet
