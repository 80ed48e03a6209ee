// The gRPC servers of vmnetd and who may reach them:
//   local   unix sockets (mode 0660, optional group) and loopback addresses,
//           plaintext; callers are trusted like the host's administrator.
//   remote  any other address: TLS with client certificates required and
//           verified, rotated on disk without a restart, and callers
//           authorized by their certificate identity (a gRPC authorization
//           policy file, see authz.h). Plaintext only with --insecure.
//   probe   --health-listen: plaintext grpc.health.v1.Health only.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"
#include "vmnet/api/service.h"

namespace vmnet {

struct ListenerConfig {
  std::vector<std::string> addresses;            // host:port or unix:///path
  std::string health_address;                    // empty: no probe port
  std::string tls_cert, tls_key, tls_client_ca;  // all or none
  std::string authz_policy;                      // gRPC authorization policy JSON file
  bool insecure = false;                         // allow plaintext on remote addresses
  std::string socket_group;  // group of unix sockets; empty: unchanged
  int max_request_bytes = 1 << 20;
  int max_concurrent_streams = 100;   // per connection
  unsigned tls_refresh_seconds = 10;  // certificates and policy re-read
};

struct Listener {
  std::string address;
  bool local = false;  // unix socket or loopback
};

// Sorts addresses into local and remote, and refuses a remote one that would
// be plaintext without --insecure. INVALID_ARGUMENT naming the address.
absl::StatusOr<std::vector<Listener>> ClassifyListeners(const ListenerConfig& config);

class ApiServers {
 public:
  // Builds and starts the servers; each gets its own service instances.
  static absl::StatusOr<std::unique_ptr<ApiServers>> Start(
      const ListenerConfig& config, Reconciler* reconciler, kernel::Kernel* kernel,
      EventLog* events, RequestStats* stats, const ServiceOptions& options);
  ~ApiServers();

  // Health NOT_SERVING from now on.
  void SetDraining();
  // Stops accepting calls and waits for those in flight, up to `deadline`.
  void Shutdown(std::chrono::system_clock::time_point deadline);

 private:
  ApiServers() = default;
  std::unique_ptr<Authorizer> authorizer_;
  std::vector<std::unique_ptr<VmNetworkService>> services_;
  std::vector<std::unique_ptr<HealthService>> health_;
  std::vector<std::unique_ptr<grpc::Server>> servers_;
  std::vector<std::string> unix_paths_;
};

}  // namespace vmnet
