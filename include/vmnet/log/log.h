// One line per event on stderr, with a level and key=value fields, the form
// journald and log shippers take as it is:
//   ts=2026-11-24T10:00:00.123Z level=info event=attach vm_id=vm-1 ...
#pragma once

#include <sstream>

#include "absl/strings/string_view.h"

namespace vmnet {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

void SetLogLevel(LogLevel level);
bool LogEnabled(LogLevel level);
// "debug", "info", "warning", "error".
bool ParseLogLevel(absl::string_view text, LogLevel* level);

// Collects one line and writes it with a single write(2) when destroyed, so
// lines from different threads never interleave.
class LogLine {
 public:
  explicit LogLine(LogLevel level);
  ~LogLine();
  std::ostream& stream() { return out_; }

 private:
  std::ostringstream out_;
};

}  // namespace vmnet

#define VMNET_LOG(severity)                                   \
  if (!::vmnet::LogEnabled(::vmnet::LogLevel::k##severity)) { \
  } else                                                      \
    ::vmnet::LogLine(::vmnet::LogLevel::k##severity).stream()
