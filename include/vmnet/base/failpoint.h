// Crash points for the kill -9 tests: a test starts vmnetd with
// VMNET_FAILPOINTS=<name>[,<name>...] in its environment and the process
// kills itself (SIGKILL, as the OOM killer would) the first time it passes
// a named point. Unset (always, in production), a point costs one load of a
// flag read once at start.
//
//   after_state_saved   a batch is durable; none of its kernel writes is done
#pragma once

#include <string_view>

namespace vmnet {

void CrashPoint(std::string_view name);

}  // namespace vmnet
