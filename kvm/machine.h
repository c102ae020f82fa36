// mig's minimal VMM: guest memory, a VM with an in-kernel irqchip, one thread per vCPU, the
// serial port and the probe. It boots a multiboot image or takes its state from a saved
// MachineState, and it can pause, save, restore and resume as a whole.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "../kvm/cpu_model.h"
#include "../kvm/devices.h"
#include "../kvm/dirty_ring.h"
#include "../kvm/disk_image.h"
#include "../kvm/memory.h"
#include "../kvm/multiboot.h"
#include "../kvm/pci.h"
#include "../kvm/state.h"
#include "../kvm/system.h"
#include "../kvm/vcpu.h"
#include "../kvm/virtio_blk.h"
#include "../kvm/vm.h"

namespace mig::kvm {

inline constexpr unsigned kMaxVcpus = 16;  // what the workload guest supports

struct MachineConfig {
  std::vector<RegionLayout> layout;  // guest RAM; see pc_memory_layout()
  unsigned vcpus = 1;
  std::string serial_path;  // see Serial16550
  MemoryOptions memory;
  std::string kvm_path = "/dev/kvm";
  // Non-empty: map these memory files (one per region) instead of allocating memory, for a
  // same-host hand-over. Borrowed during create(); the machine keeps duplicates.
  std::vector<int> shared_memory_fds;
  // The CPU the guest is given; none: all this host's KVM supports (--cpu host).
  std::optional<CpuModel> cpu_model;
  // How dirty pages are found: 0, KVM's dirty bitmap; otherwise a dirty ring of this many
  // entries per vCPU (Vm::create), which names the vCPU that dirtied each page.
  std::uint32_t dirty_ring_entries = 0;
};

struct MachineState {
  VmState vm;
  std::vector<VcpuState> vcpus;
  SerialState serial;
  std::vector<HeartbeatState> probe;
  std::vector<VirtioBlkState> disks;
};

class Machine {
 public:
  // Creates VM, memory and vCPUs; no vCPU runs until start(). Throws with a one-line reason
  // for a bad configuration (std::invalid_argument) or an unusable /dev/kvm.
  static std::unique_ptr<Machine> create(const MachineConfig& config);
  ~Machine();
  Machine(const Machine&) = delete;
  Machine& operator=(const Machine&) = delete;

  // Loads the image and puts vCPU 0 at its entry; the other vCPUs wait for INIT/SIPI, as
  // application processors do on real hardware.
  void boot(const MultibootImage& image, const std::string& cmdline);

  // Attaches a virtio-blk disk on `image`, in the next PCI slot; before start() or
  // restore_state(). Disks appear in the order attached.
  void attach_disk(std::unique_ptr<DiskImage> image);
  std::size_t disk_count() const { return disks_.size(); }
  VirtioBlk& disk(std::size_t index) { return *disks_.at(index); }

  // Dirty logging, from the bitmap or the rings. Turning it on starts a clean log.
  void set_dirty_logging(bool on);
  // KVM's dirty log of `slot`, with the pages the VMM's devices wrote ORed in.
  void fetch_and_clear_dirty_log(std::size_t slot, std::span<std::uint64_t> bitmap);
  // The same in two steps, as Vm's, or with dirty rings as DirtyRingHarvester's. The
  // devices' writes are taken at the fetch either way: one after it is reported next time.
  void fetch_dirty_log_unarmed(std::size_t slot, std::span<std::uint64_t> bitmap);
  void rearm_dirty_pages(std::size_t slot, std::uint64_t first_page, std::span<const std::uint64_t> pages);
  // With dirty rings: the same, but the pages each vCPU dirtied in `vcpu_bitmaps[v]`, and
  // only those the VMM's devices wrote in `bitmap`.
  void fetch_dirty_log_by_vcpu(std::size_t slot, std::span<std::uint64_t> bitmap,
                               std::span<const std::span<std::uint64_t>> vcpu_bitmaps);
  // The rings' harvester, or null with the bitmap.
  DirtyRingHarvester* dirty_rings() { return dirty_rings_.get(); }
  // With dirty rings: per vCPU, the pages it has added to the dirty set in all, up to now
  // (DirtyRingHarvester::pages_added_by_vcpu). The vCPUs' PML buffers are flushed into their
  // rings first: unflushed, a count may lag by 512 pages, two seconds of dirty-limit's 1 MB/s
  // cap.
  std::vector<std::uint64_t> pages_dirtied_by_vcpu();
  // Per vCPU, how often it stopped because its dirty ring was full: what a ring too small
  // for the harvests costs the guest (and proof, to a test, that a ring went round).
  std::vector<std::uint64_t> dirty_ring_full_exits() const;

