// A token bucket: at most `rate` bytes per second on average, in bursts of at most `burst`.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>

namespace mig::transport {

class TokenBucket {
 public:
  // `bytes_per_second` > 0. The burst is what one page batch needs, or 10 ms at the rate,
  // whichever is larger, so a batch never waits for tokens it can never have.
  explicit TokenBucket(double bytes_per_second, double burst_bytes = 0);
  // The burst a bucket of this rate gets without one asked for: 10 ms at the rate, at least
  // 2 MiB. A new bucket starts with it, so its first bytes leave at once (mig-sim models that).
  static double default_burst(double bytes_per_second) { return std::max(bytes_per_second / 100, 2.0 * (1 << 20)); }

  // The delay before `bytes` may go, with the tokens taken; zero when they are there now.
  // Split from the sleep so it can be tested without a clock.
  std::chrono::nanoseconds reserve(std::uint64_t bytes, std::chrono::steady_clock::time_point now);
  // Blocks until `bytes` may be sent, and returns true; or returns false as soon as
  // `interrupted` (asked every 10 ms, when given) says so.
  bool take(std::uint64_t bytes, const std::function<bool()>& interrupted = {});

  double rate() const { return rate_; }

 private:
  double rate_;
  double burst_;
  double tokens_;
  std::chrono::steady_clock::time_point last_{};
};

}  // namespace mig::transport
