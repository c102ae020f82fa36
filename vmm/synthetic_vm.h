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
// Its writes are logged in software (GuestMemory's VMM-write log) instead of by KVM's dirty
// log. Pausing, state, same-host hand-over and post-copy work as for a KVM guest. What it
// cannot show is anything about CPU state, devices or KVM itself; its state moves only
// between synthetic guests.
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "../kvm/memory.h"
#include "hosted_vm.h"
#include "image_disk.h"

namespace mig::vmm {

struct SyntheticWorkload {
  // The whole guest's dirtying rate once its memory is filled (the first pass runs as fast
  // as it can, as the workload guest's fill does); 0 keeps every pass that fast.
  double dirty_MBps = 20;
};

class SyntheticVm final : public HostedVm {
 public:
  // Source: a guest of `mem_bytes` on the PC memory layout, its vCPU threads running.
  static std::unique_ptr<SyntheticVm> boot(std::uint64_t mem_bytes, unsigned vcpus, const kvm::MemoryOptions& memory,
                                           SyntheticWorkload workload, std::vector<std::unique_ptr<kvm::DiskImage>> disks = {});
  // Destination: an empty guest of the source's shape; its workload arrives with its state.
  // Its disks as KvmVm::factory's are (open_incoming_disk).
  static engine::VmFactory factory(kvm::MemoryOptions memory, std::vector<kvm::DiskConfig> disks = {});
  ~SyntheticVm() override;

  const kvm::GuestMemory& guest_memory() const override { return memory_; }
  const kvm::Probe& probe() const override { return probe_; }
  std::optional<std::string> failure() const override { return std::nullopt; }  // its threads cannot crash the guest

  unsigned vcpu_count() const override { return static_cast<unsigned>(sweeps_.size()); }
  void start_dirty_log() override;
  void stop_dirty_log() override {}
  void fetch_dirty_log(std::size_t region, std::span<std::uint64_t> bitmap) override;
  std::vector<int> vcpu_threads() const override;
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

  SyntheticVm(kvm::GuestMemory memory, unsigned vcpus, SyntheticWorkload workload,
              std::vector<std::unique_ptr<kvm::DiskImage>> disks);
  void start_vcpus();
  void run_vcpu(unsigned index, std::stop_token stop);
  bool park_while_paused(std::stop_token stop);
  void sweep_page(unsigned index);
  void disk_step();
  DiskWork decode_disk_work(std::span<const std::byte> data) const;
  void report(unsigned vcpu, std::uint16_t port, std::uint32_t value);
  std::uint64_t* page_word(std::uint64_t page, std::uint64_t& guest_addr) const;

  kvm::GuestMemory memory_;
  SyntheticWorkload workload_;
  kvm::Probe probe_;
  std::vector<Share> shares_;
  std::vector<Sweep> sweeps_;  // each written by its own vCPU thread only, read while paused
  std::vector<std::unique_ptr<ImageDisk>> disks_;
  DiskWork disk_work_;  // vCPU 0's

  mutable std::mutex mutex_;
  std::condition_variable_any changed_;
  bool pause_requested_ = true;  // until the vCPUs start
  unsigned parked_ = 0;
  std::vector<int> thread_ids_;
  std::vector<std::jthread> vcpus_;  // last: stopped and joined before the rest goes
};

}  // namespace mig::vmm
