// mig's own VMM as an engine::MigratableVm: the one place where the engine's opaque state
// sections meet kvm::MachineState.
#pragma once

#include <memory>
#include <optional>

#include "../kvm/machine.h"
#include "dirty_limiter.h"
#include "hosted_vm.h"
#include "throttler.h"

namespace mig::vmm {

// A virtio-blk disk of the machine, as the engine sees it.
class KvmDisk final : public engine::MigratableDisk {
 public:
  explicit KvmDisk(kvm::VirtioBlk& device) : device_(device) {}
  std::uint64_t size() const override { return device_.image().size(); }
  std::string path() const override { return device_.image().config().path; }
  std::uint64_t chunk_bytes() const override { return kvm::VirtioBlk::kWriteChunk; }
  std::vector<engine::DiskExtent> data_extents() override;
  void track_writes(bool on) override { device_.track_writes(on); }
  void fetch_written(std::span<std::uint64_t> bitmap) override { device_.fetch_written(bitmap); }
  void read(std::uint64_t offset, std::span<std::byte> out) override { device_.image().read(offset, out); }
  void write(std::uint64_t offset, std::span<const std::byte> data) override { device_.image().write(offset, data); }
  void write_zeroes(std::uint64_t offset, std::uint64_t length) override { device_.image().write_zeroes(offset, length); }
  void release() override { device_.image().release(); }
  void reacquire() override { device_.image().reacquire(); }

 private:
  kvm::VirtioBlk& device_;
};

class KvmVm final : public HostedVm {
 public:
  // Disks are those the machine has now.
  explicit KvmVm(std::unique_ptr<kvm::Machine> machine);

  // The receiver's factory: an empty, not yet started machine of the sender's shape.
  // With `expected`, a machine of that shape is built now, its memory populated, so that a
  // receiver pays for it while it waits; it is used if the sender's shape matches, and
  // discarded otherwise.
  //
  // Disks: `disks[i]` is the image for the source's disk i. With --copy-storage-all it is
  // created (or an existing one, large enough, is written over); shared storage opens the
  // image named, by default the source's own path, and takes its lock at the switchover.
  // `dirty_ring_entries` (MachineConfig) serves a migration onward.
  static engine::VmFactory factory(std::string serial_path, kvm::MemoryOptions memory,
                                   std::optional<engine::VmShape> expected = std::nullopt,
                                   std::vector<kvm::DiskConfig> disks = {}, std::uint32_t dirty_ring_entries = 0);
  // The receiver's memory: what `wanted` asks for, except that where huge pages fill fresh
  // memory slower than small ones on this host (kvm::free_huge_blocks_reported_to_hypervisor),
  // incoming pages are faulted in 4 KiB pages and huge pages are asked for once the guest
  // runs. The machine factory() builds ahead fills while it waits, off the clock, and keeps
  // huge pages from the start.
  struct IncomingMemory {
    kvm::MemoryOptions options;
    std::string description;  // one line for operators: the page sizes and why
  };
  static IncomingMemory incoming_memory(kvm::MemoryOptions wanted);
  // The receiver's pre-flight check (ReceiverOptions::missing_cpu_features): what a guest's
  // CPUID asks that this host's KVM cannot give. Opens /dev/kvm when called.
  static std::vector<std::string> missing_cpu_features(const std::vector<wire::CpuidLeaf>& guest);
  // And ReceiverOptions::tsc_refusal: why this host cannot run a guest's TSC at `guest_khz`
  // (kvm::plan_tsc), or empty. Opens /dev/kvm when called.
  static std::string tsc_refusal(std::uint32_t guest_khz);
  // The shape of a guest of `mem_bytes` on the PC memory layout, as mig-send builds it.
  static engine::VmShape pc_shape(std::uint64_t mem_bytes, unsigned vcpus);

  kvm::Machine& machine() { return *machine_; }
  const kvm::GuestMemory& guest_memory() const override { return machine_->memory(); }
  const kvm::Probe& probe() const override { return machine_->probe(); }
  std::optional<std::string> failure() const override { return machine_->failure(); }

  unsigned vcpu_count() const override { return machine_->config().vcpus; }
  void start_dirty_log() override { machine_->set_dirty_logging(true); }
  void stop_dirty_log() override { machine_->set_dirty_logging(false); }
  void fetch_dirty_log(std::size_t region, std::span<std::uint64_t> bitmap) override {
    machine_->fetch_and_clear_dirty_log(region, bitmap);
  }
  void fetch_dirty_log_unarmed(std::size_t region, std::span<std::uint64_t> bitmap) override {
    machine_->fetch_dirty_log_unarmed(region, bitmap);
  }
  void rearm_dirty_pages(std::size_t region, std::uint64_t first_page, std::span<const std::uint64_t> pages) override {
    machine_->rearm_dirty_pages(region, first_page, pages);
  }
  bool dirty_log_names_vcpus() const override { return machine_->config().dirty_ring_entries > 0; }
  void fetch_dirty_log_by_vcpu(std::size_t region, std::span<std::uint64_t> bitmap,
                               std::span<const std::span<std::uint64_t>> vcpu_bitmaps) override;
  std::string postcopy_unsupported() const override;
  std::vector<wire::CpuidLeaf> guest_cpuid() const override;
  std::uint32_t guest_tsc_khz() const override { return machine_->guest_tsc_khz(); }
  std::vector<int> vcpu_threads() const override { return machine_->vcpu_thread_ids(); }
  // Holds the vCPUs for `share` of every 10 ms from a helper thread (auto-converge).
  bool set_throttle(double share) override;
  // With dirty rings: a helper looks at each vCPU's dirty count every 10 ms and holds back
  // those ahead of the cap (DirtyLimiter).
  bool set_vcpu_dirty_limit(double bytes_per_s) override;
  void pause() override;
  void resume() override;
  std::vector<engine::StateSection> save_state() override;
  void restore_state(const std::vector<engine::StateSection>& sections) override;
  std::vector<engine::MigratableDisk*> disks() override;

 private:
  std::unique_ptr<kvm::Machine> machine_;
  std::vector<std::unique_ptr<KvmDisk>> disks_;
  Throttler throttler_{[this] { machine_->pause(); }, [this] { machine_->resume(); }};  // after machine_: stopped before it goes
  DirtyLimiter dirty_limiter_{[this] { return machine_->pages_dirtied_by_vcpu(); },
                              [this](unsigned vcpu, DirtyLimiter::Clock::time_point until) { machine_->hold_vcpu(vcpu, until); }};
};

// The state sections, exposed for round-trip tests.
std::vector<engine::StateSection> encode_state(const kvm::MachineState& state);
kvm::MachineState decode_state(const std::vector<engine::StateSection>& sections);

}  // namespace mig::vmm
