// Guest memory without a VM: which pages count as populated, and populating ahead.
#include <catch2/catch.hpp>
#include <vector>

#include "kvm/memory.h"

using namespace mig;

namespace {
constexpr std::uint64_t kPages = 16384;  // 64 MiB

std::vector<std::uint64_t> populated(const kvm::GuestMemory& memory, kvm::GuestMemory::PageScan scan) {
  std::vector<std::uint64_t> bitmap(kPages / 64, ~std::uint64_t{0});  // stale bits must be cleared
  memory.populated_pages(0, bitmap, scan);
  return bitmap;
}
}  // namespace

TEST_CASE("populated pages are exactly the touched ones - by either kernel interface and either backing") {
  for (auto backing : {kvm::MemoryBacking::anonymous, kvm::MemoryBacking::memfd}) {
    INFO("memfd backing: " << (backing == kvm::MemoryBacking::memfd));
    const std::vector<kvm::RegionLayout> layout = {{0, kPages * kvm::kPageSize}};
    // 4 KiB pages: with huge pages, touching one page populates its whole 2 MiB.
    auto memory = kvm::GuestMemory::create(layout, {.backing = backing, .transparent_huge_pages = false, .hugetlbfs_dir = {}});
    std::byte* host = memory.regions()[0].host();
    std::vector<std::uint64_t> expected(kPages / 64, 0);
    // Irregular runs, first and last page included, so runs and word edges both matter.
    for (std::uint64_t page = 0; page < kPages; page += 1 + page % 7 + (page / 1000) * 13) {
      host[page * kvm::kPageSize + 5] = std::byte{1};
      expected[page / 64] |= std::uint64_t{1} << (page % 64);
    }
    host[(kPages - 1) * kvm::kPageSize] = std::byte{1};
    expected.back() |= std::uint64_t{1} << 63;

    CHECK(populated(memory, kvm::GuestMemory::PageScan::best) == expected);
    CHECK(populated(memory, kvm::GuestMemory::PageScan::pagemap_entries) == expected);

    memory.populate();
    CHECK(populated(memory, kvm::GuestMemory::PageScan::best) == std::vector<std::uint64_t>(kPages / 64, ~std::uint64_t{0}));
  }
}
