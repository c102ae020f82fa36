#include "engine/pages.h"

#include <bit>

namespace mig::engine {

namespace {
// The word with only the bits below `pages` kept, for the last, partial word.
std::uint64_t masked_word(std::span<const std::uint64_t> bitmap, std::size_t index, std::uint64_t pages) {
  std::uint64_t word = bitmap[index];
  const std::uint64_t base = std::uint64_t{index} * 64;
  if (pages - base < 64) word &= (std::uint64_t{1} << (pages - base)) - 1;
  return word;
}
}  // namespace

std::vector<PageRun> runs_of(std::span<const std::uint64_t> bitmap, std::uint64_t pages) {
  std::vector<PageRun> runs;
  for_each_run(bitmap, 0, pages, [&runs](const PageRun& run) { runs.push_back(run); });
  return runs;
}

std::uint64_t count_pages(std::span<const std::uint64_t> bitmap, std::uint64_t pages) {
  std::uint64_t n = 0;
  const std::size_t words = std::min(bitmap.size(), bitmap_words(pages));
  for (std::size_t i = 0; i < words; ++i) n += static_cast<std::uint64_t>(std::popcount(masked_word(bitmap, i, pages)));
  return n;
}

}  // namespace mig::engine
