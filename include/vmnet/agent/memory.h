// Giving memory back to the system. glibc's allocator keeps what a large
// transient allocation (a /metrics scrape of 10,000 VMs, a list snapshot, an
// attach storm's in-flight calls) freed, so the agent's RSS would stay at its
// high-water mark: the trimmer notices when the process holds much more than
// it uses and calls malloc_trim.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <thread>

namespace vmnet {

// Large blocks straight from and back to the kernel (a fixed threshold: glibc
// would otherwise raise it to the largest block freed, 32 MiB at most, and
// keep such blocks in the heap). Call once, before any thread starts.
void TuneAllocator();

class MemoryTrimmer {
 public:
  // Checks every `interval_ms` while the process's RSS moves (by more than
  // 1 MiB between checks), and at intervals doubling up to `max_interval_ms`
  // while it stands still (an idle agent: a check every 3.2 s, not 5 a
  // second; a check reads /proc/self/statm and walks the heap's arenas).
  // Trims when RSS minus the heap in use grew by more than `slack_bytes`
  // since the last trim.
  explicit MemoryTrimmer(int interval_ms = 200, int max_interval_ms = 3200,
                         size_t slack_bytes = 4 << 20);
  ~MemoryTrimmer();
  MemoryTrimmer(const MemoryTrimmer&) = delete;
  MemoryTrimmer& operator=(const MemoryTrimmer&) = delete;

  size_t trims() const;

 private:
  void Run();

  static constexpr size_t kStill = 1 << 20;
  const int interval_ms_;
  const int max_interval_ms_;
  const size_t slack_bytes_;
  mutable std::mutex mu_;
  std::condition_variable wake_;
  bool stop_ = false;
  size_t trims_ = 0;
  std::thread thread_;
};

}  // namespace vmnet
