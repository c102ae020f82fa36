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
  thread_ = std::jthread([this, held, running = kPeriod - held](std::stop_token stop) {
    std::mutex mutex;
    std::condition_variable_any wake;
    std::unique_lock lock(mutex);
    // Both sleeps end early on a stop request.
    auto sleep = [&](std::chrono::microseconds time) {
      return !wake.wait_for(lock, stop, time, [&] { return stop.stop_requested(); });
    };
    while (sleep(running)) {
      pause_();
      sleep(held);
      resume_();
    }
  });
}

}  // namespace mig::vmm
