// Dirty pages as values: a bitmap per region, turned into runs of consecutive pages.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace mig::engine {

struct PageRun {
  std::uint64_t first = 0;  // page index within the region
  std::uint64_t count = 0;
  friend bool operator==(const PageRun&, const PageRun&) = default;
};

// The runs of set bits among the first `pages` bits of `bitmap`, in ascending order. Bits at
// or past `pages` are ignored.
std::vector<PageRun> runs_of(std::span<const std::uint64_t> bitmap, std::uint64_t pages);

std::uint64_t count_pages(std::span<const std::uint64_t> bitmap, std::uint64_t pages);

inline std::size_t bitmap_words(std::uint64_t pages) { return static_cast<std::size_t>((pages + 63) / 64); }

}  // namespace mig::engine
