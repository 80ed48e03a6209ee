#include "vmnet/base/failpoint.h"

#include <signal.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

namespace vmnet {

namespace {

const std::string& Armed() {
  static const std::string armed = [] {
    const char* env = std::getenv("VMNET_FAILPOINTS");
    return env == nullptr ? std::string() : "," + std::string(env) + ",";
  }();
  return armed;
}

}  // namespace

void CrashPoint(std::string_view name) {
  const std::string& armed = Armed();
  if (armed.empty()) return;
  if (armed.find("," + std::string(name) + ",") == std::string::npos) return;
  static const char kMessage[] =
      "vmnetd: VMNET_FAILPOINTS: killing myself at a crash point\n";
  [[maybe_unused]] ssize_t n = write(STDERR_FILENO, kMessage, sizeof(kMessage) - 1);
  kill(getpid(), SIGKILL);
}

}  // namespace vmnet
