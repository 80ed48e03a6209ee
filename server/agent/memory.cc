#include "vmnet/agent/memory.h"

#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <utility>

#include "vmnet/log/log.h"

namespace vmnet {

size_t ResidentBytes() {
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return 0;
  unsigned long size = 0, resident = 0;
  int n = std::fscanf(f, "%lu %lu", &size, &resident);
  std::fclose(f);
  return n == 2 ? resident * static_cast<size_t>(sysconf(_SC_PAGESIZE)) : 0;
}

namespace {

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
  mallopt(M_TRIM_THRESHOLD, 128 << 10);
}

MemoryTrimmer::MemoryTrimmer(int interval_ms, int max_interval_ms,
                             size_t busy_slack_bytes, size_t settled_slack_bytes)
    : interval_ms_(interval_ms),
      max_interval_ms_(std::max(interval_ms, max_interval_ms)),
      busy_slack_bytes_(busy_slack_bytes),
      settled_slack_bytes_(settled_slack_bytes),
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
  size_t resident = ResidentBytes();
  TrimPolicy policy(busy_slack_bytes_, settled_slack_bytes_, resident, Slack(resident));
  int interval_ms = interval_ms_;
  int quiet_checks = 0;  // in a row, since memory last moved or was trimmed
  std::unique_lock<std::mutex> lock(mu_);
  while (!wake_.wait_for(lock, std::chrono::milliseconds(interval_ms),
                         [this] { return stop_; })) {
    lock.unlock();
    resident = ResidentBytes();
    bool trimmed = policy.Check(resident, Slack(resident));
    if (trimmed) {
      auto start = std::chrono::steady_clock::now();
      malloc_trim(0);
      auto took = std::chrono::steady_clock::now() - start;
      size_t before = resident;
      resident = ResidentBytes();
      policy.Trimmed(resident, Slack(resident));
      VMNET_LOG(Debug)
          << "event=memory_trimmed rss_kib=" << resident / 1024
          << " given_back_kib=" << (before > resident ? (before - resident) / 1024 : 0)
          << " took_us="
          << std::chrono::duration_cast<std::chrono::microseconds>(took).count();
    }
    // Checked often while memory moves and for kQuietChecks checks after
    // (what a burst's tail frees, e.g. the announcer's queue draining, is
    // given back within a check), then rarely while it stands still.
    quiet_checks = trimmed || policy.moving() ? 0 : quiet_checks + 1;
    interval_ms = quiet_checks <= kQuietChecks
                      ? interval_ms_
                      : std::min(interval_ms * 2, max_interval_ms_);
    lock.lock();
    trims_ += trimmed;
  }
}

TrimPolicy::TrimPolicy(size_t busy_slack_bytes, size_t settled_slack_bytes,
                       size_t resident, size_t slack)
    : busy_slack_bytes_(busy_slack_bytes),
      settled_slack_bytes_(settled_slack_bytes),
      last_resident_(resident),
      floor_(slack) {}

bool TrimPolicy::Check(size_t resident, size_t slack) {
  size_t moved =
      resident > last_resident_ ? resident - last_resident_ : last_resident_ - resident;
  moving_ = moved > kStill;
  last_resident_ = resident;
  last_slack_ = slack;
  if (slack < floor_) floor_ = slack;
  // What the last trim gave back was taken again, and freed, by the next
  // check without RSS moving: a buffer the agent fills over and over, not a
  // burst's leftover. Trimming it again would only have the kernel fault it
  // back in. (Later growth is new garbage, trimmed as usual.)
  size_t given_back = std::exchange(given_back_, 0);
  if (!moving_ && given_back > 0 && slack >= floor_ + given_back - given_back / 4) {
    floor_ = slack;
    return false;
  }
  return slack > floor_ + (moving_ ? busy_slack_bytes_ : settled_slack_bytes_);
}

void TrimPolicy::Trimmed(size_t resident, size_t slack) {
  last_resident_ = resident;
  // Only a trim while still can be of a buffer each pass refills; what a
  // busy trim gave back is refilled by the burst itself.
  given_back_ = !moving_ && last_slack_ > slack ? last_slack_ - slack : 0;
  floor_ = slack;  // what could not be given back does not count again
}

}  // namespace vmnet
