// The gRPC face of vmnetd: vmnet.v1.VmNetwork and grpc.health.v1.Health.
// Handlers are translators: they validate the request, convert it to domain
// values, call the reconciler or read the kernel, and convert back. No
// business rules and no kernel writes live here.
#pragma once

#include <atomic>
#include <memory>

#include "grpc/health/v1/health.grpc.pb.h"
#include "vmnet/api/authz.h"
#include "vmnet/events/event_log.h"
#include "vmnet/kernel/kernel.h"
#include "vmnet/metrics/metrics.h"
#include "vmnet/net/defaults.h"
#include "vmnet/reconciler/reconciler.h"
#include "vmnet/state/vm_spec.h"
#include "vmnet/v1/vmnet.grpc.pb.h"

namespace vmnet {

struct ServiceOptions {
  SpecRules rules;
  uint8_t route_protocol = kDefaultRouteProtocol;
  // Each Watch stream's queue: a watcher further behind is cut off with
  // RESOURCE_EXHAUSTED.
  size_t watch_queue = 4096;
  size_t max_watchers = 1024;
  // When set, every call must be allowed by it (TLS listeners).
  Authorizer* authorizer = nullptr;
};

// absl::Status to grpc::Status: the one place codes are mapped.
grpc::Status ToGrpc(const absl::Status& status);

// VmNetwork::CallbackService with Watch served raw: each message is the
// bytes the event log serialized once for every watcher, several events
// concatenated into one WatchResponse (the wire format is the same). Spelled out rather
// than WithRawCallbackMethod_Watch on top of CallbackService, which would hide its
// callback Watch (-Woverloaded-virtual). A new RPC needs its WithCallbackMethod_ here.
// Every method raw (grpc::ByteBuffer in and out), parsed by the service: see
// VmNetworkService::Serve.
using VmNetworkCallbackService = v1::VmNetwork::WithRawCallbackMethod_AttachVm<
    v1::VmNetwork::WithRawCallbackMethod_DetachVm<
        v1::VmNetwork::WithRawCallbackMethod_GetVm<
            v1::VmNetwork::WithRawCallbackMethod_ListVms<
                v1::VmNetwork::WithRawCallbackMethod_ListArp<
                    v1::VmNetwork::WithRawCallbackMethod_ListRoutes<
                        v1::VmNetwork::WithRawCallbackMethod_Watch<
                            v1::VmNetwork::Service>>>>>>>;

// One unary call: a reactor that owns the typed request and response and
// serialises the response into the raw one when it finishes OK.
class UnaryCall : public grpc::ServerUnaryReactor {
 public:
  void Complete(const grpc::Status& status);
  void OnDone() override { delete this; }

 private:
  virtual bool SerializeResponse() = 0;
};

class VmNetworkService final : public VmNetworkCallbackService {
 public:
  // A listing's entries (ArpEntry, RouteEntry or Vm messages, serialized),
  // each with its sort key.
  using KeyedEntries = std::vector<std::pair<std::string, std::string>>;

  // `reconciler`, `kernel` (read only: dumps), `events` and `stats` (may be
  // null) must outlive the service.
  VmNetworkService(Reconciler* reconciler, kernel::Kernel* kernel, EventLog* events,
                   RequestStats* stats, ServiceOptions options);
  ~VmNetworkService() override;

  // Each a vmnet.v1.<Name>Request in, a vmnet.v1.<Name>Response out.
  grpc::ServerUnaryReactor* AttachVm(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* DetachVm(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* GetVm(grpc::CallbackServerContext* context,
                                  const grpc::ByteBuffer* request,
                                  grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* ListVms(grpc::CallbackServerContext* context,
                                    const grpc::ByteBuffer* request,
                                    grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* ListArp(grpc::CallbackServerContext* context,
                                    const grpc::ByteBuffer* request,
                                    grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* ListRoutes(grpc::CallbackServerContext* context,
                                       const grpc::ByteBuffer* request,
                                       grpc::ByteBuffer* response) override;
  // A vmnet.v1.WatchRequest in, a stream of vmnet.v1.WatchResponse out.
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Watch(
      grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) override;

  size_t active_watchers() const { return events_->watcher_count(); }

 private:
  // OK when no authorizer is configured or it allows the caller.
  grpc::Status Authorize(const grpc::CallbackServerContext& context,
                         const char* method) const;
  // Finishes a unary call and counts it.
  void Finish(UnaryCall* call, const char* method, const grpc::Status& status) const;
  void Reply(UnaryCall* call, const char* method, const grpc::Status& status) const;

  // Authorizes the call, parses its request (INVALID_ARGUMENT when it does
  // not parse), then runs `serve`, which finishes `call`.
  template <class Request, class Response>
  grpc::ServerUnaryReactor* Serve(
      const char* method, grpc::CallbackServerContext* context,
      const grpc::ByteBuffer* in, grpc::ByteBuffer* out,
      void (VmNetworkService::*serve)(UnaryCall*, const Request*, Response*));
  void ServeAttachVm(UnaryCall* call, const v1::AttachVmRequest* request,
                     v1::AttachVmResponse* response);
  void ServeDetachVm(UnaryCall* call, const v1::DetachVmRequest* request,
                     v1::DetachVmResponse* response);
  void ServeGetVm(UnaryCall* call, const v1::GetVmRequest* request,
                  v1::GetVmResponse* response);
  void ServeListVms(UnaryCall* call, const v1::ListVmsRequest* request,
                    v1::ListVmsResponse* response);
  void ServeListArp(UnaryCall* call, const v1::ListArpRequest* request,
                    v1::ListArpResponse* response);
  void ServeListRoutes(UnaryCall* call, const v1::ListRoutesRequest* request,
                       v1::ListRoutesResponse* response);

  // The kernel's tables as list entries, keyed by their sort keys, filtered
  // by the request.
  absl::StatusOr<KeyedEntries> ReadArp(const v1::ListArpRequest& request) const;
  absl::StatusOr<KeyedEntries> ReadRoutes(const v1::ListRoutesRequest& request) const;

  struct ListCaches;  // snapshots of listings being paged through

  Reconciler* const reconciler_;
  kernel::Kernel* const kernel_;
  EventLog* const events_;
  RequestStats* const stats_;
  const ServiceOptions options_;
  std::unique_ptr<ListCaches> caches_;
};

// grpc.health.v1.Health built from grpc-proto's health.proto, so that
// reflection can describe it to grpcurl. The overall service ("") and
// "vmnet.v1.VmNetwork" report SERVING once the first full sync is done and
// NOT_SERVING before it and while draining.
class HealthService final : public grpc::health::v1::Health::CallbackService {
 public:
  explicit HealthService(const Reconciler* reconciler) : reconciler_(reconciler) {}
  void SetDraining() { draining_ = true; }

  grpc::ServerUnaryReactor* Check(
      grpc::CallbackServerContext* context,
      const grpc::health::v1::HealthCheckRequest* request,
      grpc::health::v1::HealthCheckResponse* response) override;

 private:
  const Reconciler* const reconciler_;
  std::atomic<bool> draining_{false};
};

}  // namespace vmnet
