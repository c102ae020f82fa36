#include "vmm/soft_dirty_rings.h"

#include <bit>
#include <stdexcept>
#include <utility>

namespace mig::vmm {

namespace {
std::uint64_t words_for(std::uint64_t pages) { return (pages + 63) / 64; }
}  // namespace

SoftDirtyRings::SoftDirtyRings(unsigned vcpus, const std::vector<std::uint64_t>& region_pages, std::uint32_t entries) {
  if (entries < 64 || entries > 65536 || !std::has_single_bit(entries))
    throw std::invalid_argument("a dirty ring has a power of two of entries, from 64 to 65536");
  for (auto pages : region_pages) published_.push_back(std::make_unique<std::atomic<std::uint64_t>[]>(words_for(pages)));
  std::vector<std::span<kvm::DirtyGfn>> spans;
  for (unsigned i = 0; i < vcpus; ++i) spans.push_back(rings_.emplace_back(std::make_unique<Ring>(entries))->entries);
  harvester_ = std::make_unique<kvm::DirtyRingHarvester>(std::move(spans), region_pages, [this] {
    for (auto& ring : rings_) reset(*ring);
  });
}

void SoftDirtyRings::set_logging(bool on) {
  if (on) harvester_->forget();  // what was published before is not this log's
  logging_.store(on, std::memory_order_release);
}

bool SoftDirtyRings::note_write(unsigned vcpu, std::uint32_t region, std::uint64_t page) {
  if (!logging_.load(std::memory_order_acquire)) return false;
  const std::uint64_t bit = 1ull << (page % 64);
  // Published already and not reset since: the page is writable, as after KVM's first fault.
  if (published_[region][page / 64].fetch_or(bit, std::memory_order_acq_rel) & bit) return false;
  Ring& ring = *rings_[vcpu];
  const std::uint64_t index = ring.dirty_index.load(std::memory_order_relaxed);
  kvm::DirtyGfn& entry = ring.entries[index % ring.entries.size()];
  entry.slot = region;
  entry.offset = page;
  std::atomic_ref(entry.flags).store(kvm::kDirtyGfnDirty, std::memory_order_release);
  ring.dirty_index.store(index + 1, std::memory_order_release);
  return index + 1 - ring.reset_index.load(std::memory_order_acquire) >= ring.entries.size();
}

// KVM_RESET_DIRTY_RINGS for one ring: recycles the harvested entries, in order, and lets the
// next write of each page publish it again.
void SoftDirtyRings::reset(Ring& ring) {
  for (std::uint64_t index = ring.reset_index.load(std::memory_order_relaxed);; ++index) {
    kvm::DirtyGfn& entry = ring.entries[index % ring.entries.size()];
    std::atomic_ref flags(entry.flags);
    if (flags.load(std::memory_order_acquire) != kvm::kDirtyGfnReset) return;
    published_[entry.slot][entry.offset / 64].fetch_and(~(1ull << (entry.offset % 64)), std::memory_order_acq_rel);
    flags.store(0, std::memory_order_relaxed);
    ring.reset_index.store(index + 1, std::memory_order_release);  // the producer may now reuse it
  }
}

}  // namespace mig::vmm
