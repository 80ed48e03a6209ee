#include "vmnet/api/authz.h"

#include <gmock/gmock.h>
#include <grpcpp/security/auth_context.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>

#include "vmnet/api/servers.h"

namespace vmnet {
namespace {

using ::testing::HasSubstr;

constexpr char kPolicy[] = R"({
  "name": "vmnet",
  "allow_rules": [
    {"name": "control-plane", "source": {"principals": ["spiffe://cloud/control-plane"]}},
    {"name": "readers", "source": {"principals": ["*.monitoring.example"]},
     "request": {"paths": ["/vmnet.v1.VmNetwork/List*", "/vmnet.v1.VmNetwork/GetVm"]}}
  ],
  "deny_rules": [
    {"name": "revoked", "source": {"principals": ["spiffe://cloud/revoked"]}}
  ]
})";

TEST(AuthzPolicyTest, AllowsByIdentityAndPath) {
  auto policy = AuthzPolicy::Parse(kPolicy);
  ASSERT_TRUE(policy.ok()) << policy.status();
  const std::string attach = "/vmnet.v1.VmNetwork/AttachVm";
  const std::string list = "/vmnet.v1.VmNetwork/ListRoutes";
  EXPECT_TRUE(policy->Allows({"spiffe://cloud/control-plane"}, attach));
  EXPECT_TRUE(policy->Allows({"prom1.monitoring.example"}, list));
  EXPECT_FALSE(policy->Allows({"prom1.monitoring.example"}, attach))
      << "read-only callers may not mutate";
  EXPECT_FALSE(policy->Allows({"someone.else.example"}, list));
  EXPECT_FALSE(policy->Allows({}, list)) << "no identity, no access";
}

TEST(AuthzPolicyTest, DenyRulesWin) {
  auto policy = AuthzPolicy::Parse(R"({"name": "p",
    "allow_rules": [{"name": "all", "source": {"principals": ["*"]}}],
    "deny_rules": [{"name": "revoked", "source": {"principals": ["spiffe://cloud/revoked"]}}]})");
  ASSERT_TRUE(policy.ok());
  EXPECT_TRUE(policy->Allows({"spiffe://cloud/a"}, "/x"));
  EXPECT_FALSE(policy->Allows({"spiffe://cloud/revoked"}, "/x"));
}

TEST(AuthzPolicyTest, MalformedPoliciesAreRefusedWithTheReason) {
  struct Case {
    const char* json;
    const char* reason;
  };
  for (
      const Case& c : std::vector<Case>{
          {"not json", "not JSON"},
          {R"({"allow_rules": [{"name": "a"}]})", "\"name\" is missing"},
          {R"({"name": "p"})", "allow_rules"},
          {R"({"name": "p", "allow_rules": [{"source": {}}]})", "has no name"},
          {R"({"name": "p", "allow_rules": [{"name": "a", "source": {"principals": "x"}}]})",
           "is not a list"},
          {R"({"name": "p", "allow_rules": [{"name": "a", "oops": {}}]})",
           "unknown field"},
          {R"({"name": "p", "extra": 1, "allow_rules": [{"name": "a"}]})",
           "unknown field"},
      }) {
    auto policy = AuthzPolicy::Parse(c.json);
    ASSERT_FALSE(policy.ok()) << c.json;
    EXPECT_THAT(std::string(policy.status().message()), HasSubstr(c.reason)) << c.json;
  }
}

TEST(AuthzMatchTest, Wildcards) {
  EXPECT_TRUE(AuthzMatch("*", "anything"));
  EXPECT_TRUE(AuthzMatch("/vmnet.v1.VmNetwork/List*", "/vmnet.v1.VmNetwork/ListArp"));
  EXPECT_TRUE(AuthzMatch("*.example", "a.example"));
  EXPECT_FALSE(AuthzMatch("*.example", "a.example.org"));
  EXPECT_FALSE(AuthzMatch("exact", "exact2"));
}

TEST(ClassifyListenersTest, LocalRemoteAndTheirRules) {
  ListenerConfig config;
  config.addresses = {"unix:///run/vmnetd/vmnetd.sock", "127.0.0.1:5000", "[::1]:5000",
                      "localhost:5000"};
  auto l = ClassifyListeners(config);
  ASSERT_TRUE(l.ok()) << l.status();
  for (const Listener& x : *l) EXPECT_TRUE(x.local) << x.address;

  config.addresses = {"198.51.100.1:5000"};
  auto plaintext = ClassifyListeners(config);
  ASSERT_FALSE(plaintext.ok());
  EXPECT_THAT(std::string(plaintext.status().message()), HasSubstr("--tls-cert"));
  config.insecure = true;
  EXPECT_TRUE(ClassifyListeners(config).ok());

  config.insecure = false;
  config.tls_cert = "c.pem";
  auto partial = ClassifyListeners(config);
  EXPECT_THAT(std::string(partial.status().message()), HasSubstr("give all three"));
  config.tls_key = "k.pem";
  config.tls_client_ca = "ca.pem";
  auto tls = ClassifyListeners(config);
  ASSERT_TRUE(tls.ok());
  EXPECT_FALSE((*tls)[0].local);

  config.addresses = {"unix://relative"};
  EXPECT_FALSE(ClassifyListeners(config).ok());
}

