#include "kvm/dirty_ring.h"

#include <atomic>
#include <bit>
#include <stdexcept>

namespace mig::kvm {

DirtyRingCollector::DirtyRingCollector(std::span<DirtyGfn> ring) : ring_(ring) {
  if (ring_.empty() || !std::has_single_bit(ring_.size())) throw std::invalid_argument("a dirty ring holds a power of two of entries");
}

std::uint32_t DirtyRingCollector::harvest(const std::function<void(std::uint32_t, std::uint64_t)>& mark) {
  const auto mask = static_cast<std::uint32_t>(ring_.size() - 1);
  std::uint32_t taken = 0;
  for (;; ++fetch_index_, ++taken) {
    DirtyGfn& entry = ring_[fetch_index_ & mask];
    std::atomic_ref flags(entry.flags);
    // Acquire: the slot and offset were written before the producer set DIRTY.
    if (!(flags.load(std::memory_order_acquire) & kDirtyGfnDirty)) return taken;
    mark(entry.slot, entry.offset);
    flags.store(kDirtyGfnReset, std::memory_order_release);
  }
}

}  // namespace mig::kvm
