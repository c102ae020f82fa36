// KVM's dirty ring (KVM_CAP_DIRTY_LOG_RING, Documentation/virt/kvm/api.rst): each vCPU
// publishes the pages it dirties, in order, into a ring of entries it shares with the VMM.
// Unlike the dirty bitmap it says which vCPU dirtied which page, and a harvest costs what
// was dirtied rather than the size of the guest.
//
// The protocol, per entry: the producer (the kernel) fills in slot and offset and sets
// DIRTY; the VMM harvests it and sets RESET; a reset (KVM_RESET_DIRTY_RINGS) recycles every
// entry marked RESET and write-protects its page again, so its next write publishes it anew.
// Data must be copied after the reset: a write between harvest and reset publishes nothing,
// and only a copy taken after the reset is sure to hold it.
//
// This is the VMM's side, the collector, on the kernel's layout: it reads a ring mmap'd from
// a vCPU fd as well as the synthetic guest's (vmm/soft_dirty_rings.h), whose vCPUs publish
// as the kernel does.
#pragma once

#include <cstdint>
#include <functional>
#include <span>

namespace mig::kvm {

struct DirtyGfn {  // struct kvm_dirty_gfn
  std::uint32_t flags = 0;
  std::uint32_t slot = 0;  // address space << 16 | memslot
  std::uint64_t offset = 0;  // page within the slot
};
static_assert(sizeof(DirtyGfn) == 16);

inline constexpr std::uint32_t kDirtyGfnDirty = 1;  // KVM_DIRTY_GFN_F_DIRTY: published, not yet harvested
inline constexpr std::uint32_t kDirtyGfnReset = 2;  // KVM_DIRTY_GFN_F_RESET: harvested, waiting to be recycled

class DirtyRingCollector {
 public:
  // `ring`: a power-of-two number of entries, alive as long as this.
  explicit DirtyRingCollector(std::span<DirtyGfn> ring);
  // Takes every entry published since the last harvest, in order, calls mark(slot, offset)
  // for each and marks it for reset. Returns how many. One harvester at a time per ring.
  std::uint32_t harvest(const std::function<void(std::uint32_t slot, std::uint64_t offset)>& mark);

 private:
  std::span<DirtyGfn> ring_;
  std::uint32_t fetch_index_ = 0;  // the next entry to harvest, free-running
};

}  // namespace mig::kvm
