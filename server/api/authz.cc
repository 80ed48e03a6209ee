#include "vmnet/api/authz.h"

#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"
#include "vmnet/log/log.h"

namespace vmnet {
namespace {

using google::protobuf::ListValue;
using google::protobuf::Struct;
using google::protobuf::Value;

absl::Status Malformed(const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("authorization policy: ", what));
}

absl::StatusOr<std::vector<std::string>> Strings(const Struct& parent,
                                                 const std::string& key,
                                                 const std::string& where) {
  std::vector<std::string> out;
  auto it = parent.fields().find(key);
  if (it == parent.fields().end()) return out;
  if (!it->second.has_list_value())
    return Malformed(absl::StrCat(where, ".", key, " is not a list"));
  for (const Value& v : it->second.list_value().values()) {
    if (v.kind_case() != Value::kStringValue) {
      return Malformed(absl::StrCat(where, ".", key, " has a non-string entry"));
    }
    out.push_back(v.string_value());
  }
  return out;
}

absl::StatusOr<std::vector<AuthzRule>> Rules(const Struct& root, const std::string& key) {
  std::vector<AuthzRule> out;
  auto it = root.fields().find(key);
  if (it == root.fields().end()) return out;
  if (!it->second.has_list_value()) return Malformed(absl::StrCat(key, " is not a list"));
  int index = 0;
  for (const Value& v : it->second.list_value().values()) {
    std::string where = absl::StrCat(key, "[", index++, "]");
    if (!v.has_struct_value()) return Malformed(absl::StrCat(where, " is not an object"));
    const Struct& rule = v.struct_value();
    AuthzRule r;
    auto name = rule.fields().find("name");
    if (name == rule.fields().end() || name->second.kind_case() != Value::kStringValue ||
        name->second.string_value().empty()) {
      return Malformed(absl::StrCat(where, " has no name"));
    }
    r.name = name->second.string_value();
    for (const auto& [field, value] : rule.fields()) {
      if (field == "name") continue;
      if (!value.has_struct_value())
        return Malformed(absl::StrCat(where, ".", field, " is not an object"));
      if (field == "source") {
        auto p = Strings(value.struct_value(), "principals", where + ".source");
        if (!p.ok()) return p.status();
        r.principals = *p;
      } else if (field == "request") {
        if (value.struct_value().fields().contains("headers")) {
          return Malformed(
              absl::StrCat(where, ".request.headers is not supported by vmnetd"));
        }
        auto p = Strings(value.struct_value(), "paths", where + ".request");
        if (!p.ok()) return p.status();
        r.paths = *p;
      } else {
        return Malformed(absl::StrCat(where, " has an unknown field \"", field, "\""));
      }
    }
    out.push_back(std::move(r));
  }
  return out;
}

bool RuleMatches(const AuthzRule& rule, const std::vector<std::string>& identities,
                 const std::string& path) {
  if (!rule.paths.empty()) {
    bool any = false;
    for (const std::string& p : rule.paths) any |= AuthzMatch(p, path);
    if (!any) return false;
  }
  if (rule.principals.empty()) return true;
  for (const std::string& p : rule.principals) {
    if (p == "*") return true;  // any caller, even one without an identity
    for (const std::string& id : identities) {
      if (AuthzMatch(p, id)) return true;
    }
  }
  return false;
}

}  // namespace

bool AuthzMatch(const std::string& pattern, const std::string& value) {
  if (pattern == "*") return true;
  if (absl::StartsWith(pattern, "*")) return absl::EndsWith(value, pattern.substr(1));
  if (absl::EndsWith(pattern, "*")) {
    return absl::StartsWith(value, pattern.substr(0, pattern.size() - 1));
  }
  return pattern == value;
}

absl::StatusOr<AuthzPolicy> AuthzPolicy::Parse(const std::string& json) {
  Struct root;
  auto parsed = google::protobuf::util::JsonStringToMessage(json, &root);
  if (!parsed.ok())
    return Malformed(absl::StrCat("not JSON: ", parsed.message().as_string()));
  AuthzPolicy policy;
  for (const auto& [field, value] : root.fields()) {
    if (field != "name" && field != "allow_rules" && field != "deny_rules") {
      return Malformed(absl::StrCat("unknown field \"", field, "\""));
    }
  }
  auto name = root.fields().find("name");
  if (name == root.fields().end() || name->second.kind_case() != Value::kStringValue) {
    return Malformed("\"name\" is missing");
  }
  policy.name = name->second.string_value();
  auto allow = Rules(root, "allow_rules");
  if (!allow.ok()) return allow.status();
  if (allow->empty()) return Malformed("\"allow_rules\" is missing or empty");
  policy.allow_rules = std::move(*allow);
  auto deny = Rules(root, "deny_rules");
  if (!deny.ok()) return deny.status();
  policy.deny_rules = std::move(*deny);
  return policy;
}