// An AuthContext holding the given properties, as gRPC fills it from a peer's
// certificate.
class FakeAuthContext : public grpc::AuthContext {
 public:
  explicit FakeAuthContext(std::multimap<std::string, std::string> properties)
      : properties_(std::move(properties)) {}
  bool IsPeerAuthenticated() const override { return true; }
  std::vector<grpc::string_ref> GetPeerIdentity() const override { return {}; }
  std::string GetPeerIdentityPropertyName() const override { return ""; }
  std::vector<grpc::string_ref> FindPropertyValues(
      const std::string& name) const override {
    std::vector<grpc::string_ref> out;
    auto [begin, end] = properties_.equal_range(name);
    for (auto it = begin; it != end; ++it) out.emplace_back(it->second);
    return out;
  }
  grpc::AuthPropertyIterator begin() const override { return Empty(); }
  grpc::AuthPropertyIterator end() const override { return Empty(); }
  void AddProperty(const std::string&, const grpc::string_ref&) override {}
  bool SetPeerIdentityPropertyName(const std::string&) override { return false; }

 private:
  struct Empty : grpc::AuthPropertyIterator {
    Empty() : grpc::AuthPropertyIterator() {}
  };
  std::multimap<std::string, std::string> properties_;
};

// README (Security): a caller is its URI SANs if it has any, else its DNS
// SANs, else its certificate's subject.
TEST(AuthzIdentitiesTest, UriSansWinThenDnsSansThenTheSubject) {
  const std::string uri = GRPC_PEER_URI_PROPERTY_NAME, dns = GRPC_PEER_DNS_PROPERTY_NAME,
                    subject = GRPC_X509_SUBJECT_PROPERTY_NAME;
  FakeAuthContext all({{uri, "spiffe://cloud/a"},
                       {uri, "spiffe://cloud/b"},
                       {dns, "a.example"},
                       {subject, "CN=a"}});
  EXPECT_THAT(Authorizer::Identities(all),
              ::testing::ElementsAre("spiffe://cloud/a", "spiffe://cloud/b"));
  FakeAuthContext dns_and_subject({{dns, "a.example"}, {subject, "CN=a"}});
  EXPECT_THAT(Authorizer::Identities(dns_and_subject),
              ::testing::ElementsAre("a.example"));
  FakeAuthContext only_subject({{subject, "CN=a,O=cloud"}});
  EXPECT_THAT(Authorizer::Identities(only_subject),
              ::testing::ElementsAre("CN=a,O=cloud"));
  EXPECT_THAT(Authorizer::Identities(FakeAuthContext({})), ::testing::IsEmpty());
}

// README (Security): the policy file is read again when it changes; one that
// no longer parses leaves the last good policy in force. (The refusal names
// the policy in force.)
TEST(AuthorizerTest, ThePolicyFileIsReadAgainAndABadOneIsIgnored) {
  char dir[] = "/tmp/vmnet-authz-test.XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  const std::string path = std::string(dir) + "/policy.json";
  auto write = [&](const std::string& text) { std::ofstream(path) << text; };
  auto policy = [](const char* name) {
    return absl::StrCat(R"({"name": ")", name,
                        R"(", "allow_rules": [{"name": "a", "source": )"
                        R"({"principals": ["spiffe://cloud/a"]}}]})");
  };
  write(policy("first"));
  auto authorizer = Authorizer::FromFile(path, std::chrono::seconds(0));
  ASSERT_TRUE(authorizer.ok()) << authorizer.status();
  grpc::CallbackServerContext context;  // no call: no identity
  auto refusal = [&] { return (*authorizer)->Check(context, "/x").error_message(); };
  EXPECT_THAT(refusal(), HasSubstr("(policy \"first\")"));
  write(policy("second"));
  EXPECT_THAT(refusal(), HasSubstr("(policy \"second\")"));
  write("{ not json");
  EXPECT_THAT(refusal(), HasSubstr("(policy \"second\")"));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace vmnet
