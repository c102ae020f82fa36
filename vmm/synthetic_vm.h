// A guest without KVM, for hosts that have none (a nested cloud VM, a CI runner) and for
// testing the migration path itself - links that fail, peers that die - where what runs
// inside the guest does not matter. Host threads stand in for its vCPUs. Each runs the
// workload guest's sweep over its share of memory: every page must still hold the pass
// number it was left with, or the thread reports a self-check failure, so a page lost or
// stale after a migration shows. Each sends a heartbeat through mig's probe every
// millisecond, so the tools measure its pauses as they measure a KVM guest's. With a disk,
// vCPU 0 also does what the workload guest's disk=1 does: it writes 64 KiB blocks holding
// their number and a generation, and reads each back after writing the next, checking it.
//
// The last `compute_vcpus` vCPUs compute instead: they touch no memory, and report the work
// they get done through the probe (MIG_PROBE_WORK), the measure of what slowing the guest
// down costs the vCPUs that do not dirty memory.
//
// Its writes are logged in software instead of by KVM: in GuestMemory's VMM-write log, a
// bitmap, or in per-vCPU dirty rings that behave as KVM's (vmm/soft_dirty_rings.h). Only with
// rings does it know which vCPU dirtied what, and so take a per-vCPU dirty limit. It throttles
// as a KVM guest does (vmm/throttler.h). Pausing, state, same-host hand-over and post-copy
// work as for a KVM guest. What it cannot show is anything about CPU state, devices or KVM
// itself; its state moves only between synthetic guests.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "../kvm/memory.h"
#include "hosted_vm.h"
#include "image_disk.h"
#include "dirty_limiter.h"
#include "soft_dirty_rings.h"
#include "throttler.h"

namespace mig::vmm {

struct SyntheticWorkload {
  // The whole guest's dirtying rate once its memory is filled (the first pass runs as fast
  // as it can, as the workload guest's fill does); 0 keeps every pass that fast.
  double dirty_MBps = 20;
  unsigned compute_vcpus = 0;  // the last ones: they compute instead of sweeping; at least one vCPU sweeps
};

// How a VMM finds the pages its guest dirtied: one bitmap for the whole guest, or KVM's
// per-vCPU dirty rings of `ring_entries` each.
struct DirtyTracking {
  enum class Kind { bitmap, ring } kind = Kind::bitmap;
  std::uint32_t ring_entries = 4096;  // QEMU's usual dirty-ring-size
};

class SyntheticVm final : public HostedVm {
 public:
  // Source: a guest of `mem_bytes` on the PC memory layout, its vCPU threads running.
  static std::unique_ptr<SyntheticVm> boot(std::uint64_t mem_bytes, unsigned vcpus, const kvm::MemoryOptions& memory,
                                           SyntheticWorkload workload, std::vector<std::unique_ptr<kvm::DiskImage>> disks = {},
                                           DirtyTracking tracking = {});
  // Destination: an empty guest of the source's shape; its workload arrives with its state.
  // Its disks as KvmVm::factory's are (open_incoming_disks). `tracking` serves a migration onward.
  static engine::VmFactory factory(kvm::MemoryOptions memory, std::vector<kvm::DiskConfig> disks = {},
                                   DirtyTracking tracking = {});
  ~SyntheticVm() override;

  const kvm::GuestMemory& guest_memory() const override { return memory_; }
  const kvm::Probe& probe() const override { return probe_; }
  std::optional<std::string> failure() const override { return std::nullopt; }  // its threads cannot crash the guest

