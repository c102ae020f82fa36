#include "kvm/memory.h"

#include <sys/mman.h>
#include <unistd.h>

#include <stdexcept>
#include <string>

namespace mig::kvm {

namespace {
constexpr std::uint64_t kGiB = 1ull << 30;
constexpr std::uint64_t kLowMemoryEnd = 3 * kGiB;
constexpr std::uint64_t kHighMemoryStart = 4 * kGiB;

std::uint64_t host_memory_bytes() {
  return static_cast<std::uint64_t>(::sysconf(_SC_PHYS_PAGES)) * static_cast<std::uint64_t>(::sysconf(_SC_PAGE_SIZE));
}
}  // namespace

std::vector<RegionLayout> pc_memory_layout(std::uint64_t mem_bytes) {
  if (mem_bytes <= kLowMemoryEnd) return {{0, mem_bytes}};
  return {{0, kLowMemoryEnd}, {kHighMemoryStart, mem_bytes - kLowMemoryEnd}};
}

GuestMemory GuestMemory::create(std::span<const RegionLayout> layout, MemoryBacking backing) {
  if (layout.empty()) throw std::invalid_argument("guest memory layout is empty");
  std::uint64_t total = 0;
  for (const auto& region : layout) {
    if (region.size == 0 || region.size % kPageSize || region.guest_addr % kPageSize)
      throw std::invalid_argument("guest memory region at " + std::to_string(region.guest_addr) + " of " +
                                  std::to_string(region.size) + " bytes is empty or not page-aligned");
    total += region.size;
  }
  if (total > host_memory_bytes())
    throw std::invalid_argument("guest memory of " + std::to_string(total >> 20) + " MiB exceeds the host's " +
                                std::to_string(host_memory_bytes() >> 20) + " MiB");
  GuestMemory memory;
  for (const auto& region : layout) {
    Region r{region, {}, {}};
    // MAP_NORESERVE: a guest rarely touches all of its memory, and we want untouched pages to
    // stay unbacked (and free to skip when migrating).
    if (backing == MemoryBacking::memfd) {
      r.memfd = UniqueFd(check_syscall("memfd_create", [] { return ::memfd_create("mig-guest", MFD_CLOEXEC); }));
      check_syscall("ftruncate guest memfd",
                    [&] { return ::ftruncate(r.memfd.get(), static_cast<off_t>(region.size)); });
      r.mapping = Mapping::map(region.size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, r.memfd.get(), 0,
                               "mmap guest memfd");
    } else {
      r.mapping = Mapping::map(region.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                               -1, 0, "mmap guest memory");
    }
    memory.regions_.push_back(std::move(r));
  }
  return memory;
}

std::uint64_t GuestMemory::total_bytes() const {
  std::uint64_t total = 0;
  for (const auto& r : regions_) total += r.layout.size;
  return total;
}

std::vector<RegionLayout> GuestMemory::layout() const {
  std::vector<RegionLayout> out;
  for (const auto& r : regions_) out.push_back(r.layout);
  return out;
}

std::byte* GuestMemory::translate(std::uint64_t guest_addr, std::uint64_t len) const {
  for (const auto& r : regions_) {
    const auto& l = r.layout;
    // Written so that no sum can overflow: guest_addr and len come from untrusted input.
    if (guest_addr >= l.guest_addr && guest_addr - l.guest_addr <= l.size && len <= l.size - (guest_addr - l.guest_addr))
      return r.host() + (guest_addr - l.guest_addr);
  }
  return nullptr;
}

}  // namespace mig::kvm
