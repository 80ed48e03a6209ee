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
// keep such blocks in the heap), and the free top of each thread's heap
// given back by free() above 128 KiB: malloc_trim returns the free pages
// inside a heap but never the top of a thread's heap, which would otherwise
// keep up to a megabyte each. Call once, before any thread starts.
void TuneAllocator();

// The process's resident bytes, from /proc/self/statm (one short read); 0
// when it cannot be read.
size_t ResidentBytes();

// When to trim, from what each check reads: the process's RSS and its
// "slack", RSS minus the heap in use (the free memory the allocator keeps,
// over a floor of what no trim gives back: code, stacks). While RSS moves (a
// storm, a scrape: it changed by more than 1 MiB since the last check) a trim
// is due when slack grew by more than `busy_slack_bytes` since the last trim,
// so a long storm stays bounded without a trim at every check. While RSS
// stands still, a trim is due when slack grew by more than
// `settled_slack_bytes`: what a burst freed is given back when the burst
// ends, not kept up to the busy threshold for good. An idle agent frees
// nothing, so its slack does not grow and it does not trim. What a trim gave
// back and the agent took again by the next check (a buffer each pass
// fills) is left alone after that: trimming it again and again would cost a trim and
// the page faults each time.
class TrimPolicy {
 public:
  TrimPolicy(size_t busy_slack_bytes, size_t settled_slack_bytes, size_t resident,
             size_t slack);

  // One check's reading; true when a trim is due now. After a trim, call
  // Trimmed with the reading that follows it.
  bool Check(size_t resident, size_t slack);
  void Trimmed(size_t resident, size_t slack);
  // RSS moved at the last check.
  bool moving() const { return moving_; }

 private:
  static constexpr size_t kStill = 1 << 20;
  const size_t busy_slack_bytes_;
  const size_t settled_slack_bytes_;
  size_t last_resident_;
  size_t last_slack_ = 0;
  size_t floor_;
  size_t given_back_ = 0;  // by the trim just before this check
  bool moving_ = false;
};

class MemoryTrimmer {
 public:
  // Checks every `interval_ms` while the process's RSS moves and for 3 s
  // after, and at intervals doubling up to `max_interval_ms` while it
  // stands still (an idle agent: a check every 3.2 s, not 5 a second; a
  // check reads /proc/self/statm and walks the heap's arenas). Trims as
  // TrimPolicy says.
  explicit MemoryTrimmer(int interval_ms = 200, int max_interval_ms = 3200,
                         size_t busy_slack_bytes = 4 << 20,
                         size_t settled_slack_bytes = 256 << 10);
  ~MemoryTrimmer();
  MemoryTrimmer(const MemoryTrimmer&) = delete;
  MemoryTrimmer& operator=(const MemoryTrimmer&) = delete;

  size_t trims() const;

 private:
  void Run();

  static constexpr int kQuietChecks = 15;  // 3 s of checks at 200 ms

  const int interval_ms_;
  const int max_interval_ms_;
  const size_t busy_slack_bytes_;
  const size_t settled_slack_bytes_;
  mutable std::mutex mu_;
  std::condition_variable wake_;
  bool stop_ = false;
  size_t trims_ = 0;
  std::thread thread_;
};

}  // namespace vmnet
