// The kernel's half of KVM's dirty ring (kvm/dirty_ring.h), done in software for the
// synthetic guest, so that it can be tracked as a KVM guest with --dirty-track ring is: while
// logging is on, a page is published into the ring of the first vCPU that writes it after
// its last reset, and not again until it is harvested and reset. A vCPU whose ring fills up
// must stop writing until a harvest and a reset free it (KVM_EXIT_DIRTY_RING_FULL).
//
// What it is for: per-vCPU dirty counts (which dirty-limit paces), a harvest that costs what
// was dirtied, and a test bed for the harvester that KVM's rings use too. It measures this
// emulation, not KVM: the cost of a write-protection fault or a ring-full exit is not in it.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "../kvm/dirty_ring.h"

namespace mig::vmm {

class SoftDirtyRings {
 public:
  // `region_pages`: the pages of each memory region (a region is a slot). `entries` per
  // vCPU: a power of two from 64 to 65536, as KVM takes.
  SoftDirtyRings(unsigned vcpus, const std::vector<std::uint64_t>& region_pages, std::uint32_t entries);

  // Starting forgets every page published so far; stopping publishes nothing more.
  void set_logging(bool on);
  // On vCPU `vcpu`'s thread, after it wrote `page` of `region`. Returns true when its ring
  // is full: the vCPU must call harvester().harvest() before it writes again (KVM_EXIT_DIRTY_RING_FULL).
  bool note_write(unsigned vcpu, std::uint32_t region, std::uint64_t page);
  // Every page vCPU `vcpu` has published since it started: its own dirty count.
  std::uint64_t published(unsigned vcpu) const { return rings_[vcpu]->dirty_index.load(std::memory_order_acquire); }

  // The VMM's side, as kvm::Machine has it for KVM's rings (see kvm::DirtyRingHarvester).
  kvm::DirtyRingHarvester& harvester() { return *harvester_; }

 private:
  struct Ring {
    explicit Ring(std::uint32_t size) : entries(size) {}
    std::vector<kvm::DirtyGfn> entries;
    std::atomic<std::uint64_t> dirty_index{0};  // the producer's: entries published, ever
    std::atomic<std::uint64_t> reset_index{0};  // entries recycled, ever
  };
  void reset(Ring& ring);

  std::vector<std::unique_ptr<Ring>> rings_;
  std::vector<std::unique_ptr<std::atomic<std::uint64_t>[]>> published_;  // per region, a bit per page: published, not yet reset
  std::atomic<bool> logging_{false};
  std::unique_ptr<kvm::DirtyRingHarvester> harvester_;  // recycles through reset()
};

}  // namespace mig::vmm
