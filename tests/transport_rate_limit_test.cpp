#include <catch2/catch.hpp>

#include "transport/rate_limit.h"

using namespace mig::transport;
using namespace std::chrono;

TEST_CASE("the token bucket lets a burst through - then paces to the rate") {
  TokenBucket bucket(100e6, 4e6);  // 100 MB/s, 4 MB burst
  const auto t0 = steady_clock::time_point{} + seconds(100);
  CHECK(bucket.reserve(4'000'000, t0) == nanoseconds(0));           // the burst
  CHECK(bucket.reserve(1'000'000, t0) == milliseconds(10));         // then 1 MB costs 10 ms
  CHECK(bucket.reserve(1'000'000, t0 + milliseconds(10)) == milliseconds(10));  // still 10 ms behind
  // Idle time refills, but never beyond the burst.
  CHECK(bucket.reserve(4'000'000, t0 + seconds(10)) == nanoseconds(0));
  CHECK(bucket.reserve(1, t0 + seconds(10)) > nanoseconds(0));
}

TEST_CASE("a bandwidth limit must be positive") { CHECK_THROWS_AS(TokenBucket(0), std::invalid_argument); }
