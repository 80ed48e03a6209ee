#include "vmnet/agent/memory.h"

#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

namespace vmnet {
namespace {

// Resident bytes, from /proc/self/statm (one short read).
size_t ResidentBytes() {
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return 0;
  unsigned long size = 0, resident = 0;
  int n = std::fscanf(f, "%lu %lu", &size, &resident);
  std::fclose(f);
  return n == 2 ? resident * static_cast<size_t>(sysconf(_SC_PAGESIZE)) : 0;
}

// What the process holds beyond the heap it uses: code, stacks, and the free
// memory the allocator keeps. Only the last one grows.
// `resident` is ResidentBytes(), read by the caller.
size_t Slack(size_t resident) {
  struct mallinfo2 info = mallinfo2();
  size_t used = info.uordblks + info.hblkhd;  // in the heap and in mapped blocks
  return resident > used ? resident - used : 0;
}

}  // namespace

void TuneAllocator() {
  mallopt(M_MMAP_THRESHOLD, 256 << 10);
  mallopt(M_TRIM_THRESHOLD, 1 << 20);
}

MemoryTrimmer::MemoryTrimmer(int interval_ms, int max_interval_ms, size_t slack_bytes)
    : interval_ms_(interval_ms),
      max_interval_ms_(std::max(interval_ms, max_interval_ms)),
      slack_bytes_(slack_bytes),
      thread_([this] { Run(); }) {}

MemoryTrimmer::~MemoryTrimmer() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

size_t MemoryTrimmer::trims() const {
  std::lock_guard<std::mutex> lock(mu_);
  return trims_;
}

void MemoryTrimmer::Run() {
  size_t last_resident = ResidentBytes();
  size_t floor = Slack(last_resident);
  int interval_ms = interval_ms_;
  std::unique_lock<std::mutex> lock(mu_);
  while (!wake_.wait_for(lock, std::chrono::milliseconds(interval_ms),
                         [this] { return stop_; })) {
    lock.unlock();
    size_t resident = ResidentBytes();
    size_t slack = Slack(resident);
    bool trimmed = false;
    if (slack > floor + slack_bytes_) {
      malloc_trim(0);
      resident = ResidentBytes();
      slack = Slack(resident);
      trimmed = true;
      floor = slack;  // what could not be given back does not count again
    } else if (slack < floor) {
      floor = slack;
    }
    // Checked often while memory moves, rarely while it stands still: what
    // a transient freed shows in the checks that follow its growth.
    size_t moved =
        resident > last_resident ? resident - last_resident : last_resident - resident;
    last_resident = resident;
    interval_ms = trimmed || moved > kStill ? interval_ms_
                                            : std::min(interval_ms * 2, max_interval_ms_);
    lock.lock();
    trims_ += trimmed;
  }
}

}  // namespace vmnet
