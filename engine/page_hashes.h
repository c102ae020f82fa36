// The proof that nothing was lost. Each side keeps an XXH3 of every page's current version
// as it last crossed the wire: the sender hashes a page as it sends it, the receiver as it
// lands. A page's last send happens after its last write (the final round runs with the
// guest paused), so at completion the two tables - and so their digests - are equal exactly
// when destination memory equals source memory. Building them costs a hash per page sent,
// spread over the rounds; only the digest of the tables is on the downtime path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "engine/vm.h"

namespace mig::engine {

std::uint64_t hash_page(const std::byte* page);
bool is_zero_page(const std::byte* page);
// XXH3 of an all-zero page: every never-sent page's entry on both sides.
std::uint64_t zero_page_hash();

class PageHashes {
 public:
  explicit PageHashes(std::span<const MemoryRegion> regions);
  std::uint64_t& at(std::size_t region, std::uint64_t page) { return tables_[region][page]; }
  std::uint64_t digest() const;

 private:
  std::vector<std::vector<std::uint64_t>> tables_;
};

}  // namespace mig::engine
