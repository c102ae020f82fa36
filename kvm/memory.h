// Guest physical memory: a few regions of host memory, each mapped once and registered with
// KVM as one slot. Pointers handed out stay valid for the lifetime of the GuestMemory.
#pragma once

#include <atomic>
#include <cstddef>
#include <memory>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "../common/fd.h"
#include "../common/populated_pages.h"

namespace mig::kvm {

inline constexpr std::uint64_t kPageSize = 4096;

enum class MemoryBacking {
  anonymous,  // private anonymous memory
  memfd,      // a memfd per region, shareable with another process over a UNIX socket
  // A file of huge pages per region, shareable like a memfd: in a hugetlbfs mount (QEMU's
  // -mem-path), or a sealed memfd of huge pages (MFD_HUGETLB; QEMU's memory-backend-memfd
  // with hugetlb=on) where no directory is given.
  hugetlbfs,
};

// How guest memory is backed. Huge pages matter here: a fault on fresh memory costs 4-9 us
// per 4 KiB page on these hosts, and a tenth of that per byte with 2 MiB pages, so a
// receiver filling fresh memory, and a guest touching it, run several times faster on them.
struct MemoryOptions {
  MemoryBacking backing = MemoryBacking::anonymous;
  // Ask for transparent huge pages (MADV_HUGEPAGE), as QEMU does for guest RAM. Anonymous
  // memory gets them wherever THP is not "never"; memfd memory only where the kernel's
  // shmem_enabled allows. KVM's dirty log stays at 4 KiB either way.
  bool transparent_huge_pages = true;
  std::string hugetlbfs_dir;  // with MemoryBacking::hugetlbfs: the mount to create the files in; empty: memfds
  // With transparent_huge_pages: fault memory in 4 KiB pages at first, and ask for huge pages
  // only from advise_huge_pages() on (a receiver, once its guest runs). See FillCost.
  bool huge_pages_after_fill = false;
};

// Whether this host is a VM that hands its free 2 MiB blocks back to its hypervisor (virtio
// balloon free page reporting, at the huge-page order or below). There, a huge page taken from
// memory that has been free a while is first touched at the cost of hypervisor faults: on
// this project's hosts, filling 1 GiB with huge pages took 1.5-2.5 s against 0.35-0.5 s with
// 4 KiB pages, while on bare metal, or memory freed moments ago, huge pages fill 3-4x faster.
bool free_huge_blocks_reported_to_hypervisor();

// Human-readable, for operators: which page size this backing will actually get here.
std::string describe_page_size(const MemoryOptions& options);

struct RegionLayout {
  std::uint64_t guest_addr = 0;
  std::uint64_t size = 0;
  friend bool operator==(const RegionLayout&, const RegionLayout&) = default;
};

// RAM below the 3 GiB PCI/APIC hole goes at 0; the rest continues at 4 GiB, like a PC.
std::vector<RegionLayout> pc_memory_layout(std::uint64_t mem_bytes);

class GuestMemory {
 public:
  struct Region {
    RegionLayout layout;
    Mapping mapping;
    UniqueFd memfd;  // the shareable backing file (memfd or hugetlbfs); none for anonymous memory
    std::byte* host() const { return mapping.data(); }
  };

  // Throws std::invalid_argument for an empty or unaligned layout, one larger than the host's
  // memory, a hugetlbfs directory that is not one, or too few reserved huge pages.
  static GuestMemory create(std::span<const RegionLayout> layout, const MemoryOptions& options = {});
  // Maps existing memory files, one per region (another VMM's memfds, for a same-host
  // hand-over). The fds are duplicated; the caller keeps its own.
  static GuestMemory adopt(std::span<const RegionLayout> layout, std::span<const int> fds);

  const std::vector<Region>& regions() const { return regions_; }
  std::uint64_t total_bytes() const;
  std::vector<RegionLayout> layout() const;
  MemoryBacking backing() const { return backing_; }
  bool shareable() const { return backing_ != MemoryBacking::anonymous; }

  // Host address of [guest_addr, guest_addr + len) when it lies inside one region, else
  // nullptr. Every guest-supplied address goes through here before it is dereferenced.
  std::byte* translate(std::uint64_t guest_addr, std::uint64_t len) const;

  using PageScan = mig::PageScan;  // how populated_pages() asks about anonymous memory
  // Sets bit i of `bitmap` for every page i of region `index` that has ever been backed by
  // memory; the others have never been touched and read as zero. Asks the kernel (pagemap
  // for anonymous memory; for a file, mincore, and its SEEK_DATA where some of its data is
  // swapped out or not mapped here) instead of touching the pages, which would cost a fault
  // each.
  void populated_pages(std::size_t index, std::span<std::uint64_t> bitmap, PageScan scan = PageScan::best) const;

  // Asks for transparent huge pages from now on (new faults, and khugepaged for the rest), for
  // memory created with huge_pages_after_fill. Nothing to do for other memory.
  void advise_huge_pages();

  // Backs every page with memory now (MADV_POPULATE_WRITE), so that writing it later costs
  // no page fault. On these hosts a fault on fresh memory costs 4-9 us: populating ahead,
  // while a receiver waits for its source, takes that off the migration's clock.
  void populate();
  // The same for `count` pages of region `index` from page `first`. Nothing to do after
  // populate(): walking populated pages again still costs 40-90 ms per GiB here.
  void populate(std::size_t index, std::uint64_t first, std::uint64_t count) const;

  // Pages the VMM itself wrote (a device's DMA), which KVM's dirty log never sees: noted
  // here, and ORed into a bitmap and cleared by take_vmm_writes(), with the dirty log. A
  // region the VMM wrote nothing to since is not scanned, so a take costs what was written
  // (a dirty ring's harvest would otherwise pay for the whole guest every round).
  void note_vmm_write(std::uint64_t guest_addr, std::uint64_t len);
  void take_vmm_writes(std::size_t index, std::span<std::uint64_t> bitmap);
  // The same in two steps, for a VM whose every write comes through here (a synthetic guest)
  // and whose dirty log re-arms later (engine/vm.h): the peek leaves the bits set, and
  // forget_vmm_writes() clears those set in `pages` (bit i for page `first_page` + i,
  // `first_page` a multiple of 64).
  void peek_vmm_writes(std::size_t index, std::span<std::uint64_t> bitmap) const;
  void forget_vmm_writes(std::size_t index, std::uint64_t first_page, std::span<const std::uint64_t> pages);

  // Drops the contents of `count` pages of region `index` from page `first`: afterwards they
  // are absent (and read as zero, or trap under userfaultfd). Anonymous memory unmaps them;
  // a memfd punches a hole, since unmapping alone would leave the page cache holding them.
  // Throws for hugetlbfs, whose pages are 2 MiB.
  void discard(std::size_t index, std::uint64_t first, std::uint64_t count) const;

 private:
  static Region create_region(const RegionLayout& layout, const MemoryOptions& options);

  void init_vmm_write_log();

  std::vector<Region> regions_;
  std::vector<std::unique_ptr<std::atomic<std::uint64_t>[]>> vmm_writes_;  // a bit per page, per region
  std::unique_ptr<std::atomic<bool>[]> vmm_wrote_;  // per region: a bit may be set
  MemoryBacking backing_ = MemoryBacking::anonymous;
  bool fully_populated_ = false;
  bool huge_pages_after_fill_ = false;
};

}  // namespace mig::kvm
