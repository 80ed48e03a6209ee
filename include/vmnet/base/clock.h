// The agent's sense of time, injected so that backoff, retries and intervals
// can be tested on a fake clock without sleeping. The reconciler reads Now()
// for every deadline it keeps and waits on its descriptors until the next
// one; a clock that jumps (a fake one, advanced by a test) calls the
// registered wake-ups so that the waiting thread reads Now() again.
//
// Thread safety: all methods may be called from any thread.
#pragma once

#include <chrono>
#include <functional>

namespace vmnet {

class Clock {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;
  virtual ~Clock() = default;
  virtual TimePoint Now() const = 0;
  // `wake` runs whenever the clock jumps forward, until RemoveWaker(owner).
  // The real clock never jumps.
  virtual void AddWaker(const void* owner, std::function<void()> wake) {
    (void)owner;
    (void)wake;
  }
  virtual void RemoveWaker(const void* owner) { (void)owner; }

  // std::chrono::steady_clock.
  static Clock* Real();
};

}  // namespace vmnet
