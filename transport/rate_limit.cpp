#include "transport/rate_limit.h"

#include <algorithm>
#include <stdexcept>
#include <thread>

namespace mig::transport {

TokenBucket::TokenBucket(double bytes_per_second, double burst_bytes)
    : rate_(bytes_per_second), burst_(std::max(burst_bytes, default_burst(bytes_per_second))), tokens_(burst_) {
  if (!(bytes_per_second > 0)) throw std::invalid_argument("bandwidth limit must be positive");
}

std::chrono::nanoseconds TokenBucket::reserve(std::uint64_t bytes, std::chrono::steady_clock::time_point now) {
  if (last_ != std::chrono::steady_clock::time_point{})
    tokens_ = std::min(burst_, tokens_ + std::chrono::duration<double>(now - last_).count() * rate_);
  last_ = now;
  tokens_ -= static_cast<double>(bytes);  // may go negative: the debt is the wait
  if (tokens_ >= 0) return std::chrono::nanoseconds(0);
  return std::chrono::nanoseconds(static_cast<std::int64_t>(-tokens_ / rate_ * 1e9));
}

bool TokenBucket::take(std::uint64_t bytes, const std::function<bool()>& interrupted) {
  const auto until = std::chrono::steady_clock::now() + reserve(bytes, std::chrono::steady_clock::now());
  constexpr auto kSlice = std::chrono::milliseconds(10);
  for (auto now = std::chrono::steady_clock::now(); now < until; now = std::chrono::steady_clock::now()) {
    if (interrupted && interrupted()) return false;
    std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(until - now, kSlice));
  }
  return true;
}

}  // namespace mig::transport