  // Keeps vCPU `index` out of the guest until `until` (dirty-limit), replacing any hold it
  // had: a time past releases it. It leaves at once if it is in the guest; one on its way in
  // may run until its next exit. A pause ends the hold.
  void hold_vcpu(unsigned index, std::chrono::steady_clock::time_point until);

  // Starts the vCPU threads. Call once, after boot() or restore_state().
  void start();
  // The vCPU threads' kernel ids, in vCPU order (0 for one not started yet).
  std::vector<int> vcpu_thread_ids() const;
  // Takes every vCPU out of KVM_RUN (even one spinning in guest user mode) and returns once
  // all are parked with their pending I/O completed, and every disk request in flight has
  // completed, so the state is consistent.
  void pause();
  // Lets parked vCPUs run again; on a machine that never ran (restored, not started) it
  // starts the vCPU threads.
  void resume();
  bool paused() const { return pause_requested_.load(); }

  // Both require the machine to be paused or not yet started.
  MachineState save_state() const;
  void restore_state(const MachineState& state);

  // The first guest failure (triple fault, internal error, entry failure), if any. A failed
  // vCPU stops; the others go on until the machine is paused or destroyed.
  std::optional<std::string> failure() const;

  const MachineConfig& config() const { return config_; }
  GuestMemory& memory() { return memory_; }
  Vm& vm() { return vm_; }
  // The CPUID every vCPU was given (all alike but for their APIC IDs): the CPU model's, what
  // KVM supports here, or after restore_state() what the guest had on its source.
  const CpuidEntries& guest_cpuid() const { return guest_cpuid_; }
  // The rate the guest's TSC ticks at, as its vCPUs were created or restored.
  std::uint32_t guest_tsc_khz() const { return guest_tsc_khz_; }
  Probe& probe() { return probe_; }
  const Probe& probe() const { return probe_; }

 private:
  explicit Machine(const MachineConfig& config, KvmSystem sys, GuestMemory memory, Vm vm, CpuidEntries cpuid);
  void vcpu_loop(unsigned index);
  // Handles one exit; returns false when the vCPU cannot go on.
  bool dispatch_exit(Vcpu& vcpu);
  void park(Vcpu& vcpu);
  bool wait_while_held(unsigned index);
  bool enter_guest(unsigned index);
  void flush_vcpu_dirty_buffers();
  void fetch_dirty_log(std::size_t slot, std::span<std::uint64_t> bitmap, bool rearm);
  VirtioBlk* disk_at(std::uint16_t port) const;
  void fail(std::string reason);

  MachineConfig config_;
  KvmSystem sys_;
  CpuidEntries guest_cpuid_;
  std::uint32_t guest_tsc_khz_ = 0;
  GuestMemory memory_;
  Vm vm_;
  std::vector<Vcpu> vcpus_;
  Serial16550 serial_;
  Probe probe_;
  PciBus pci_;
  std::vector<std::unique_ptr<VirtioBlk>> disks_;  // after memory_ and vm_: they go first
  std::vector<std::atomic<int>> thread_ids_;  // each vCPU thread's id once it runs; sized at construction
  std::unique_ptr<DirtyRingHarvester> dirty_rings_;  // with dirty rings
  std::vector<std::atomic<std::chrono::steady_clock::rep>> held_until_;  // per vCPU, hold_vcpu()'s time
  // Per vCPU, counted up on the way into KVM_RUN and again out of it: odd while it may be in
  // the guest.
  std::vector<std::atomic<std::uint64_t>> run_phase_;
  std::vector<std::atomic<std::uint64_t>> ring_full_exits_;  // per vCPU

  std::vector<std::thread> threads_;
  mutable std::mutex mutex_;
  std::condition_variable state_changed_;
  std::atomic<bool> pause_requested_{true};  // a machine starts parked until start()/resume()
  bool stopping_ = false;
  unsigned parked_ = 0;   // vCPU threads waiting in park()
  unsigned stopped_ = 0;  // vCPU threads that returned for good
  std::optional<std::string> failure_;
};

}  // namespace mig::kvm
