#include <catch2/catch.hpp>
#include <cstring>
#include <random>

#include "engine/delta.h"
#include "transport/bytes.h"

using namespace mig::engine;

TEST_CASE("deltas round-trip on random edits - and give up when not worth it") {
  std::mt19937_64 rng(42);
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<std::byte> old_page(kPageSize), new_page;
    for (auto& b : old_page) b = static_cast<std::byte>(rng());
    new_page = old_page;
    const int edits = static_cast<int>(rng() % 40);
    for (int e = 0; e < edits; ++e) new_page[rng() % kPageSize] = static_cast<std::byte>(rng());
    std::vector<std::byte> delta{std::byte{0x77}};  // encode appends: keep what was there
    const std::size_t n = encode_delta(old_page.data(), new_page.data(), kPageSize / 2, delta);
    REQUIRE(delta[0] == std::byte{0x77});
    if (n == 0) {
      CHECK(delta.size() == 1);
      continue;
    }
    REQUIRE(delta.size() == 1 + n);
    CHECK(n < kPageSize / 2);
    auto patched = old_page;
    apply_delta(patched.data(), std::span(delta).subspan(1));
    REQUIRE(patched == new_page);
  }
  std::vector<std::byte> zeros(kPageSize), ones(kPageSize, std::byte{1}), out;
  CHECK(encode_delta(zeros.data(), ones.data(), kPageSize, out) == 0);  // everything changed
  CHECK(encode_delta(zeros.data(), zeros.data(), kPageSize, out) == 0);  // nothing changed: dedup's job, not a delta
}

TEST_CASE("malformed deltas are refused without writing past the page") {
  std::vector<std::byte> page(kPageSize);
  auto delta_of = [](std::uint16_t skip, std::uint16_t length, std::size_t bytes) {
    std::vector<std::byte> d(4 + bytes);
    std::memcpy(d.data(), &skip, 2);
    std::memcpy(d.data() + 2, &length, 2);
    return d;
  };
  CHECK_THROWS_AS(apply_delta(page.data(), delta_of(4090, 8, 8)), mig::wire::ProtocolError);
  CHECK_THROWS_AS(apply_delta(page.data(), delta_of(65535, 1, 1)), mig::wire::ProtocolError);
  CHECK_THROWS_AS(apply_delta(page.data(), delta_of(0, 16, 8)), mig::wire::ProtocolError);
  CHECK_THROWS_AS(apply_delta(page.data(), std::vector<std::byte>(3)), mig::wire::ProtocolError);
  CHECK_NOTHROW(apply_delta(page.data(), delta_of(4088, 8, 8)));
}

TEST_CASE("the delta cache evicts oldest first and keeps slots in place") {
  DeltaCache cache(2);
  std::byte* a = cache.slot_for(0, 1);
  std::byte* b = cache.slot_for(0, 2);
  CHECK(cache.find(0, 1) == a);
  CHECK(cache.slot_for(0, 2) == b);  // already cached: same slot
  std::byte* c = cache.slot_for(1, 1);  // evicts page (0,1)
  CHECK(c == a);
  CHECK(cache.find(0, 1) == nullptr);
  CHECK(cache.find(1, 1) == c);
  CHECK(cache.find(0, 2) == b);
}
