#include "kvm/memory.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>

#include <stdexcept>
#include <string>

namespace mig::kvm {

namespace {
constexpr std::uint64_t kGiB = 1ull << 30;
constexpr std::uint64_t kLowMemoryEnd = 3 * kGiB;
constexpr std::uint64_t kHighMemoryStart = 4 * kGiB;

// PAGEMAP_SCAN (Linux 6.7) from <linux/fs.h>, which Debian 12's headers predate. It returns
// runs of pages in the asked categories: a 2 GiB region takes 4 ms instead of 14 ms of
// reading one pagemap entry per page.
struct PageRegion {
  std::uint64_t start, end, categories;
};
struct PagemapScanArg {
  std::uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted, category_mask,
      category_anyof_mask, return_mask;
};
constexpr std::uint64_t kPageIsPresent = 1 << 3, kPageIsSwapped = 1 << 4;
constexpr unsigned long kPagemapScan = _IOWR('f', 16, PagemapScanArg);

// Sets the bits of `bitmap` (one per page from `base`) for every page that is present or
// swapped. Returns false where the kernel has no PAGEMAP_SCAN.
bool scan_populated(int pagemap, const std::byte* base, std::uint64_t pages, std::span<std::uint64_t> bitmap) {
  std::vector<PageRegion> runs(4096);
  PagemapScanArg arg{};
  arg.size = sizeof arg;
  arg.start = reinterpret_cast<std::uint64_t>(base);
  arg.end = arg.start + pages * kPageSize;
  arg.vec = reinterpret_cast<std::uint64_t>(runs.data());
  arg.vec_len = runs.size();
  arg.category_anyof_mask = arg.return_mask = kPageIsPresent | kPageIsSwapped;
  for (;;) {
    const int found = ::ioctl(pagemap, kPagemapScan, &arg);
    if (found < 0) {
      if (errno == ENOTTY || errno == EINVAL) return false;
      throw_errno("ioctl(PAGEMAP_SCAN)");
    }
    for (const auto& run : std::span(runs).first(static_cast<std::size_t>(found)))
      for (std::uint64_t page = (run.start - reinterpret_cast<std::uint64_t>(base)) / kPageSize,
                         end = (run.end - reinterpret_cast<std::uint64_t>(base)) / kPageSize;
           page < end; ++page)
        bitmap[page / 64] |= std::uint64_t{1} << (page % 64);
    if (arg.walk_end >= arg.end) return true;
    arg.start = arg.walk_end;
  }
}

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
  memory.backing_ = backing;
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

GuestMemory GuestMemory::adopt(std::span<const RegionLayout> layout, std::span<const int> fds) {
  if (fds.size() != layout.size()) throw std::invalid_argument("one memory fd per region is needed");
  GuestMemory memory;
  memory.backing_ = MemoryBacking::memfd;
  for (std::size_t i = 0; i < layout.size(); ++i) {
    struct stat st {};
    check_syscall("fstat memory fd", [&] { return ::fstat(fds[i], &st); });
    if (static_cast<std::uint64_t>(st.st_size) < layout[i].size || layout[i].size % kPageSize)
      throw std::invalid_argument("shared memory file " + std::to_string(i) + " is smaller than its region");
    Region r{layout[i], {}, UniqueFd(check_syscall("dup memory fd", [&] { return ::fcntl(fds[i], F_DUPFD_CLOEXEC, 0); }))};
    r.mapping = Mapping::map(layout[i].size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, r.memfd.get(), 0,
                             "mmap shared guest memory");
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

namespace mig::kvm {

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older libc headers lack the name
#endif

void GuestMemory::populate() {
  for (std::size_t i = 0; i < regions_.size(); ++i) populate(i, 0, regions_[i].layout.size / kPageSize);
  fully_populated_ = true;
}

void GuestMemory::populate(std::size_t index, std::uint64_t first, std::uint64_t count) const {
  const Region& r = regions_.at(index);
  if (first > r.layout.size / kPageSize || count > r.layout.size / kPageSize - first)
    throw std::out_of_range("populate: pages outside the region");
  if (fully_populated_) return;
  std::byte* start = r.host() + first * kPageSize;
  if (::madvise(start, count * kPageSize, MADV_POPULATE_WRITE) == 0) return;
  if (errno != EINVAL) throw_errno("madvise(MADV_POPULATE_WRITE)");
  // Kernels before 5.14: touch each page instead. Adding zero keeps concurrent writes intact.
  for (std::uint64_t page = 0; page < count; ++page)
    __atomic_fetch_add(reinterpret_cast<unsigned char*>(start + page * kPageSize), 0, __ATOMIC_RELAXED);
}

void GuestMemory::populated_pages(std::size_t index, std::span<std::uint64_t> bitmap, PageScan scan) const {
  const Region& region = regions_.at(index);
  const std::uint64_t pages = region.layout.size / kPageSize;
  if (bitmap.size() * 64 < pages) throw std::invalid_argument("populated-page bitmap too small");
  std::fill(bitmap.begin(), bitmap.end(), 0);
  constexpr std::uint64_t kChunk = 16384;
  auto set = [&](std::uint64_t page) { bitmap[page / 64] |= std::uint64_t{1} << (page % 64); };
  if (backing_ == MemoryBacking::memfd) {
    // Page-cache residency: also right for pages another process wrote into the memfd.
    std::vector<unsigned char> resident(kChunk);
    for (std::uint64_t first = 0; first < pages; first += kChunk) {
      const std::uint64_t n = std::min(kChunk, pages - first);
      check_syscall("mincore", [&] { return ::mincore(region.host() + first * kPageSize, n * kPageSize, resident.data()); });
      for (std::uint64_t i = 0; i < n; ++i)
        if (resident[i] & 1) set(first + i);
    }
    return;
  }
  // Present or swapped: neither means never touched.
  UniqueFd pagemap = UniqueFd::open("/proc/self/pagemap", O_RDONLY);
  if (scan == PageScan::best && scan_populated(pagemap.get(), region.host(), pages, bitmap)) return;
  // Kernels before 6.7: one pagemap entry per page, bit 63 = present, bit 62 = swapped.
  std::vector<std::uint64_t> entries(kChunk);
  const auto base = reinterpret_cast<std::uint64_t>(region.host()) / kPageSize;
  for (std::uint64_t first = 0; first < pages; first += kChunk) {
    const std::uint64_t n = std::min(kChunk, pages - first);
    const auto bytes = static_cast<ssize_t>(n * sizeof(std::uint64_t));
    const ssize_t got = check_syscall("read /proc/self/pagemap", [&] {
      return ::pread(pagemap.get(), entries.data(), static_cast<std::size_t>(bytes), static_cast<off_t>((base + first) * 8));
    });
    if (got != bytes) throw std::runtime_error("short read from /proc/self/pagemap");
    for (std::uint64_t i = 0; i < n; ++i)
      if (entries[i] >> 62) set(first + i);
  }
}

}  // namespace mig::kvm
