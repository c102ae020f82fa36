// Which pages of a mapping may hold data, asked of the kernel without touching them: round 0
// skips the rest, which read as zero. Touching a page to find out would cost a fault each.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace mig {

// How private anonymous memory is asked: `best` is PAGEMAP_SCAN where the kernel has it (6.7
// on), else one pagemap entry per page, which `pagemap_entries` forces so tests can hold the two
// to each other.
enum class PageScan { best, pagemap_entries };

// Sets bit i of `bitmap` (word i / 64, bit i % 64) for every page i of the `pages` 4 KiB pages of
// private anonymous memory at `host` that is present or swapped out; a page neither has never
// been touched (or was dropped) and reads as zero. Clears no bit.
void mark_populated_anonymous(const std::byte* host, std::uint64_t pages, std::span<std::uint64_t> bitmap,
                              PageScan scan = PageScan::best);

// Likewise for the file `fd` mapped MAP_SHARED from offset 0 at `host` (a memfd, or a file on
// tmpfs or hugetlbfs): what is in memory (mincore), and where the file holds more than that
// (pages swapped out; hugetlbfs pages another process wrote and this one never mapped) the
// file's data (SEEK_DATA; hugetlbfs reports no holes, so there every page counts).
void mark_populated_file(const std::byte* host, int fd, std::uint64_t pages, std::span<std::uint64_t> bitmap);

}  // namespace mig
