#include "kvm/memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>

namespace mig::kvm {

namespace {
constexpr std::uint64_t kGiB = 1ull << 30;
constexpr std::uint64_t kLowMemoryEnd = 3 * kGiB;
constexpr std::uint64_t kHighMemoryStart = 4 * kGiB;

constexpr std::uint64_t kHugePageSize = 2ull << 20;
constexpr long kHugetlbfsMagic = 0x958458f6;  // HUGETLBFS_MAGIC from <linux/magic.h>

bool on_hugetlbfs(int fd) {
  struct statfs fs {};
  return ::fstatfs(fd, &fs) == 0 && fs.f_type == kHugetlbfsMagic;
}

// The selected word of a sysfs setting such as "always within_size advise [never] deny force";
// empty where the file is missing (a kernel without THP).
std::string selected_setting(const char* path) {
  std::ifstream file(path);
  std::string word;
  while (file >> word)
    if (word.size() > 2 && word.front() == '[' && word.back() == ']') return word.substr(1, word.size() - 2);
  return {};
}

std::string read_line(const std::string& path) {
  std::ifstream file(path);
  std::string line;
  std::getline(file, line);
  return line;
}

// Where huge-page memory comes from, in the operator's words, for errors and descriptions.
std::string huge_page_source(const std::string& dir) { return dir.empty() ? "--hugetlb" : "--mem-path " + dir; }

// Sealed at its size for good: a process it is handed to can trust that the file will not
// shrink under its mapping (a SIGBUS on the next access), and refuses one that could.
void seal_at_size(int memfd) {
  check_syscall("seal guest memfd", [&] { return ::fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL); });
}

// An unlinked file of huge pages, sized for one region: in the hugetlbfs mount at `dir`, or,
// with no `dir`, a memfd of the kernel's own hugetlbfs (MFD_HUGETLB), which unlike a file in
// a mount can be sealed.
UniqueFd huge_page_file(const std::string& dir, std::uint64_t size) {
  UniqueFd file;
  if (dir.empty()) {
    file = UniqueFd(::memfd_create("mig-guest", MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB));
    if (!file.valid()) throw_errno("memfd_create(MFD_HUGETLB) for --hugetlb");
  } else {
    struct statfs fs {};
    if (::statfs(dir.c_str(), &fs) != 0 || fs.f_type != kHugetlbfsMagic)
      throw std::invalid_argument("--mem-path " + dir + " is not a hugetlbfs mount (mount -t hugetlbfs none DIR)");
    file = UniqueFd(::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600));
    if (!file.valid()) throw_errno("create a file in " + dir);
  }
  struct statfs fs {};
  check_syscall("statfs", [&] { return ::fstatfs(file.get(), &fs); });
  const auto huge_page = static_cast<std::uint64_t>(fs.f_bsize);
  if (size % huge_page)
    throw std::invalid_argument("guest memory region of " + std::to_string(size) + " bytes is not a multiple of " +
                                huge_page_source(dir) + "'s " + std::to_string(huge_page >> 10) + " KiB pages");
  check_syscall("ftruncate hugetlbfs file", [&] { return ::ftruncate(file.get(), static_cast<off_t>(size)); });
  if (dir.empty()) seal_at_size(file.get());
  return file;
}

// Maps a hugetlbfs file without MAP_NORESERVE: the kernel then reserves every huge page at
// mmap time, so a host without enough of them fails here, clearly, and not with a SIGBUS
// inside the guest later.
Mapping map_hugetlbfs(int fd, std::uint64_t size, const std::string& dir) {
  struct statfs fs {};
  check_syscall("statfs", [&] { return ::fstatfs(fd, &fs); });
  const auto huge_page_kib = static_cast<std::uint64_t>(fs.f_bsize) >> 10;
  try {
    return Mapping::map(size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0, "mmap hugetlbfs file");
  } catch (const std::system_error& e) {
    if (e.code().value() != ENOMEM) throw;
    const std::string free_pages =
        read_line("/sys/kernel/mm/hugepages/hugepages-" + std::to_string(huge_page_kib) + "kB/free_hugepages");
    throw std::invalid_argument(huge_page_source(dir) + ": " + std::to_string((size >> 10) / huge_page_kib) + " huge pages of " +
                                std::to_string(huge_page_kib) + " KiB needed, " + (free_pages.empty() ? "none" : free_pages) +
                                " free (reserve them in /proc/sys/vm/nr_hugepages)");
  }
}

