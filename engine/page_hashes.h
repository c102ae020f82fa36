// The proof that nothing was lost. Each side keeps an XXH3 of every page's current version
// as it last crossed the wire: the sender hashes a page as it sends it, the receiver as it
// lands. A page's last send happens after its last write (the final round runs with the
// guest paused), so at completion the two tables - and so their digests - are equal exactly
// when destination memory equals source memory. Building them costs a hash per page sent,
// spread over the rounds. The digest of a table is kept up to date as entries change (a sum
// of per-entry mixes, so every channel adds up its own pages without sharing a lock), which
// leaves nothing to compute on the downtime path.
//
// The sender hashes a page before the kernel copies its bytes. Read from a running guest,
// the bytes that cross may be a later version than the one hashed; that later write is in
// the next dirty log, so the page is looked at again - but if the guest has by then put back
// the version hashed, an equal hash proves nothing. So the sender's table also knows which
// entries are certain: the bytes that crossed were the bytes hashed.
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
  // Every entry starts as the zero page's hash. Channels 0 .. channels-1 may call set()
  // concurrently, each for its own pages only.
  PageHashes(std::span<const MemoryRegion> regions, unsigned channels);
  std::uint64_t get(std::size_t region, std::uint64_t page) const { return tables_[region][page]; }
  // `is_certain`: the page crossed as exactly the bytes hashed (a copy, a zero page, a paused
  // guest's memory); not when it was read from running guest memory after hashing.
  void set(unsigned channel, std::size_t region, std::uint64_t page, std::uint64_t hash, bool is_certain = true);
  // Whether the peer is known to hold bytes whose hash is the page's entry.
  bool certain(std::size_t region, std::uint64_t page) const;
  // Equal for two tables with equal entries, whatever order they were set in. Read it once
  // no channel is setting entries any more.
  std::uint64_t digest() const;

 private:
  struct alignas(64) ChannelSum {  // one cache line each: channels never contend
    std::uint64_t value = 0;
  };
  std::vector<std::vector<std::uint64_t>> tables_;
  // A bit per page, set while its entry is not certain. Channels own pages, not words: the
  // bits change atomically.
  std::vector<std::vector<std::uint64_t>> uncertain_;
  std::vector<std::uint64_t> first_page_;  // each region's first page in one numbering of all pages
  std::vector<ChannelSum> sums_;           // sum of mix(page, entry) - mix(page, zero hash) over the channel's pages
};

}  // namespace mig::engine
