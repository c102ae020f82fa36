// What the engine needs from a VM, and nothing more. mig's own VMM implements this
// (vmm/kvm_vm.h); a custom hypervisor embeds the engine by implementing it too, and tests
// use a fake. The engine never sees KVM, devices or threads.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "../transport/protocol.h"

namespace mig::engine {

inline constexpr std::uint64_t kPageSize = 4096;

struct MemoryRegion {
  std::uint64_t guest_addr = 0;
  std::uint64_t size = 0;  // a multiple of kPageSize
  // Host mapping of the whole region. Valid for the lifetime of the MigratableVm.
  std::byte* host = nullptr;
};

// Opaque, named, versioned state: the engine moves it, the VM interprets it.
struct StateSection {
  std::string name;
  std::uint32_t version = 0;
  std::vector<std::byte> data;
};

// What the destination learned from the guest's first heartbeat after the switchover.
struct GuestHandover {
  double gap_ms = 0;  // last heartbeat at the source to first at the destination, host clock
  bool sequence_continued = false;
  std::uint32_t last_source_seq = 0, first_destination_seq = 0;
};

struct DiskExtent {
  std::uint64_t offset = 0, length = 0;
};

// A guest disk, for storage migration. Offsets and lengths in bytes.
class MigratableDisk {
 public:
  virtual ~MigratableDisk() = default;
  virtual std::uint64_t size() const = 0;  // a multiple of 512
  virtual std::string path() const = 0;    // the image, for operators
  // The unit of write tracking: a power of two between 4 KiB and 1 MiB.
  virtual std::uint64_t chunk_bytes() const = 0;

  // Source. The ranges that may hold data (everything else reads as zero), found without
  // reading the disk. Tracking: once on, fetch_written() ORs into `bitmap` (a bit per chunk)
  // every chunk a completed guest write touched since the previous fetch. While the VM is
  // paused no write completes.
  virtual std::vector<DiskExtent> data_extents() = 0;
  virtual void track_writes(bool on) = 0;
  virtual void fetch_written(std::span<std::uint64_t> bitmap) = 0;
  virtual void read(std::uint64_t offset, std::span<std::byte> out) = 0;

  // Destination.
  virtual void write(std::uint64_t offset, std::span<const std::byte> data) = 0;
  virtual void write_zeroes(std::uint64_t offset, std::uint64_t length) = 0;  // leaves a hole

  // Shared storage, which only one host may write at a time. Source, paused: release()
  // flushes and gives the image's write lock up; reacquire() takes it back after a failure.
  // Destination: reacquire() takes it before the guest may run here. Both throw when another
  // holder has the lock.
  virtual void release() = 0;
  virtual void reacquire() = 0;
};

class MigratableVm {
 public:
  virtual ~MigratableVm() = default;

  virtual unsigned vcpu_count() const = 0;
  virtual std::vector<MemoryRegion> memory_regions() const = 0;

  // Dirty tracking. After start, fetch_dirty_log() sets a bit for every page of `region`
  // written since the previous fetch (or since start) and re-arms tracking for those pages.
  // Implementations OR in pages the VMM itself wrote, not only the guest's.
  virtual void start_dirty_log() = 0;
  virtual void stop_dirty_log() = 0;
  virtual void fetch_dirty_log(std::size_t region, std::span<std::uint64_t> bitmap) = 0;
  // Re-arming later, as KVM's manual dirty-log protection allows. fetch_dirty_log_unarmed()
  // reports as fetch_dirty_log() does, but may leave the pages it reports unarmed: reported
  // again by every later fetch, whatever is written meanwhile, until rearm_dirty_pages()
  // re-arms them (the pages set in `pages`, bit i for page `first_page` + i; `first_page` a
  // multiple of 64). The engine re-arms a page just before it reads it to send it, so a page
  // the guest writes between the fetch and its turn leaves once, with that write, rather than
  // again in the next round. The defaults re-arm at the fetch, which is always safe.
  virtual void fetch_dirty_log_unarmed(std::size_t region, std::span<std::uint64_t> bitmap) {
    fetch_dirty_log(region, bitmap);
  }
  virtual void rearm_dirty_pages(std::size_t /*region*/, std::uint64_t /*first_page*/,
                                 std::span<const std::uint64_t> /*pages*/) {}
  // Where the VM knows which vCPU dirtied a page (KVM's dirty ring), a fetch can say so, for
  // dirty traces that a simulator replays vCPU by vCPU: fetch_dirty_log()'s pages, but each
  // vCPU's in `vcpu_bitmaps[v]` (vcpu_count() of them, sized as `bitmap`) and the rest (the
  // VMM's own writes) in `bitmap`. The default names no vCPU: all go to `bitmap`.
  virtual bool dirty_log_names_vcpus() const { return false; }
  virtual void fetch_dirty_log_by_vcpu(std::size_t region, std::span<std::uint64_t> bitmap,
                                       std::span<const std::span<std::uint64_t>> vcpu_bitmaps);

