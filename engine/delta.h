// Delta encoding for pages that changed a little (XBZRLE-style), against a bounded cache of
// the versions last sent.
//
// Encoding: a sequence of runs, each `u16 skip, u16 length, length bytes`: skip that many
// unchanged bytes, then write `length` new ones. Runs are found on 8-byte words.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include "engine/vm.h"

namespace mig::engine {

// Appends the delta from `old_page` to `new_page` to `out` and returns its size, or 0 when
// the delta would not be smaller than `limit` bytes (then `out` is left as it was).
std::size_t encode_delta(const std::byte* old_page, const std::byte* new_page, std::size_t limit,
                         std::vector<std::byte>& out);
// Applies a delta to `page` in place. Throws wire::ProtocolError on a malformed delta; never
// writes outside the page.
void apply_delta(std::byte* page, std::span<const std::byte> delta);

// The last-sent version of up to `capacity` pages, evicted oldest first. Slot memory stays
// put until its page is evicted, so a batch can send straight from it.
class DeltaCache {
 public:
  explicit DeltaCache(std::size_t capacity_pages);
  // The cached version of a page, or nullptr.
  std::byte* find(std::size_t region, std::uint64_t page);
  // A slot for the page (its old contents, if cached, are there), evicting if full.
  std::byte* slot_for(std::size_t region, std::uint64_t page);
  std::size_t capacity() const { return capacity_; }

 private:
  std::size_t capacity_;
  std::vector<std::byte> storage_;
  std::vector<std::uint64_t> owner_;  // key held by each slot
  std::unordered_map<std::uint64_t, std::size_t> slots_;
  std::size_t next_ = 0;  // the next slot to reuse: FIFO
};

}  // namespace mig::engine
