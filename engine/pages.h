// Dirty pages as values: a bitmap per region, turned into runs of consecutive pages.
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <span>
#include <vector>

#include "transport/protocol.h"

namespace mig::engine {

struct PageRun {
  std::uint64_t first = 0;  // page index within the region
  std::uint64_t count = 0;
  friend bool operator==(const PageRun&, const PageRun&) = default;
};

// The runs of set bits among the first `pages` bits of `bitmap`, in ascending order. Bits at
// or past `pages` are ignored.
std::vector<PageRun> runs_of(std::span<const std::uint64_t> bitmap, std::uint64_t pages);

// Calls visit(PageRun) for each run of set bits among bits [begin, end) of `bitmap`, in
// ascending order, reading only the words that hold them: a channel walks its own chunks of
// a bitmap, not the whole of it. Each word is read once, atomically: post-copy's source walks
// its unsent pages while its request thread claims them (claim_page), and a relaxed load is
// the plain load it would be anyway, minus the data race.
template <typename Visit>
void for_each_run(std::span<const std::uint64_t> bitmap, std::uint64_t begin, std::uint64_t end, Visit&& visit);

std::uint64_t count_pages(std::span<const std::uint64_t> bitmap, std::uint64_t pages);

inline std::size_t bitmap_words(std::uint64_t pages) { return static_cast<std::size_t>((pages + 63) / 64); }

// Clears in `bitmap` the pages set in `pages` (bit i for page `first_page` + i, `first_page` a
// multiple of 64), as MigratableVm::rearm_dirty_pages() asks; pages past the end are ignored.
inline void clear_pages(std::span<std::uint64_t> bitmap, std::uint64_t first_page, std::span<const std::uint64_t> pages) {
  for (std::size_t w = 0; w < pages.size() && first_page / 64 + w < bitmap.size(); ++w)
    bitmap[static_cast<std::size_t>(first_page / 64) + w] &= ~pages[w];
}

// One number per page of guest memory, for maps and atomics: the region in the top 16 bits,
// the page within it below.
inline std::uint64_t page_key(std::size_t region, std::uint64_t page) { return std::uint64_t{region} << 48 | page; }
inline std::size_t key_region(std::uint64_t key) { return static_cast<std::size_t>(key >> 48); }
inline std::uint64_t key_page(std::uint64_t key) { return key & ((std::uint64_t{1} << 48) - 1); }

// One page's bit in a bitmap that other threads change at the same time.
inline bool test_page(std::span<std::uint64_t> bitmap, std::uint64_t page) {
  return std::atomic_ref(bitmap[page / 64]).load(std::memory_order_acquire) >> (page % 64) & 1;
}
// Sets the bit; returns whether it was set already.
inline bool set_page(std::span<std::uint64_t> bitmap, std::uint64_t page) {
  const std::uint64_t bit = std::uint64_t{1} << (page % 64);
  return std::atomic_ref(bitmap[page / 64]).fetch_or(bit, std::memory_order_acq_rel) & bit;
}
// Clears the bit; returns whether it was set: exactly one of several threads clearing the same
// bit gets true.
inline bool claim_page(std::span<std::uint64_t> bitmap, std::uint64_t page) {
  const std::uint64_t bit = std::uint64_t{1} << (page % 64);
  return std::atomic_ref(bitmap[page / 64]).fetch_and(~bit, std::memory_order_acq_rel) & bit;
}

// Calls visit(begin, end) for each range [begin, end) of a region's pages that travels on
// `channel` of `channels` (wire::channel_of), in ascending order; `region_first` is the
// region's first guest page number. One channel gets the whole region.
template <typename Visit>
void for_each_channel_range(std::uint64_t region_first, std::uint64_t pages, unsigned channel, unsigned channels,
                            Visit&& visit) {
  if (channels <= 1) {
    visit(std::uint64_t{0}, pages);
    return;
  }
  const std::uint64_t chunk = wire::kChannelChunkPages, first_chunk = region_first / chunk;
  for (std::uint64_t c = first_chunk + (channel + channels - first_chunk % channels) % channels;
       c * chunk < region_first + pages; c += channels)
    visit(std::max(c * chunk, region_first) - region_first, std::min((c + 1) * chunk - region_first, pages));
}

// The word of `bitmap` that holds bit `word_first` (a multiple of 64), read atomically as
// for_each_run() reads it, with only its bits in [begin, end) kept.
inline std::uint64_t word_within(std::span<const std::uint64_t> bitmap, std::uint64_t word_first, std::uint64_t begin,
                                 std::uint64_t end) {
  std::uint64_t word = std::atomic_ref(const_cast<std::uint64_t&>(bitmap[static_cast<std::size_t>(word_first / 64)]))
                           .load(std::memory_order_relaxed);
  if (begin > word_first) word &= ~std::uint64_t{0} << (begin - word_first);
  if (end - word_first < 64) word &= (std::uint64_t{1} << (end - word_first)) - 1;
  return word;
}

template <typename Visit>
void for_each_run(std::span<const std::uint64_t> bitmap, std::uint64_t begin, std::uint64_t end, Visit&& visit) {
  end = std::min<std::uint64_t>(end, std::uint64_t{bitmap.size()} * 64);
  PageRun open;  // the run being extended across word boundaries; count 0 when none
  for (std::uint64_t word_first = begin / 64 * 64; word_first < end; word_first += 64) {
    std::uint64_t word = word_within(bitmap, word_first, begin, end);
    while (word) {
      const auto start = static_cast<unsigned>(std::countr_zero(word));
      const auto length = static_cast<unsigned>(std::countr_one(word >> start));
      if (open.count && open.first + open.count == word_first + start) {
        open.count += length;
      } else {
        if (open.count) visit(open);
        open = {word_first + start, length};
      }
      word = length + start >= 64 ? 0 : word & ~(((std::uint64_t{1} << length) - 1) << start);
    }
  }
  if (open.count) visit(open);
}

}  // namespace mig::engine
