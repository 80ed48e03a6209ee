// A clock that moves only when a test advances it; each Advance wakes the
// threads that wait for a deadline (the reconciler), which then see the new
// time at once. Thread-safe.
#pragma once

#include <functional>
#include <map>

#include "vmnet/base/clock.h"
#include "vmnet/base/mutex.h"

namespace vmnet {

class FakeClock : public Clock {
 public:
  TimePoint Now() const override {
    vmnet::ReaderMutexLock lock(&mu_);
    return now_;
  }
  void AddWaker(const void* owner, std::function<void()> wake) override {
    vmnet::MutexLock lock(&mu_);
    wakes_[owner] = std::move(wake);
  }
  void RemoveWaker(const void* owner) override {
    vmnet::MutexLock lock(&mu_);
    wakes_.erase(owner);
  }
  // Moves time forward and wakes the waiting threads. (Wakers run under the
  // clock's lock, so none is removed while it runs; they must only signal.)
  void Advance(std::chrono::milliseconds by) {
    vmnet::MutexLock lock(&mu_);
    now_ += by;
    for (auto& [owner, wake] : wakes_) wake();
  }

 private:
  mutable vmnet::Mutex mu_;
  // Far from the epoch, so that "zero" deadlines are already in the past.
  TimePoint now_ ABSL_GUARDED_BY(mu_) = TimePoint(std::chrono::hours(1000));
  std::map<const void*, std::function<void()>> wakes_ ABSL_GUARDED_BY(mu_);
};

}  // namespace vmnet
