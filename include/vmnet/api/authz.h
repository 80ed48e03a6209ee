// Authorization of TLS callers by their client certificate's identity, with
// policies in gRPC's authorization policy JSON format:
//
//   {"name": "vmnet",
//    "allow_rules": [{"name": "control-plane",
//                     "source": {"principals": ["spiffe://cloud/control-plane"]}},
//                    {"name": "monitoring",
//                     "source": {"principals": ["*.monitoring.example"]},
//                     "request": {"paths": ["/vmnet.v1.VmNetwork/List*",
//                                           "/vmnet.v1.VmNetwork/Get*"]}}],
//    "deny_rules": [...]}
//
// A call is denied when a deny rule matches, allowed when an allow rule
// matches, denied otherwise. A rule matches when each of its parts that is
// present matches: a principal against the certificate's URI SANs, then its
// DNS SANs, then its subject (as gRPC does); a path against the method. "*"
// alone matches anything; a leading or trailing "*" matches a suffix or a
// prefix.
//
// The Debian build of gRPC 1.51 lacks FileWatcherAuthorizationPolicyProvider
// (its authorization provider library is not packaged), so vmnetd reads the
// same format itself and checks each call in its handlers.
//
// Thread safety: Check may be called from any thread; the file is re-read
// when it changes (checked at most once per refresh interval), and a policy
// that fails to parse leaves the previous one in force.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"
#include "vmnet/base/mutex.h"

namespace vmnet {

struct AuthzRule {
  std::string name;
  std::vector<std::string> principals;  // empty: any caller
  std::vector<std::string> paths;       // empty: any method
};

struct AuthzPolicy {
  std::string name;
  std::vector<AuthzRule> allow_rules;
  std::vector<AuthzRule> deny_rules;

  static absl::StatusOr<AuthzPolicy> Parse(const std::string& json);
  // `identities`: the caller's URI SANs, then DNS SANs, then subject.
  bool Allows(const std::vector<std::string>& identities, const std::string& path) const;
};

// "*", "prefix*", "*suffix" or an exact string.
bool AuthzMatch(const std::string& pattern, const std::string& value);

class Authorizer {
 public:
  static absl::StatusOr<std::unique_ptr<Authorizer>> FromFile(
      const std::string& path, std::chrono::seconds refresh);

  // OK, or PERMISSION_DENIED naming the caller and the method.
  grpc::Status Check(const grpc::CallbackServerContext& context, const std::string& path);

  // The identities gRPC's policies match principals against.
  static std::vector<std::string> Identities(const grpc::AuthContext& auth);

 private:
  Authorizer(std::string path, std::chrono::seconds refresh, AuthzPolicy policy,
             std::string version);
  void MaybeReload() ABSL_LOCKS_EXCLUDED(mu_);

  const std::string path_;
  const std::chrono::seconds refresh_;
  vmnet::Mutex mu_;
  std::shared_ptr<const AuthzPolicy> policy_ ABSL_GUARDED_BY(mu_);
  std::string version_ ABSL_GUARDED_BY(mu_);  // the file's content last loaded
  std::chrono::steady_clock::time_point next_check_ ABSL_GUARDED_BY(mu_);
};

}  // namespace vmnet
