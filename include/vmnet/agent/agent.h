// The vmnetd agent: owns every module and starts and stops them in a stated
// order. main() parses the flags, builds an AgentConfig, calls Start, waits
// for a signal and calls Stop.
//
// Start, in this order (the first failure stops what was started and is
// returned):
//   1. the kernel (NetlinkKernel: subscribing to kernel events comes first,
//      so nothing between the first dump and the event stream is lost), and
//      the uplinks from the default routes when none were configured;
//   2. the announcer (when announcements or --dad need it);
//   3. the desired state (StateStore, which takes its lock), the event log
//      and the reconciler (constructed, not yet started);
//   4. the gRPC servers ("event=listening"): until the first sync, health
//      says NOT_SERVING and mutations answer UNAVAILABLE;
//   5. the /metrics endpoint (--metrics-listen) and the memory trimmer;
//   6. the reconciler: the first full sync with the kernel, then its thread
//      ("event=synced").
//
// Stop, in this order (also from the destructor; after a failed Start it
// stops only what was started):
//   1. health NOT_SERVING (load balancers and probes look elsewhere);
//   2. close the Watch streams, so that in-flight Watch calls end;
//   3. stop accepting RPCs and finish those in flight (10 s at most);
//   4. stop the /metrics endpoint (no scrape reads a module going away);
//   5. stop the reconciler's thread (requests still queued answer
//      UNAVAILABLE): from here on nothing calls the announcer;
//   6. stop the announcer, before the reconciler it calls back goes away
//      (no probe answer arrives after this);
//   7. stop the memory trimmer, then release the reconciler, the event log,
//      the state store (its lock) and the kernel sockets.
// The kernel state is left in place, so VMs keep their network while the
// agent is down.
//
// Thread safety: Start and Stop are called from one thread (main's). The
// caller blocks SIGTERM and SIGINT before Start, so that no thread the agent
// starts receives them.
#pragma once

#include <memory>

#include "absl/status/status.h"
#include "vmnet/agent/agent_config.h"

namespace vmnet {

class Announcer;
class MetricsServer;
class ApiServers;
class EventLog;
class MemoryTrimmer;
class MetricsCollector;
class AnnouncerMetrics;
class Reconciler;
class RequestStats;
class StateStore;
namespace kernel {
class NetlinkKernel;
}

class Agent {
 public:
  explicit Agent(AgentConfig config);
  ~Agent();
  Agent(const Agent&) = delete;
  Agent& operator=(const Agent&) = delete;

  // Starts the modules (see above). Errors are the failing module's,
  // ready for "event=start_failed"; INVALID_ARGUMENT when no uplink was
  // given and no default route names an interface.
  absl::Status Start();
  // Stops the modules (see above). Idempotent.
  void Stop();

 private:
  AgentConfig config_;
  std::unique_ptr<kernel::NetlinkKernel> kernel_;
  std::unique_ptr<Announcer> announcer_;
  std::unique_ptr<StateStore> store_;
  std::unique_ptr<EventLog> events_;
  std::unique_ptr<Reconciler> reconciler_;
  std::unique_ptr<RequestStats> request_stats_;
  std::unique_ptr<ApiServers> servers_;
  std::shared_ptr<MetricsCollector> collector_;
  std::shared_ptr<AnnouncerMetrics> announcer_metrics_;
  std::unique_ptr<MetricsServer> metrics_server_;
  std::unique_ptr<MemoryTrimmer> trimmer_;
};

}  // namespace vmnet
