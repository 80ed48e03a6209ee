#include "vmnet/base/clock.h"

namespace vmnet {
namespace {

class SteadyClock : public Clock {
 public:
  TimePoint Now() const override { return std::chrono::steady_clock::now(); }
};

}  // namespace

Clock* Clock::Real() {
  static SteadyClock* clock =
      new SteadyClock();  // never destroyed: outlives every thread
  return clock;
}

}  // namespace vmnet
