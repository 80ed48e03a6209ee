#include "vmnet/api/authz.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

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

}  // namespace
}  // namespace vmnet
