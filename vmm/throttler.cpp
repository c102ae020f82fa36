#include "vmm/throttler.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <mutex>

namespace mig::vmm {

void Throttler::set(double share) {
  stop();
  if (share <= 0) return;
  // A 10 ms period: short enough that the guest sees a slower CPU rather than stalls, long
  // enough that a pause and a resume (about 0.1 ms each with KVM) are a small part of it, up
  // to the highest throttles, where the guest is left only slivers of time on purpose.
  constexpr std::chrono::microseconds kPeriod{10000};
  const auto running = std::chrono::duration_cast<std::chrono::microseconds>(kPeriod * (1 - std::min(share, 0.99)));
  thread_ = std::jthread([this, running, kPeriod](std::stop_token stop) {
    using clock = std::chrono::steady_clock;
    std::mutex mutex;
    std::condition_variable_any wake;
    std::unique_lock lock(mutex);
    // Both sleeps end early on a stop request.
    auto sleep_until = [&](clock::time_point when) {
      return !wake.wait_until(lock, stop, when, [&] { return stop.stop_requested(); });
    };
    // Periods by the clock: what pausing and resuming the vCPUs take comes out of the time
    // they are held, not on top of it, so that a throttle of s leaves the guest 1 - s of its
    // time, as the policies and mig-sim take it to (relative sleeps left it about 7 % less).
    for (auto start = clock::now(); sleep_until(start + running);) {
      pause_();
      sleep_until(start + kPeriod);
      resume_();
      start += kPeriod;
      if (clock::now() > start + running) start = clock::now();  // far behind (a loaded host): no burst of pauses
    }
  });
}

}  // namespace mig::vmm
