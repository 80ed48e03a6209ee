#include "vmnet/state/vm_spec.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace vmnet {
namespace {

using ::testing::HasSubstr;

struct Case {
  std::string name;
  std::string vm_id = "vm-1";
  std::string interface = "vme1a";
  std::vector<std::string> addresses = {"198.51.100.201"};
  std::string mac;
  std::string want_error;  // substring; empty: valid
};

class VmSpecTest : public ::testing::TestWithParam<Case> {};

TEST_P(VmSpecTest, Validates) {
  const Case& c = GetParam();
  auto spec = ParseVmSpec(c.vm_id, c.interface, c.addresses, c.mac, SpecRules{});
  if (c.want_error.empty()) {
    ASSERT_TRUE(spec.ok()) << spec.status();
    return;
  }
  ASSERT_FALSE(spec.ok());
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(spec.status().message()), HasSubstr(c.want_error));
}

INSTANTIATE_TEST_SUITE_P(
    Requests, VmSpecTest,
    ::testing::Values(
        Case{"valid", "vm-1", "vme1a", {"198.51.100.201"}, "", ""},
        Case{"valid_with_mac",
             "vm-1",
             "vme1a",
             {"198.51.100.201"},
             "02:00:00:00:00:01",
             ""},
        Case{"vm_id_empty", "", "vme1a", {"198.51.100.201"}, "", "vm_id: \"\" is empty"},
        Case{"vm_id_long",
             std::string(65, 'a'),
             "vme1a",
             {"198.51.100.201"},
             "",
             "vm_id: \"aaaa"},
        Case{"vm_id_space",
             "vm 1",
             "vme1a",
             {"198.51.100.201"},
             "",
             "vm_id: \"vm 1\" has a character outside"},
        Case{"vm_id_control",
             std::string("vm\x01", 3),
             "vme1a",
             {"198.51.100.201"},
             "",
             "vm_id: \"vm\\x01\""},
        Case{"interface_empty",
             "vm-1",
             "",
             {"198.51.100.201"},
             "",
             "interface: \"\" is empty"},
        Case{"interface_long",
             "vm-1",
             "vme0123456789abc",
             {"198.51.100.201"},
             "",
             "Linux allows at most 15"},
        Case{"interface_pattern",
             "vm-1",
             "foo1",
             {"198.51.100.201"},
             "",
             "interface: \"foo1\" does not match"},
        Case{"no_address", "vm-1", "vme1a", {}, "", "ip_addresses: is empty"},
        Case{"not_ip",
             "vm-1",
             "vme1a",
             {"not-an-ip"},
             "",
             "ip_addresses[0]: \"not-an-ip\" is not an IP"},
        Case{"v6_link_local",
             "vm-1",
             "vme1a",
             {"fe80::1"},
             "",
             "ip_addresses[0]: \"fe80::1\" is a link-local address"},
        Case{"v6_multicast", "vm-1", "vme1a", {"ff02::1"}, "", "multicast"},
        Case{"v6_loopback", "vm-1", "vme1a", {"::1"}, "", "loopback"},
        Case{"v6_unspecified", "vm-1", "vme1a", {"::"}, "", "unspecified"},
        Case{"v6_mapped", "vm-1", "vme1a", {"::ffff:198.51.100.1"}, "", "IPv4-mapped"},
        Case{"v6_second",
             "vm-1",
             "vme1a",
             {"2001:db8:1::201", "fe80::ffff:1:2"},
             "",
             "ip_addresses[1]"},
        Case{"v6_duplicate",
             "vm-1",
             "vme1a",
             {"2001:db8:1::201", "2001:db8:1:0::201"},
             "",
             "ip_addresses[1]: \"2001:db8:1:0::201\" is given twice"},
        Case{"unspecified", "vm-1", "vme1a", {"0.0.0.0"}, "", "unspecified"},
        Case{"multicast", "vm-1", "vme1a", {"224.0.0.1"}, "", "multicast"},
        Case{"broadcast", "vm-1", "vme1a", {"255.255.255.255"}, "", "broadcast"},
        Case{"loopback", "vm-1", "vme1a", {"127.0.0.1"}, "", "loopback"},
        Case{"link_local", "vm-1", "vme1a", {"169.254.1.1"}, "", "link-local"},
        Case{"reserved", "vm-1", "vme1a", {"240.0.0.1"}, "", "reserved"},
        Case{"gateway", "vm-1", "vme1a", {"169.255.30.1"}, "", "gateway"},
        Case{"duplicate",
             "vm-1",
             "vme1a",
             {"198.51.100.201", "198.51.100.201"},
             "",
             "ip_addresses[1]: \"198.51.100.201\" is given twice"},
        Case{"second_bad",
             "vm-1",
             "vme1a",
             {"198.51.100.201", "x"},
             "",
             "ip_addresses[1]"},
        Case{"mac_bad", "vm-1", "vme1a", {"198.51.100.201"}, "zz", "mac_address: \"zz\""},
        Case{"mac_zero",
             "vm-1",
             "vme1a",
             {"198.51.100.201"},
             "00:00:00:00:00:00",
             "all zeros"},
        Case{"mac_multicast",
             "vm-1",
             "vme1a",
             {"198.51.100.201"},
             "01:00:5e:00:00:01",
             "multicast MAC"}),
    [](const auto& info) { return info.param.name; });

