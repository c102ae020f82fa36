#include "vmm/dirty_limiter.h"

namespace mig::vmm {

DirtyPacing::Clock::time_point DirtyPacing::hold_until(double limit, std::uint64_t dirtied, Clock::time_point now) {
  auto due = [&] {
    return since + std::chrono::duration_cast<Clock::duration>(
                       std::chrono::duration<double>(static_cast<double>(dirtied - dirtied_then) / pages_per_s));
  };
  if (pages_per_s != limit || now - due() > kCredit) {
    *this = {limit, now, dirtied};
    return now;
  }
  return due();
}

void DirtyLimiter::set(double pages_per_s) {
  thread_ = std::jthread();
  if (pages_per_s <= 0) return;
  pacing_.clear();
  thread_ = std::jthread([this, pages_per_s](std::stop_token stop) {
    // As the throttler's: short enough that a held vCPU is caught before it dirties much
    // beyond its cap, long enough that a look (a harvest of every ring) costs little.
    constexpr std::chrono::milliseconds kPeriod{10};
    std::mutex mutex;
    std::condition_variable_any wake;
    std::unique_lock lock(mutex);
    for (auto next = Clock::now(); !wake.wait_until(lock, stop, next, [&] { return stop.stop_requested(); });
         next += kPeriod) {
      look(pages_per_s, Clock::now());
      if (Clock::now() > next + kPeriod) next = Clock::now();  // late: no burst of looks to catch up
    }
  });
}

void DirtyLimiter::look(double pages_per_s, Clock::time_point now) {
  const auto dirtied = dirtied_();
  pacing_.resize(dirtied.size());
  for (unsigned vcpu = 0; vcpu < dirtied.size(); ++vcpu)
    if (const auto until = pacing_[vcpu].hold_until(pages_per_s, dirtied[vcpu], now); until > now) hold_(vcpu, until);
}

}  // namespace mig::vmm
