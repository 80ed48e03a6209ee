// VmDirectory: what API threads read of the VMs, updated after each pass.
#include "vmnet/reconciler/vm_directory.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

namespace vmnet {
namespace {

VmRecord Record(const std::string& vm_id, const std::string& interface,
                std::vector<std::string> addresses, VmState state = VmState::kProgrammed,
                std::string message = "") {
  VmSpec spec;
  spec.vm_id = vm_id;
  spec.interface = interface;
  for (const std::string& a : addresses) spec.addresses.push_back(*IpAddress::Parse(a));
  VmRecord r;
  r.spec = std::make_shared<const VmSpec>(std::move(spec));
  r.state = state;
  r.message = std::move(message);
  r.revision = 7;
  return r;
}

IpAddress Ip(const char* text) { return *IpAddress::Parse(text); }

TEST(VmDirectoryTest, FindsWhatWasPutAndForgetsWhatWasRemoved) {
  VmDirectory directory;
  VmRecord a = Record("vm-a", "vmea", {"198.51.100.1", "2001:db8::1"}, VmState::kFailed,
                      "add route 198.51.100.1/32: File exists");
  directory.Update("vm-a", &a);
  VmRecord b = Record("vm-b", "vmeb", {"198.51.100.2"});
  directory.Update("vm-b", &b);

  auto found = directory.Find("vm-a");
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->spec, a.spec);  // shared, not copied
  EXPECT_EQ(found->state, VmState::kFailed);
  EXPECT_EQ(found->message, "add route 198.51.100.1/32: File exists");
  EXPECT_EQ(found->revision, 7u);
  EXPECT_EQ(directory.VmOfAddress(Ip("2001:db8::1")), "vm-a");
  EXPECT_EQ(directory.VmOfAddress(Ip("198.51.100.2")), "vm-b");
  EXPECT_EQ(directory.VmOfInterface("vmea"), "vm-a");
  EXPECT_EQ(directory.All().size(), 2u);

  directory.Update("vm-a", nullptr);
  EXPECT_FALSE(directory.Find("vm-a").has_value());
  EXPECT_EQ(directory.VmOfAddress(Ip("198.51.100.1")), "");
  EXPECT_EQ(directory.VmOfInterface("vmea"), "");
  EXPECT_EQ(directory.VmOfAddress(Ip("198.51.100.2")), "vm-b");
  EXPECT_EQ(directory.All().size(), 1u);
}

// In one pass vm-a gives up 198.51.100.1 and vmea, and vm-b takes both; the
// reconciler may update vm-b first.
TEST(VmDirectoryTest, WhatAnotherVmTookInTheSamePassStaysItsOwn) {
  VmDirectory directory;
  VmRecord a = Record("vm-a", "vmea", {"198.51.100.1"});
  directory.Update("vm-a", &a);
  VmRecord b = Record("vm-b", "vmea", {"198.51.100.1"});
  directory.Update("vm-b", &b);
  VmRecord a2 = Record("vm-a", "vmea2", {"198.51.100.3"});
  directory.Update("vm-a", &a2);

  EXPECT_EQ(directory.VmOfAddress(Ip("198.51.100.1")), "vm-b");
  EXPECT_EQ(directory.VmOfInterface("vmea"), "vm-b");
  EXPECT_EQ(directory.VmOfAddress(Ip("198.51.100.3")), "vm-a");
  EXPECT_EQ(directory.VmOfInterface("vmea2"), "vm-a");
  // vm-a's old spec may go: nothing points into it.
  a = VmRecord{};
  directory.Update("vm-b", nullptr);
  EXPECT_EQ(directory.VmOfAddress(Ip("198.51.100.1")), "");
  EXPECT_EQ(directory.Find("vm-a")->spec->interface, "vmea2");
}

}  // namespace
}  // namespace vmnet