TEST(VmSpecCanonicalTest, SortsAddresses) {
  auto spec =
      ParseVmSpec("vm-1", "vme1a", {"198.51.100.202", "198.51.100.201"}, "", SpecRules{});
  ASSERT_TRUE(spec.ok());
  EXPECT_EQ(spec->addresses[0].ToString(), "198.51.100.201");
}

TEST(VmSpecCanonicalTest, AcceptsIpv6BesideIpv4AndSortsIpv4First) {
  std::vector<size_t> index;
  auto spec = ParseVmSpec("vm-1", "vme1a", {"2001:db8:1::201", "198.51.100.201"}, "",
                          SpecRules{}, &index);
  ASSERT_TRUE(spec.ok()) << spec.status();
  ASSERT_EQ(spec->addresses.size(), 2u);
  EXPECT_EQ(spec->addresses[0].ToString(), "198.51.100.201");
  EXPECT_EQ(spec->addresses[1].ToString(), "2001:db8:1::201");
  EXPECT_TRUE(spec->has_ipv6());
  EXPECT_EQ(AddressField(index, 1), "ip_addresses[0]");
}

TEST(VmSpecCanonicalTest, RefusesTheIpv6Gateway) {
  SpecRules rules;
  rules.gateway6 = *IpAddress::Parse("2001:db8:ffff::1");
  auto spec = ParseVmSpec("vm-1", "vme1a", {"2001:db8:ffff::1"}, "", rules);
  EXPECT_THAT(spec.status().message(), ::testing::HasSubstr("--gateway6"));
}

TEST(VmSpecLimitTest, TooManyAddressesNamesTheLimit) {
  SpecRules rules;
  rules.max_addresses = 2;
  auto spec = ParseVmSpec("vm-1", "vme1a",
                          {"198.51.100.1", "198.51.100.2", "198.51.100.3"}, "", rules);
  ASSERT_FALSE(spec.ok());
  EXPECT_THAT(std::string(spec.status().message()), HasSubstr("--max-addresses-per-vm"));
}

}  // namespace
}  // namespace vmnet

namespace vmnet {
namespace {

TEST(VmSpecHostileTest, NulAndLinuxInvalidNamesAreRefused) {
  SpecRules anything;
  anything.interface_pattern = std::regex(".*");
  std::string nul_address("198.51.100.53\0junk", 18);
  EXPECT_FALSE(ParseVmSpec("vm-1", "vme1a", {nul_address}, "", anything).ok());
  for (const std::string& name : std::vector<std::string>{"a/b", "a b", "a:b", ".", "..",
                                                          std::string("vme1a\0", 6)}) {
    EXPECT_FALSE(ParseVmSpec("vm-1", name, {"198.51.100.5"}, "", anything).ok()) << name;
  }
}

TEST(VmSpecHostileTest, RequestIndexNamesTheFieldTheCallerSent) {
  std::vector<size_t> index;
  auto spec = ParseVmSpec("vm-1", "vme1a", {"198.51.100.9", "198.51.100.1"}, "",
                          SpecRules{}, &index);
  ASSERT_TRUE(spec.ok());
  EXPECT_EQ(spec->addresses[0].ToString(), "198.51.100.1");
  EXPECT_EQ(AddressField(index, 0), "ip_addresses[1]");
  EXPECT_EQ(AddressField(index, 1), "ip_addresses[0]");
}

TEST(VmSpecHostileTest, RequestIdMustBePrintable) {
  EXPECT_TRUE(ValidateRequestId("req-42 retry 1").ok());
  EXPECT_FALSE(ValidateRequestId("r1\nts=2000 level=error event=forged").ok());
  EXPECT_FALSE(ValidateRequestId(std::string(129, 'a')).ok());
}

}  // namespace
}  // namespace vmnet