  unsigned vcpu_count() const override { return static_cast<unsigned>(sweeps_.size()); }
  void start_dirty_log() override;
  void stop_dirty_log() override;
  void fetch_dirty_log(std::size_t region, std::span<std::uint64_t> bitmap) override;
  // Re-arming waits for the engine, as KVM's manual protection lets it (with rings, as
  // kvm::DirtyRingHarvester keeps pages unarmed).
  void fetch_dirty_log_unarmed(std::size_t region, std::span<std::uint64_t> bitmap) override;
  void rearm_dirty_pages(std::size_t region, std::uint64_t first_page, std::span<const std::uint64_t> pages) override;
  bool dirty_log_names_vcpus() const override { return rings_ != nullptr; }
  void fetch_dirty_log_by_vcpu(std::size_t region, std::span<std::uint64_t> bitmap,
                               std::span<const std::span<std::uint64_t>> vcpu_bitmaps) override;
  std::vector<int> vcpu_threads() const override;
  bool set_throttle(double share) override;
  // Needs dirty rings: each vCPU then waits, at its heartbeat, until the pages it published
  // since the cap was set fit in the cap. QEMU sleeps at ring-full exits instead, by a time
  // it adjusts once a second; pacing every millisecond here holds the cap without that lag.
  bool set_vcpu_dirty_limit(double bytes_per_s) override;
  void pause() override;
  void resume() override;
  std::vector<engine::StateSection> save_state() override;
  void restore_state(const std::vector<engine::StateSection>& sections) override;
  std::vector<engine::MigratableDisk*> disks() override;

 private:
  // One vCPU's part of memory, in pages of the whole: it follows from the guest's shape, so
  // each side works it out and it never travels.
  struct Share {
    std::uint64_t first_page = 0, pages = 0;
  };
  // Where one vCPU's sweep stands (its state section): the next page of its share, the pass
  // it is in, and its last heartbeat.
  struct Sweep {
    std::uint64_t position = 0, pass = 0;
    std::uint64_t heartbeat_seq = 0;  // as wide as the rest: the section has no padding
  };

  // Where vCPU 0's disk work stands, on the first disk: the generation each block last got
  // (0: never written), the next block to write, and the one to read back after it.
  struct DiskWork {
    std::vector<std::uint32_t> generations;
    std::uint64_t next_block = 0, previous_block = kNoBlock;
    std::uint32_t checks = 0;
    bool failed = false;  // an I/O error, reported once; the disk is left alone after it
    static constexpr std::uint64_t kNoBlock = ~0ull;
  };

  // A page of the guest as a sweep sees it: its first word, its address, its region and index there.
  struct GuestPage {
    std::uint64_t* word = nullptr;
    std::uint64_t guest_addr = 0;
    std::uint32_t region = 0;
    std::uint64_t index = 0;
  };

  SyntheticVm(kvm::GuestMemory memory, unsigned vcpus, SyntheticWorkload workload,
              std::vector<std::unique_ptr<kvm::DiskImage>> disks, DirtyTracking tracking);
  static std::vector<Share> plan_shares(std::uint64_t pages, unsigned vcpus, unsigned computing);
  bool computes(unsigned index) const { return index >= sweeps_.size() - workload_.compute_vcpus; }
  void start_vcpus();
  void pause_vcpus();
  void resume_vcpus();
  void run_vcpu(unsigned index, std::stop_token stop);
  bool park_while_paused(std::stop_token stop);
  void sweep_period(unsigned index, std::chrono::steady_clock::time_point until, double& credit);
  void compute_period(unsigned index, std::chrono::steady_clock::time_point until);
  bool hold_to_dirty_limit(unsigned index, DirtyPacing& pacing, std::stop_token stop);
  void sweep_page(unsigned index);
  void disk_step();
  DiskWork decode_disk_work(std::span<const std::byte> data) const;
  void report(unsigned vcpu, std::uint16_t port, std::uint32_t value);
  GuestPage guest_page(std::uint64_t page) const;  // `page` counts over all regions

  kvm::GuestMemory memory_;
  SyntheticWorkload workload_;
  kvm::Probe probe_;
  std::vector<Share> shares_;
  std::vector<Sweep> sweeps_;  // each written by its own vCPU thread only, read while paused
  std::vector<std::unique_ptr<ImageDisk>> disks_;
  DiskWork disk_work_;  // vCPU 0's
  std::unique_ptr<SoftDirtyRings> rings_;  // with DirtyTracking::Kind::ring
  std::atomic<double> dirty_limit_pages_per_s_{0};

  mutable std::mutex mutex_;
  std::condition_variable_any changed_;
  bool pause_requested_ = true;  // until the vCPUs start
  unsigned parked_ = 0;
  std::vector<int> thread_ids_;
  std::vector<std::jthread> vcpus_;  // stopped and joined before the rest goes, but for:
  Throttler throttler_{[this] { pause_vcpus(); }, [this] { resume_vcpus(); }};  // stopped first
};

}  // namespace mig::vmm
