// Bitmap -> runs, against a naive reference on random inputs.
#include <catch2/catch.hpp>
#include <random>

#include "engine/pages.h"

using namespace mig::engine;

namespace {
std::vector<PageRun> naive_runs(const std::vector<std::uint64_t>& bitmap, std::uint64_t pages) {
  std::vector<PageRun> runs;
  for (std::uint64_t p = 0; p < pages; ++p) {
    if (!((bitmap[p / 64] >> (p % 64)) & 1)) continue;
    if (!runs.empty() && runs.back().first + runs.back().count == p)
      ++runs.back().count;
    else
      runs.push_back({p, 1});
  }
  return runs;
}
}  // namespace

TEST_CASE("runs_of matches a bit-by-bit reference on random bitmaps") {
  std::mt19937_64 rng(12345);
  for (int trial = 0; trial < 500; ++trial) {
    const std::uint64_t pages = rng() % 2000 + 1;
    std::vector<std::uint64_t> bitmap(bitmap_words(pages));
    const int density = static_cast<int>(rng() % 4);
    for (auto& w : bitmap) {
      switch (density) {
        case 0: w = rng() & rng() & rng(); break;  // sparse
        case 1: w = rng(); break;                  // half
        case 2: w = rng() | rng() | rng(); break;  // dense
        default: w = (rng() % 3 == 0) ? ~0ull : 0; break;  // long runs across words
      }
    }
    INFO("trial " << trial << " pages " << pages);
    REQUIRE(runs_of(bitmap, pages) == naive_runs(bitmap, pages));
    std::uint64_t reference = 0;
    for (const auto& r : naive_runs(bitmap, pages)) reference += r.count;
    REQUIRE(count_pages(bitmap, pages) == reference);
  }
}

TEST_CASE("runs_of handles the edges") {
  CHECK(runs_of(std::vector<std::uint64_t>{0}, 64).empty());
  CHECK(runs_of(std::vector<std::uint64_t>{~0ull, ~0ull}, 128) == std::vector<PageRun>{{0, 128}});
  CHECK(runs_of(std::vector<std::uint64_t>{~0ull, ~0ull}, 100) == std::vector<PageRun>{{0, 100}});  // bits past the end ignored
  CHECK(runs_of(std::vector<std::uint64_t>{1ull << 63, 1}, 128) == std::vector<PageRun>{{63, 2}});  // joined across words
}

TEST_CASE("for_each_run over a range sees exactly the runs inside it, clipped to its ends") {
  std::mt19937_64 rng(777);
  for (int trial = 0; trial < 500; ++trial) {
    const std::uint64_t pages = rng() % 2000 + 1;
    std::vector<std::uint64_t> bitmap(bitmap_words(pages));
    for (auto& w : bitmap) w = trial % 2 ? rng() : (rng() % 3 == 0 ? ~0ull : 0);
    const std::uint64_t begin = rng() % pages, end = begin + rng() % (pages - begin + 1);
    std::vector<PageRun> expected;
    for (const auto& r : naive_runs(bitmap, pages)) {
      const std::uint64_t first = std::max(r.first, begin), last = std::min(r.first + r.count, end);
      if (first < last) expected.push_back({first, last - first});
    }
    std::vector<PageRun> seen;
    for_each_run(bitmap, begin, end, [&](const PageRun& run) { seen.push_back(run); });
    INFO("trial " << trial << " range " << begin << ".." << end);
    REQUIRE(seen == expected);
  }
}

TEST_CASE("channel ranges deal every page of a region to exactly the channel that carries it") {
  for (std::uint64_t region_first : {0ull, 1ull << 20, 300ull, 511ull}) {
    for (std::uint64_t pages : {1ull, 511ull, 512ull, 5000ull}) {
      for (unsigned channels : {1u, 2u, 3u, 8u}) {
        std::vector<int> owner(pages, -1);
        for (unsigned channel = 0; channel < channels; ++channel) {
          std::uint64_t last_end = 0;
          for_each_channel_range(region_first, pages, channel, channels, [&](std::uint64_t begin, std::uint64_t end) {
            REQUIRE(begin >= last_end);  // ascending, not overlapping
            REQUIRE(begin < end);
            REQUIRE(end <= pages);
            last_end = end;
            for (std::uint64_t p = begin; p < end; ++p) {
              REQUIRE(owner[p] == -1);
              owner[p] = static_cast<int>(channel);
            }
          });
        }
        INFO("first " << region_first << " pages " << pages << " channels " << channels);
        for (std::uint64_t p = 0; p < pages; ++p)
          REQUIRE(owner[p] == static_cast<int>(channels == 1 ? 0 : mig::wire::channel_of(region_first + p, channels)));
      }
    }
  }
}