bool use_huge_pages_now(const MemoryOptions& options) {
  return options.transparent_huge_pages && !options.huge_pages_after_fill;
}

std::uint64_t host_memory_bytes() {
  return static_cast<std::uint64_t>(::sysconf(_SC_PHYS_PAGES)) * static_cast<std::uint64_t>(::sysconf(_SC_PAGE_SIZE));
}
}  // namespace

bool free_huge_blocks_reported_to_hypervisor() {
  constexpr std::size_t kVirtioBalloonReporting = 5;  // VIRTIO_BALLOON_F_REPORTING
  constexpr int kHugePageOrder = 9;
  const std::string order = read_line("/sys/module/page_reporting/parameters/page_reporting_order");
  if (!order.empty() && std::strtol(order.c_str(), nullptr, 10) > kHugePageOrder) return false;
  std::error_code ignored;
  for (const auto& device : std::filesystem::directory_iterator("/sys/bus/virtio/drivers/virtio_balloon", ignored)) {
    const std::string features = read_line((device.path() / "features").string());
    if (features.size() > kVirtioBalloonReporting && features[kVirtioBalloonReporting] == '1') return true;
  }
  return false;
}

std::string describe_page_size(const MemoryOptions& options) {
  if (options.backing == MemoryBacking::hugetlbfs)
    return options.hugetlbfs_dir.empty() ? "huge pages from a sealed memfd (MFD_HUGETLB)" : "hugetlbfs pages from " + options.hugetlbfs_dir;
  if (!options.transparent_huge_pages) return "4 KiB pages (transparent huge pages not asked for)";
  if (options.backing == MemoryBacking::anonymous) {
    const std::string thp = selected_setting("/sys/kernel/mm/transparent_hugepage/enabled");
    if (thp == "always" || thp == "madvise") return "transparent huge pages";
    return "4 KiB pages: transparent huge pages are [" + thp + "] on this host";
  }
  const std::string shmem = selected_setting("/sys/kernel/mm/transparent_hugepage/shmem_enabled");
  if (shmem == "always" || shmem == "within_size" || shmem == "advise" || shmem == "force")
    return "transparent huge pages (shmem)";
  return "4 KiB pages: this host's shmem_enabled is [" + shmem + "], so memfd memory gets no huge pages";
}

std::vector<RegionLayout> pc_memory_layout(std::uint64_t mem_bytes) {
  if (mem_bytes <= kLowMemoryEnd) return {{0, mem_bytes}};
  return {{0, kLowMemoryEnd}, {kHighMemoryStart, mem_bytes - kLowMemoryEnd}};
}

GuestMemory GuestMemory::create(std::span<const RegionLayout> layout, const MemoryOptions& options) {
  if (layout.empty()) throw std::invalid_argument("guest memory layout is empty");
  std::uint64_t total = 0;
  for (const auto& region : layout) {
    if (region.size == 0 || region.size % kPageSize || region.guest_addr % kPageSize)
      throw std::invalid_argument("guest memory region at " + std::to_string(region.guest_addr) + " of " +
                                  std::to_string(region.size) + " bytes is empty or not page-aligned");
    total += region.size;
  }
  if (total > host_memory_bytes())
    throw std::invalid_argument("guest memory of " + std::to_string(total >> 20) + " MiB exceeds this host's " +
                                std::to_string(host_memory_bytes() >> 20) + " MiB");
  GuestMemory memory;
  memory.backing_ = options.backing;
  memory.huge_pages_after_fill_ = options.transparent_huge_pages && options.huge_pages_after_fill;
  for (const auto& region : layout) memory.regions_.push_back(create_region(region, options));
  memory.init_vmm_write_log();
  return memory;
}