  // Same-host hand-over: one fd per region (the region is the file from offset 0), valid
  // for the lifetime of the VM, or empty when memory cannot be shared (the default).
  virtual std::vector<int> shareable_memory_fds() const { return {}; }

  // Pages that may hold non-zero data. A page left clear here must read as zero; finding
  // that out must not fault the page in. The default claims every page.
  virtual void populated_pages(std::size_t region, std::span<std::uint64_t> bitmap);

  // Destination: back these pages with memory now, because data for them is on its way.
  // Called from a helper thread while pages are being received; the default does nothing.
  virtual void prepare_pages(std::size_t region, std::uint64_t first_page, std::uint64_t count);

  // Destination, post-copy: drops the contents of these pages (stale here), so that the
  // next touch of each finds it absent and traps. The default (MADV_DONTNEED) suits private
  // anonymous memory; memory in a shared file must punch holes instead.
  virtual void discard_pages(std::size_t region, std::uint64_t first_page, std::uint64_t count);
  // Why this VM's memory cannot take post-copy, or empty when it can.
  virtual std::string postcopy_unsupported() const { return {}; }
  // The CPUID the guest was given, for the destination's pre-flight check at Hello; empty
  // says nothing (and nothing is checked).
  virtual std::vector<wire::CpuidLeaf> guest_cpuid() const { return {}; }
  // The rate the guest's TSC ticks at (kHz), for the same check; 0 says nothing.
  virtual std::uint32_t guest_tsc_khz() const { return 0; }
  // The vCPUs' thread ids, in vCPU order, for per-vCPU post-copy blocktime; empty when unknown.
  virtual std::vector<int> vcpu_threads() const { return {}; }

  // Source, auto-converge: hold the vCPUs for `share` (0 to 1) of the time from now on, so a
  // guest that dirties memory faster than the link drains it slows down; 0 lets it run
  // freely again. pause() ends any throttling first. Returns false when this VM cannot
  // throttle (the default).
  virtual bool set_throttle(double /*share*/) { return false; }
  // Source, dirty-limit: cap the rate at which each vCPU dirties memory at `bytes_per_s`
  // from now on (0 lifts the cap). Unlike a throttle it holds back only the vCPUs that dirty
  // memory faster than that; the rest run freely. It needs to know which vCPU dirtied which
  // page (KVM's dirty ring). Returns false when this VM cannot (the default).
  virtual bool set_vcpu_dirty_limit(double /*bytes_per_s*/) { return false; }

  // Source: pause stops every vCPU and returns once they are stopped. Destination: resume
  // also starts vCPUs that never ran.
  virtual void pause() = 0;
  virtual void resume() = 0;

  // Requires a paused VM. restore_state() receives exactly what save_state() produced on the
  // source, possibly from an older version of the same VMM (check section versions).
  virtual std::vector<StateSection> save_state() = 0;
  virtual void restore_state(const std::vector<StateSection>& sections) = 0;

  // The VM's disks, in a fixed order; empty when it has none (the default).
  virtual std::vector<MigratableDisk*> disks() { return {}; }

  // Destination only: blocks until the guest proves it runs again, up to `timeout`. VMs
  // without a heartbeat return nullopt.
  virtual std::optional<GuestHandover> wait_guest_handover(std::chrono::milliseconds timeout);
};

// The page holding guest address `guest_addr`: its region and index there, or nullopt when
// the address lies outside every region. Every guest address a peer sends goes through here.
struct PageAddress {
  std::size_t region = 0;
  std::uint64_t page = 0;
};
std::optional<PageAddress> find_page(std::span<const MemoryRegion> regions, std::uint64_t guest_addr);

struct VmShape {
  unsigned vcpus = 0;
  struct Region {
    std::uint64_t guest_addr = 0, size = 0;
  };
  std::vector<Region> regions;
  // With a same-host hand-over: the source's memory fds, one per region, to be mapped
  // instead of allocating. Borrowed for the duration of the factory call (dup to keep).
  std::vector<int> shared_memory_fds;
  // The source's disks. `copy`: their data comes over the wire into images made here;
  // otherwise the images are shared and only change owner.
  struct Disk {
    std::uint64_t size = 0;
    std::uint64_t chunk_bytes = 0;
    bool copy = false;
    std::string source_path;
  };
  std::vector<Disk> disks;
};

// Builds an empty VM of the sender's shape on the receiving side.
using VmFactory = std::function<std::unique_ptr<MigratableVm>(const VmShape&)>;

}  // namespace mig::engine
