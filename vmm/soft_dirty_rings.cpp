#include "vmm/soft_dirty_rings.h"

#include <algorithm>
#include <bit>
#include <stdexcept>
#include <utility>

namespace mig::vmm {

namespace {
std::uint64_t words_for(std::uint64_t pages) { return (pages + 63) / 64; }
}  // namespace

SoftDirtyRings::SoftDirtyRings(unsigned vcpus, const std::vector<std::uint64_t>& region_pages, std::uint32_t entries)
    : region_pages_(region_pages) {
  if (entries < 64 || entries > 65536 || !std::has_single_bit(entries))
    throw std::invalid_argument("a dirty ring has a power of two of entries, from 64 to 65536");
  for (auto pages : region_pages_) published_.push_back(std::make_unique<std::atomic<std::uint64_t>[]>(words_for(pages)));
  for (unsigned i = 0; i < vcpus; ++i) {
    rings_.push_back(std::make_unique<Ring>(entries));
    auto& found = harvested_.emplace_back();
    for (auto pages : region_pages_) found.emplace_back(words_for(pages));
  }
}

void SoftDirtyRings::set_logging(bool on) {
  if (on) {
    // Forget what was published before: harvest it away, and drop what the harvest found.
    std::lock_guard lock(harvest_mutex_);
    harvest_locked();
    for (auto& regions : harvested_)
      for (auto& bits : regions) std::fill(bits.begin(), bits.end(), 0);
  }
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

void SoftDirtyRings::harvest() {
  std::lock_guard lock(harvest_mutex_);
  harvest_locked();
}

namespace {
void move_bits(std::vector<std::uint64_t>& from, std::span<std::uint64_t> into) {
  for (std::size_t w = 0; w < from.size() && w < into.size(); ++w) into[w] |= std::exchange(from[w], 0);
}
}  // namespace

void SoftDirtyRings::take(std::size_t region, std::span<std::uint64_t> bitmap) {
  std::lock_guard lock(harvest_mutex_);
  harvest_locked();
  for (auto& regions : harvested_) move_bits(regions.at(region), bitmap);
}

void SoftDirtyRings::take_by_vcpu(std::size_t region, std::span<const std::span<std::uint64_t>> vcpu_bitmaps) {
  std::lock_guard lock(harvest_mutex_);
  harvest_locked();
  for (std::size_t v = 0; v < harvested_.size() && v < vcpu_bitmaps.size(); ++v) move_bits(harvested_[v].at(region), vcpu_bitmaps[v]);
}

void SoftDirtyRings::harvest_locked() {
  for (std::size_t v = 0; v < rings_.size(); ++v) {
    auto& found = harvested_[v];
    rings_[v]->collector.harvest([&](std::uint32_t slot, std::uint64_t offset) {
      if (slot < found.size() && offset < region_pages_[slot]) found[slot][offset / 64] |= 1ull << (offset % 64);
    });
    reset(*rings_[v]);
  }
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
