#include "vmnet/api/servers.h"

#include <grp.h>
#include <sys/stat.h>
#include <unistd.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/security/tls_certificate_provider.h"
#include "grpcpp/security/tls_credentials_options.h"
#include "vmnet/log/log.h"
#include "vmnet/net/address.h"

namespace vmnet {
namespace {

constexpr absl::string_view kUnix = "unix://";

// The host part of "host:port", "[v6]:port"; empty when there is none.
std::string HostOf(absl::string_view address) {
  if (absl::StartsWith(address, "[")) {
    size_t end = address.find(']');
    return end == absl::string_view::npos ? "" : std::string(address.substr(1, end - 1));
  }
  size_t colon = address.rfind(':');
  return colon == absl::string_view::npos ? "" : std::string(address.substr(0, colon));
}

bool IsLoopback(const std::string& host) {
  if (host == "localhost") return true;
  auto ip = IpAddress::Parse(host);
  return ip && ip->IsLoopback();
}

}  // namespace

absl::StatusOr<std::vector<Listener>> ClassifyListeners(const ListenerConfig& config) {
  bool tls = !config.tls_cert.empty() || !config.tls_key.empty() ||
             !config.tls_client_ca.empty();
  if (tls && (config.tls_cert.empty() || config.tls_key.empty() ||
              config.tls_client_ca.empty())) {
    return absl::InvalidArgumentError(
        "--tls-cert, --tls-key and --tls-client-ca go together: give all three");
  }
  if (config.addresses.empty()) {
    return absl::InvalidArgumentError("--listen: give at least one address");
  }
  std::vector<Listener> out;
  for (const std::string& address : config.addresses) {
    Listener l{address, false};
    if (absl::StartsWith(address, kUnix)) {
      if (address.size() == kUnix.size() || address[kUnix.size()] != '/') {
        return absl::InvalidArgumentError(
            absl::StrCat("--listen: \"", address, "\" is not unix:///absolute/path"));
      }
      l.local = true;
    } else {
      std::string host = HostOf(address);
      if (host.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("--listen: \"", address, "\" is not host:port or unix:///path"));
      }
      l.local = IsLoopback(host);
      if (!l.local && !tls && !config.insecure) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--listen: \"", address,
            "\" is not a loopback address: serve it with --tls-cert, --tls-key and "
            "--tls-client-ca (clients must present certificates), or give --insecure"));
      }
    }
    out.push_back(l);
  }
  if (!config.authz_policy.empty() && !tls) {
    return absl::InvalidArgumentError(
        "--authz-policy applies to TLS callers: give --tls-cert, --tls-key and "
        "--tls-client-ca too");
  }
  return out;
}

