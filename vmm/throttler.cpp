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
  const auto held = std::chrono::duration_cast<std::chrono::microseconds>(kPeriod * std::min(share, 0.99));
  thread_ = std::jthread([this, held, kPeriod](std::stop_token stop) {
    using clock = std::chrono::steady_clock;
    std::mutex mutex;
    std::condition_variable_any wake;
    std::unique_lock lock(mutex);
    // Both sleeps end early on a stop request.
    auto sleep_until = [&](clock::time_point when) {
      return !wake.wait_until(lock, stop, when, [&] { return stop.stop_requested(); });
    };
    // Periods by the clock, so that the time the vCPUs take to stop comes out of the held
    // time, not on top of it: a throttle of s leaves a guest 1 - s of its time, as policies
    // and mig-sim take it to (relative sleeps left a sweeping guest about 7 % less). Up to
    // kSlack of it is absorbed so. Beyond that (on a busy host this thread wakes late, and
    // vCPUs take long to stop) the vCPUs stay held for `held` less kSlack from when they
    // stopped, and the periods start afresh: a hold cut short would let the guest run on.
    constexpr auto kSlack = kPeriod / 10;
    for (auto start = clock::now(); sleep_until(start + (kPeriod - held));) {
      pause_();
      sleep_until(std::max(start + kPeriod, clock::now() + held - kSlack));
      resume_();
      start += kPeriod;
      if (clock::now() > start + kSlack) start = clock::now();
    }
  });
}

}  // namespace mig::vmm
