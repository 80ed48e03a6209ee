// What every kernel test file shares: the private namespace's state (set up
// by netns_main.cc before any test runs) and a shell for `ip` commands.
#pragma once

#include <string>

// True when the process runs in a network namespace of its own; otherwise
// every test skips with KernelTestsSkipReason().
bool KernelTestsIsolated();
const std::string& KernelTestsSkipReason();

// Runs `command` with sh inside the test's namespace; its stdout and stderr.
std::string Sh(const std::string& command);