GuestMemory::Region GuestMemory::create_region(const RegionLayout& layout, const MemoryOptions& options) {
  Region r{layout, {}, {}};
  if (options.backing == MemoryBacking::hugetlbfs) {
    r.memfd = huge_page_file(options.hugetlbfs_dir, layout.size);
    r.mapping = map_hugetlbfs(r.memfd.get(), layout.size, options.hugetlbfs_dir);
    return r;
  }
  if (options.backing == MemoryBacking::memfd) {
    r.memfd = UniqueFd(check_syscall("memfd_create", [] { return ::memfd_create("mig-guest", MFD_CLOEXEC | MFD_ALLOW_SEALING); }));
    check_syscall("ftruncate guest memfd", [&] { return ::ftruncate(r.memfd.get(), static_cast<off_t>(layout.size)); });
    seal_at_size(r.memfd.get());
  }
  // MAP_NORESERVE: a guest rarely touches all of its memory, and we want untouched pages to
  // stay unbacked (and free to skip when migrating).
  const int flags = r.memfd.valid() ? MAP_SHARED | MAP_NORESERVE : MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
  r.mapping = Mapping::map_aligned(layout.size, kHugePageSize, PROT_READ | PROT_WRITE, flags,
                                   r.memfd.valid() ? r.memfd.get() : -1, "mmap guest memory");
  // Advice, not a demand: where the kernel offers no huge pages the memory works as before.
  ::madvise(r.host(), layout.size, use_huge_pages_now(options) ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  return r;
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
    // A memfd the peer could still shrink would turn our next access into a SIGBUS. A file in
    // a hugetlbfs mount (--mem-path) cannot be sealed at all (the kernel gives it F_SEAL_SEAL
    // alone): it is taken as it is, from the peer whose credentials the socket checked. (A
    // --hugetlb memfd is sealed like any of mig's memfds.)
    const int seals = ::fcntl(fds[i], F_GET_SEALS);
    const bool huge_pages = on_hugetlbfs(fds[i]);
    const bool unsealable = seals >= 0 && (seals & F_SEAL_SEAL) && huge_pages;
    if (seals >= 0 && !(seals & F_SEAL_SHRINK) && !unsealable)
      throw std::invalid_argument("shared memory file " + std::to_string(i) +
                                  " is a memfd not sealed against shrinking (F_SEAL_SHRINK): the peer could truncate it under the guest");
    // Huge pages anywhere make the whole guest's memory hugetlbfs: it cannot drop 4 KiB pages
    // or take post-copy, whichever region is asked.
    if (huge_pages) memory.backing_ = MemoryBacking::hugetlbfs;
    Region r{layout[i], {}, UniqueFd(check_syscall("dup memory fd", [&] { return ::fcntl(fds[i], F_DUPFD_CLOEXEC, 0); }))};
    r.mapping = Mapping::map(layout[i].size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, r.memfd.get(), 0,
                             "mmap shared guest memory");
    memory.regions_.push_back(std::move(r));
  }
  memory.init_vmm_write_log();
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

void GuestMemory::init_vmm_write_log() {
  for (const auto& r : regions_)
    vmm_writes_.push_back(std::make_unique<std::atomic<std::uint64_t>[]>((r.layout.size / kPageSize + 63) / 64));
  vmm_wrote_ = std::make_unique<std::atomic<bool>[]>(regions_.size());
}

void GuestMemory::note_vmm_write(std::uint64_t guest_addr, std::uint64_t len) {
  if (len == 0 || !translate(guest_addr, len)) return;
  for (std::size_t i = 0; i < regions_.size(); ++i) {
    const auto& l = regions_[i].layout;
    if (guest_addr < l.guest_addr || guest_addr - l.guest_addr >= l.size) continue;
    const std::uint64_t first = (guest_addr - l.guest_addr) / kPageSize, last = (guest_addr - l.guest_addr + len - 1) / kPageSize;
    // Sequentially consistent, all of it: the bits, then the flag, against a take that
    // clears the flag, then scans. Either the scan finds a bit, or the flag stays set for the
    // next take, even where this write saw the flag still set and left it alone (stored only
    // when clear, since every vCPU of a synthetic guest with a bitmap comes through here, and
    // one cache line written by all of them on every page cost two thirds of their pace).
    for (std::uint64_t page = first; page <= last; ++page) vmm_writes_[i][page / 64].fetch_or(1ull << (page % 64));
    if (!vmm_wrote_[i].load()) vmm_wrote_[i].store(true);
    return;
  }
}

void GuestMemory::take_vmm_writes(std::size_t index, std::span<std::uint64_t> bitmap) {
  const std::size_t words = std::min<std::size_t>(bitmap.size(), (regions_.at(index).layout.size / kPageSize + 63) / 64);
  if (!vmm_wrote_[index].exchange(false)) return;
  for (std::size_t w = 0; w < words; ++w) bitmap[w] |= vmm_writes_[index][w].exchange(0);
}

// The flag stays set: bits may stay set after a peek, and a forget may leave some.
void GuestMemory::peek_vmm_writes(std::size_t index, std::span<std::uint64_t> bitmap) const {
  const std::size_t words = std::min<std::size_t>(bitmap.size(), (regions_.at(index).layout.size / kPageSize + 63) / 64);
  if (!vmm_wrote_[index].load()) return;
  for (std::size_t w = 0; w < words; ++w) bitmap[w] |= vmm_writes_[index][w].load();
}

void GuestMemory::forget_vmm_writes(std::size_t index, std::uint64_t first_page, std::span<const std::uint64_t> pages) {
  const std::size_t words = (regions_.at(index).layout.size / kPageSize + 63) / 64, first = first_page / 64;
  if (first_page % 64 != 0) throw std::invalid_argument("pages to forget must start at a multiple of 64");
  for (std::size_t w = 0; w < pages.size() && first + w < words; ++w)
    if (pages[w]) vmm_writes_[index][first + w].fetch_and(~pages[w]);
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

namespace {
void populate_range(std::byte* start, std::uint64_t bytes) {
  if (::madvise(start, bytes, MADV_POPULATE_WRITE) == 0) return;
  if (errno != EINVAL) throw_errno("madvise(MADV_POPULATE_WRITE)");
  // Kernels before 5.14: touch each page instead. Adding zero keeps concurrent writes intact.
  for (std::uint64_t offset = 0; offset < bytes; offset += kPageSize)
    __atomic_fetch_add(reinterpret_cast<unsigned char*>(start + offset), 0, __ATOMIC_RELAXED);
}
}  // namespace

void GuestMemory::populate() {
  for (std::size_t i = 0; i < regions_.size(); ++i) populate(i, 0, regions_[i].layout.size / kPageSize);
  fully_populated_ = true;
}

void GuestMemory::populate(std::size_t index, std::uint64_t first, std::uint64_t count) const {
  const Region& r = regions_.at(index);
  if (first > r.layout.size / kPageSize || count > r.layout.size / kPageSize - first)
    throw std::out_of_range("populate: pages outside the region");
  if (fully_populated_) return;
  populate_range(r.host() + first * kPageSize, count * kPageSize);
}

void GuestMemory::discard(std::size_t index, std::uint64_t first, std::uint64_t count) const {
  const Region& r = regions_.at(index);
  if (first > r.layout.size / kPageSize || count > r.layout.size / kPageSize - first)
    throw std::out_of_range("discard: pages outside the region");
  const auto offset = static_cast<off_t>(first * kPageSize), bytes = static_cast<off_t>(count * kPageSize);
  switch (backing_) {
    case MemoryBacking::anonymous:
      check_syscall("madvise(MADV_DONTNEED)", [&] { return ::madvise(r.host() + first * kPageSize, count * kPageSize, MADV_DONTNEED); });
      break;
    case MemoryBacking::memfd:
      check_syscall("fallocate(PUNCH_HOLE)", [&] { return ::fallocate(r.memfd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, bytes); });
      break;
    case MemoryBacking::hugetlbfs: throw std::invalid_argument("4 KiB pages of hugetlbfs memory cannot be dropped");
  }
}

void GuestMemory::advise_huge_pages() {
  if (!std::exchange(huge_pages_after_fill_, false)) return;
  for (const auto& r : regions_) ::madvise(r.host(), r.layout.size, MADV_HUGEPAGE);
}

void GuestMemory::populated_pages(std::size_t index, std::span<std::uint64_t> bitmap, PageScan scan) const {
  const Region& region = regions_.at(index);
  const std::uint64_t pages = region.layout.size / kPageSize;
  if (bitmap.size() * 64 < pages) throw std::invalid_argument("populated-page bitmap too small");
  std::fill(bitmap.begin(), bitmap.end(), 0);
  if (shareable())
    mark_populated_file(region.host(), region.memfd.get(), pages, bitmap);
  else
    mark_populated_anonymous(region.host(), pages, bitmap, scan);
}

}  // namespace mig::kvm
