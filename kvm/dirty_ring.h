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
// This is the VMM's side, on the kernel's layout: a collector per ring, and a harvester for
// a VM's rings together. They read rings mmap'd from KVM's vCPU fds (kvm::Machine) as well
// as the synthetic guest's (vmm/soft_dirty_rings.h), whose vCPUs publish as the kernel does.
#pragma once

#include <cstdint>
#include <functional>
#include <mutex>
#include <span>
#include <vector>

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
  // for each and marks it for reset. One harvester at a time per ring.
  void harvest(const std::function<void(std::uint32_t slot, std::uint64_t offset)>& mark);

 private:
  std::span<DirtyGfn> ring_;
  std::uint32_t fetch_index_ = 0;  // the next entry to harvest, free-running
};

// A VM's rings, one per vCPU, harvested together: what they held is kept, per slot, until it
// is taken. It costs what was dirtied, never the size of the guest. Safe from several
// threads: a vCPU thread harvests on a ring-full exit while the migration takes.
class DirtyRingHarvester {
 public:
  // `rings[v]` is vCPU v's; `slot_pages[s]` the pages of slot s. `recycle` recycles every
  // entry marked harvested in every ring (KVM_RESET_DIRTY_RINGS), so that the next write of
  // each page publishes it again; it runs after each harvest, under the harvester's lock.
  DirtyRingHarvester(std::vector<std::span<DirtyGfn>> rings, std::vector<std::uint64_t> slot_pages,
                     std::function<void()> recycle);

  void harvest();
  // Harvests, then drops everything found: what was dirtied before now is never reported.
  void forget();
  // Harvests, then ORs every page found in `slot` into `bitmap` (ceil(pages / 64) words),
  // and forgets them (and any left unarmed).
  void take(std::size_t slot, std::span<std::uint64_t> bitmap);
  // Re-arming later (engine/vm.h). take_unarmed() takes as take() does, but keeps the pages
  // unarmed: every later take reports them, until rearm() forgets those set in `pages` (bit
  // i for page `first_page` + i, `first_page` a multiple of 64). rearm() harvests first: a
  // page written before it is forgotten with what was written, and its ring entry recycled,
  // so that a write after it is published again.
  void take_unarmed(std::size_t slot, std::span<std::uint64_t> bitmap);
  void rearm(std::size_t slot, std::uint64_t first_page, std::span<const std::uint64_t> pages);
  // As take(), but each page into `vcpu_bitmaps[v]` of the vCPU whose ring named it first;
  // pages an earlier take_unarmed() left unarmed, which no vCPU names again, into `unnamed`.
  void take_by_vcpu(std::size_t slot, std::span<std::uint64_t> unnamed,
                    std::span<const std::span<std::uint64_t>> vcpu_bitmaps);
  // Per vCPU, the pages it added to the dirty set, ever: a page counts when the vCPU's ring
  // names it first, and again only once the migration has taken it. Not every entry: each
  // harvest re-arms what it found, so a vCPU that keeps rewriting a few pages (a stack, a
  // counter) would be named again at every harvest, and dirty-limit's looks, 100 a second,
  // would charge it for dirtying memory the migration sends once a round.
  std::vector<std::uint64_t> pages_added_by_vcpu();

 private:
  void harvest_locked();
  // Moves the pages found in `slot` so far out, calling put(vcpu, page) for each.
  template <typename Put>
  void take_locked(std::size_t slot, Put&& put);
  // Harvests, and moves the pages found in `slot` into its unarmed bitmap, which it returns.
  std::vector<std::uint64_t>& gather_unarmed_locked(std::size_t slot);
  // The same, then ORs that bitmap into `bitmap`.
  std::vector<std::uint64_t>& take_unarmed_locked(std::size_t slot, std::span<std::uint64_t> bitmap);

  std::mutex mutex_;
  std::vector<DirtyRingCollector> collectors_;
  std::vector<std::uint64_t> slot_pages_;
  std::function<void()> recycle_;
  std::vector<std::vector<std::uint64_t>> found_;               // per slot, a bit per page
  std::vector<std::vector<std::uint64_t>> unarmed_;             // per slot: taken, not yet re-armed
  std::vector<std::vector<std::vector<std::uint64_t>>> pages_;  // per vCPU, per slot: the pages it named first
  std::vector<std::uint64_t> pages_added_;                      // per vCPU
};

}  // namespace mig::kvm
