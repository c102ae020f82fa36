#include "engine/page_hashes.h"

#include <xxh_x86dispatch.h>  // XXH3 with AVX2/AVX-512 picked at run time (about 1.4x over SSE2 here)
#include <xxhash.h>

#include <atomic>
#include <cstring>

#include "engine/pages.h"

namespace mig::engine {

std::uint64_t hash_page(const std::byte* page) { return XXH3_64bits_dispatch(page, kPageSize); }

bool is_zero_page(const std::byte* page) {
  alignas(64) static const std::byte zeros[kPageSize] = {};
  return std::memcmp(page, zeros, kPageSize) == 0;
}

std::uint64_t zero_page_hash() {
  static const std::uint64_t hash = [] {
    alignas(64) static const std::byte zeros[kPageSize] = {};
    return hash_page(zeros);
  }();
  return hash;
}

namespace {
// An entry's share of the digest. The page number seeds it, so swapped pages change the sum.
std::uint64_t mix(std::uint64_t page, std::uint64_t hash) { return XXH3_64bits_withSeed(&hash, sizeof hash, page); }
}  // namespace

PageHashes::PageHashes(std::span<const MemoryRegion> regions, unsigned channels) : sums_(channels) {
  std::uint64_t pages = 0;
  for (const auto& r : regions) {
    tables_.emplace_back(r.size / kPageSize, zero_page_hash());
    uncertain_.emplace_back(bitmap_words(r.size / kPageSize));
    first_page_.push_back(pages);
    pages += r.size / kPageSize;
  }
}

void PageHashes::set(unsigned channel, std::size_t region, std::uint64_t page, std::uint64_t hash, bool is_certain) {
  std::uint64_t& entry = tables_[region][page];
  const std::uint64_t numbered = first_page_[region] + page;
  // Unsigned arithmetic wraps: the sums are taken modulo 2^64.
  sums_[channel].value += mix(numbered, hash) - mix(numbered, entry);
  entry = hash;
  // Most sets leave the bit as it was: only a change pays for the atomic write.
  if (certain(region, page) != is_certain) {
    std::atomic_ref word(uncertain_[region][page / 64]);
    const std::uint64_t bit = std::uint64_t{1} << (page % 64);
    if (is_certain)
      word.fetch_and(~bit, std::memory_order_relaxed);
    else
      word.fetch_or(bit, std::memory_order_relaxed);
  }
}

bool PageHashes::certain(std::size_t region, std::uint64_t page) const {
  // Only the page's own channel changes its bit; the atomic load is for the other bits of the word.
  auto& word = const_cast<std::uint64_t&>(uncertain_[region][page / 64]);
  return !((std::atomic_ref(word).load(std::memory_order_relaxed) >> (page % 64)) & 1);
}

std::uint64_t PageHashes::digest() const {
  std::uint64_t sum = 0;
  for (const auto& s : sums_) sum += s.value;
  return sum;
}

}  // namespace mig::engine