bool AuthzPolicy::Allows(const std::vector<std::string>& identities,
                         const std::string& path) const {
  for (const AuthzRule& r : deny_rules) {
    if (RuleMatches(r, identities, path)) return false;
  }
  for (const AuthzRule& r : allow_rules) {
    if (RuleMatches(r, identities, path)) return true;
  }
  return false;
}

namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream f(path);
  if (!f) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

}  // namespace

Authorizer::Authorizer(std::string path, std::chrono::seconds refresh, AuthzPolicy policy,
                       std::string version)
    : path_(std::move(path)),
      refresh_(refresh),
      policy_(std::make_shared<const AuthzPolicy>(std::move(policy))),
      version_(std::move(version)),
      next_check_(std::chrono::steady_clock::now() + refresh) {}

absl::StatusOr<std::unique_ptr<Authorizer>> Authorizer::FromFile(
    const std::string& path, std::chrono::seconds refresh) {
  auto text = ReadFile(path);
  if (!text.ok()) return text.status();
  auto policy = AuthzPolicy::Parse(*text);
  if (!policy.ok()) return policy.status();
  return std::unique_ptr<Authorizer>(
      new Authorizer(path, refresh, std::move(*policy), std::move(*text)));
}

void Authorizer::MaybeReload() {
  {
    vmnet::MutexLock lock(&mu_);
    auto now = std::chrono::steady_clock::now();
    if (now < next_check_) return;
    next_check_ = now + refresh_;
  }
  auto text = ReadFile(path_);
  if (!text.ok()) {
    VMNET_LOG(Warning) << "event=authz_reload_failed path=" << path_ << " error=\""
                       << text.status().message() << "\" keeping=previous";
    return;
  }
  vmnet::MutexLock lock(&mu_);
  if (*text == version_) return;
  auto policy = AuthzPolicy::Parse(*text);
  if (!policy.ok()) {
    VMNET_LOG(Warning) << "event=authz_reload_failed path=" << path_ << " error=\""
                       << policy.status().message() << "\" keeping=previous";
    return;
  }
  policy_ = std::make_shared<const AuthzPolicy>(std::move(*policy));
  version_ = std::move(*text);
  VMNET_LOG(Info) << "event=authz_reloaded path=" << path_;
}

std::vector<std::string> Authorizer::Identities(const grpc::AuthContext& auth) {
  std::vector<std::string> uri, dns, subject;
  for (const auto& v : auth.FindPropertyValues(GRPC_PEER_URI_PROPERTY_NAME)) {
    uri.emplace_back(v.data(), v.size());
  }
  for (const auto& v : auth.FindPropertyValues(GRPC_PEER_DNS_PROPERTY_NAME)) {
    dns.emplace_back(v.data(), v.size());
  }
  for (const auto& v : auth.FindPropertyValues(GRPC_X509_SUBJECT_PROPERTY_NAME)) {
    subject.emplace_back(v.data(), v.size());
  }
  // As gRPC's policy engine: URI SANs if any, else DNS SANs, else subject.
  if (!uri.empty()) return uri;
  if (!dns.empty()) return dns;
  return subject;
}

grpc::Status Authorizer::Check(const grpc::CallbackServerContext& context,
                               const std::string& path) {
  MaybeReload();
  std::shared_ptr<const AuthzPolicy> policy;
  {
    vmnet::MutexLock lock(&mu_);
    policy = policy_;
  }
  std::vector<std::string> identities;
  if (auto auth = context.auth_context()) identities = Identities(*auth);
  if (policy->Allows(identities, path)) return grpc::Status::OK;
  std::string who = identities.empty()
                        ? "a caller with no identity"
                        : absl::StrCat("\"", absl::StrJoin(identities, "\", \""), "\"");
  return grpc::Status(
      grpc::StatusCode::PERMISSION_DENIED,
      absl::StrCat(who, " may not call ", path, " (policy \"", policy->name, "\")"));
}

}  // namespace vmnet
