// The kernel tests run in a network namespace of their own: the process
// unshares one before any test starts, so everything they create vanishes
// with the process, on every exit path, crashes included. The machine's own
// namespace is never touched. Without root, every test is skipped with the
// reason (ctest shows it skipped). As root, which is how CI runs, nothing may
// skip: a namespace that cannot be set up fails every test, saying why.
#include <errno.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <sys/mount.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>

#include "kernel_test.h"

namespace {

bool g_isolated = false;
std::string g_reason;

}  // namespace

bool KernelTestsIsolated() { return g_isolated; }
const std::string& KernelTestsSkipReason() { return g_reason; }

std::string Sh(const std::string& command) {
  std::string out;
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen((command + " 2>&1").c_str(), "r"),
                                             pclose);
  std::array<char, 4096> buf;
  while (pipe && fgets(buf.data(), buf.size(), pipe.get()) != nullptr) out += buf.data();
  return out;
}

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  bool listing = ::testing::GTEST_FLAG(list_tests);
  if (!listing) {
    if (unshare(CLONE_NEWNET | CLONE_NEWNS) == 0) {
      // A private mount of /sys so `ip` sees this namespace's devices.
      mount("", "/", nullptr, MS_REC | MS_PRIVATE, nullptr);
      umount2("/sys", MNT_DETACH);
      mount("sysfs", "/sys", "sysfs", 0, nullptr);
      g_isolated = system("ip link set lo up") == 0;
      if (!g_isolated) g_reason = "could not bring up lo in the test namespace";
    } else {
      g_reason = std::string("no privilege to create a network namespace (") +
                 std::strerror(errno) + "); run as root to test against the kernel";
    }
    if (!g_isolated && geteuid() == 0) {
      std::cerr << "kernel tests: " << g_reason
                << "; as root (as CI runs) no kernel test may skip, so this fails\n";
      return 1;
    }
  }
  return RUN_ALL_TESTS();
}