absl::StatusOr<std::unique_ptr<ApiServers>> ApiServers::Start(
    const ListenerConfig& config, Reconciler* reconciler, kernel::Kernel* kernel,
    EventLog* events, RequestStats* stats, const ServiceOptions& options) {
  auto listeners = ClassifyListeners(config);
  if (!listeners.ok()) return listeners.status();
  std::unique_ptr<ApiServers> servers(new ApiServers());

  auto configure = [&](grpc::ServerBuilder& builder, Authorizer* authorizer) {
    builder.SetMaxReceiveMessageSize(config.max_request_bytes);
    builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS,
                               config.max_concurrent_streams);
    ServiceOptions with_authz = options;
    with_authz.authorizer = authorizer;
    auto& service = servers->services_.emplace_back(std::make_unique<VmNetworkService>(
        reconciler, kernel, events, stats, with_authz));
    auto& health =
        servers->health_.emplace_back(std::make_unique<HealthService>(reconciler));
    builder.RegisterService(service.get());
    builder.RegisterService(health.get());
  };
  auto start = [&](grpc::ServerBuilder& builder,
                   const std::string& what) -> absl::Status {
    std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
    if (server == nullptr) {
      return absl::UnavailableError(absl::StrCat("could not listen on ", what));
    }
    servers->servers_.push_back(std::move(server));
    return absl::OkStatus();
  };

  // Local listeners: plaintext.
  grpc::ServerBuilder local;
  std::string local_names;
  for (const Listener& l : *listeners) {
    if (!l.local) continue;
    if (absl::StartsWith(l.address, kUnix)) {
      std::string path(absl::StripPrefix(l.address, kUnix));
      servers->unix_paths_.push_back(path);
      std::string dir = path.substr(0, path.rfind('/'));
      if (!dir.empty()) mkdir(dir.c_str(), 0750);
    }
    local.AddListeningPort(l.address, grpc::InsecureServerCredentials());
    absl::StrAppend(&local_names, local_names.empty() ? "" : ",", l.address);
  }
  if (!local_names.empty()) {
    configure(local, nullptr);
    if (auto s = start(local, local_names); !s.ok()) return s;
  }
  for (const std::string& path : servers->unix_paths_) {
    // The socket's mode guards the local API: owner and group only.
    chmod(path.c_str(), 0660);
    if (!config.socket_group.empty()) {
      group* g = getgrnam(config.socket_group.c_str());
      if (g == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat("--socket-group: no group \"", config.socket_group, "\""));
      }
      if (chown(path.c_str(), static_cast<uid_t>(-1), g->gr_gid) != 0) {
        return absl::PermissionDeniedError(
            absl::StrCat("cannot give ", path, " to group ", config.socket_group));
      }
    }
  }

  // Remote listeners: TLS with verified client certificates, authorized.
  grpc::ServerBuilder remote;
  std::string remote_names;
  std::shared_ptr<grpc::ServerCredentials> credentials;
  if (!config.tls_cert.empty()) {
    auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
        config.tls_key, config.tls_cert, config.tls_client_ca,
        config.tls_refresh_seconds);
    grpc::experimental::TlsServerCredentialsOptions tls(provider);
    tls.watch_root_certs();
    tls.watch_identity_key_cert_pairs();
    tls.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    credentials = grpc::experimental::TlsServerCredentials(tls);
  } else {
    credentials = grpc::InsecureServerCredentials();  // only with --insecure
  }
  for (const Listener& l : *listeners) {
    if (l.local) continue;
    remote.AddListeningPort(l.address, credentials);
    absl::StrAppend(&remote_names, remote_names.empty() ? "" : ",", l.address);
  }
  if (!remote_names.empty()) {
    if (!config.authz_policy.empty()) {
      auto authz = Authorizer::FromFile(config.authz_policy,
                                        std::chrono::seconds(config.tls_refresh_seconds));
      if (!authz.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--authz-policy: ", config.authz_policy, ": ", authz.status().message()));
      }
      servers->authorizer_ = std::move(*authz);
    } else if (!config.tls_cert.empty()) {
      VMNET_LOG(Warning)
          << "event=no_authz_policy detail=\"every caller with a certificate "
             "of --tls-client-ca may call every RPC\"";
    }
    configure(remote, servers->authorizer_.get());
    if (auto s = start(remote, remote_names); !s.ok()) return s;
  }

  if (!config.health_address.empty()) {
    grpc::ServerBuilder probe;
    probe.AddListeningPort(config.health_address, grpc::InsecureServerCredentials());
    auto& health =
        servers->health_.emplace_back(std::make_unique<HealthService>(reconciler));
    probe.RegisterService(health.get());
    if (auto s = start(probe, config.health_address); !s.ok()) return s;
  }
  return servers;
}

ApiServers::~ApiServers() { Shutdown(std::chrono::system_clock::now()); }

void ApiServers::SetDraining() {
  for (auto& h : health_) h->SetDraining();
}

void ApiServers::Shutdown(std::chrono::system_clock::time_point deadline) {
  for (auto& s : servers_) s->Shutdown(deadline);
  servers_.clear();
  for (const std::string& path : unix_paths_) unlink(path.c_str());
  unix_paths_.clear();
}

}  // namespace vmnet
