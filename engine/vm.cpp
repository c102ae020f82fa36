#include "engine/vm.h"

#include <sys/mman.h>

#include <algorithm>

#include "common/fd.h"

namespace mig::engine {

std::optional<PageAddress> find_page(std::span<const MemoryRegion> regions, std::uint64_t guest_addr) {
  for (std::size_t r = 0; r < regions.size(); ++r)
    if (guest_addr >= regions[r].guest_addr && guest_addr - regions[r].guest_addr < regions[r].size)
      return PageAddress{r, (guest_addr - regions[r].guest_addr) / kPageSize};
  return std::nullopt;
}

void MigratableVm::populated_pages(std::size_t, std::span<std::uint64_t> bitmap) {
  std::fill(bitmap.begin(), bitmap.end(), ~std::uint64_t{0});
}

void MigratableVm::fetch_dirty_log_by_vcpu(std::size_t region, std::span<std::uint64_t> bitmap,
                                           std::span<const std::span<std::uint64_t>> vcpu_bitmaps) {
  fetch_dirty_log(region, bitmap);
  for (auto vcpu_bitmap : vcpu_bitmaps) std::fill(vcpu_bitmap.begin(), vcpu_bitmap.end(), 0);
}

void MigratableVm::prepare_pages(std::size_t, std::uint64_t, std::uint64_t) {}

void MigratableVm::discard_pages(std::size_t region, std::uint64_t first_page, std::uint64_t count) {
  std::byte* host = memory_regions().at(region).host + first_page * kPageSize;
  check_syscall("madvise(MADV_DONTNEED) of stale guest pages", [&] { return ::madvise(host, count * kPageSize, MADV_DONTNEED); });
}

std::optional<GuestHandover> MigratableVm::wait_guest_handover(std::chrono::milliseconds) { return std::nullopt; }

}  // namespace mig::engine
