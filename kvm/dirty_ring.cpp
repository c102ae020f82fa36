#include "kvm/dirty_ring.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <stdexcept>
#include <utility>

namespace mig::kvm {

DirtyRingCollector::DirtyRingCollector(std::span<DirtyGfn> ring) : ring_(ring) {
  if (ring_.empty() || !std::has_single_bit(ring_.size())) throw std::invalid_argument("a dirty ring holds a power of two of entries");
}

void DirtyRingCollector::harvest(const std::function<void(std::uint32_t, std::uint64_t)>& mark) {
  const auto mask = static_cast<std::uint32_t>(ring_.size() - 1);
  for (;; ++fetch_index_) {
    DirtyGfn& entry = ring_[fetch_index_ & mask];
    std::atomic_ref flags(entry.flags);
    // Acquire: the slot and offset were written before the producer set DIRTY.
    if (!(flags.load(std::memory_order_acquire) & kDirtyGfnDirty)) return;
    mark(entry.slot, entry.offset);
    flags.store(kDirtyGfnReset, std::memory_order_release);
  }
}

DirtyRingHarvester::DirtyRingHarvester(std::vector<std::span<DirtyGfn>> rings, std::vector<std::uint64_t> slot_pages,
                                       std::function<void()> recycle)
    : slot_pages_(std::move(slot_pages)), recycle_(std::move(recycle)), pages_added_(rings.size(), 0) {
  for (auto ring : rings) collectors_.emplace_back(ring);
  for (auto pages : slot_pages_) found_.emplace_back((pages + 63) / 64, 0);
  unarmed_ = found_;
  pages_.assign(rings.size(), std::vector<std::vector<std::uint64_t>>(slot_pages_.size()));
}

void DirtyRingHarvester::harvest() {
  std::lock_guard lock(mutex_);
  harvest_locked();
}

void DirtyRingHarvester::harvest_locked() {
  for (std::size_t vcpu = 0; vcpu < collectors_.size(); ++vcpu) {
    collectors_[vcpu].harvest([&](std::uint32_t slot, std::uint64_t offset) {
      // Anything but a page of a slot of ours (address space 0) is not the guest's RAM.
      if (slot >= slot_pages_.size() || offset >= slot_pages_[slot]) return;
      std::uint64_t& word = found_[slot][offset / 64];
      const std::uint64_t bit = std::uint64_t{1} << (offset % 64);
      if (word & bit) return;  // dirty already, until the migration takes it
      word |= bit;
      pages_[vcpu][slot].push_back(offset);
      ++pages_added_[vcpu];
    });
  }
  recycle_();
}

template <typename Put>
void DirtyRingHarvester::take_locked(std::size_t slot, Put&& put) {
  for (std::size_t vcpu = 0; vcpu < pages_.size(); ++vcpu) {
    for (auto page : pages_[vcpu].at(slot)) {
      found_[slot][page / 64] &= ~(std::uint64_t{1} << (page % 64));
      put(vcpu, page);
    }
    pages_[vcpu][slot].clear();
  }
}

void DirtyRingHarvester::forget() {
  std::lock_guard lock(mutex_);
  harvest_locked();  // once for every slot: a harvest ends in a reset of every ring
  for (std::size_t slot = 0; slot < slot_pages_.size(); ++slot) {
    take_locked(slot, [](std::size_t, std::uint64_t) {});
    std::fill(unarmed_[slot].begin(), unarmed_[slot].end(), 0);
  }
}

void DirtyRingHarvester::take(std::size_t slot, std::span<std::uint64_t> bitmap) {
  std::lock_guard lock(mutex_);
  auto& unarmed = take_unarmed_locked(slot, bitmap);
  std::fill(unarmed.begin(), unarmed.end(), 0);  // reported, and armed again by the harvest
}

void DirtyRingHarvester::take_unarmed(std::size_t slot, std::span<std::uint64_t> bitmap) {
  std::lock_guard lock(mutex_);
  take_unarmed_locked(slot, bitmap);
}

std::vector<std::uint64_t>& DirtyRingHarvester::take_unarmed_locked(std::size_t slot, std::span<std::uint64_t> bitmap) {
  if (bitmap.size() * 64 < slot_pages_.at(slot)) throw std::invalid_argument("dirty bitmap too small for slot");
  auto& unarmed = gather_unarmed_locked(slot);
  for (std::size_t w = 0; w < unarmed.size(); ++w) bitmap[w] |= unarmed[w];
  return unarmed;
}

void DirtyRingHarvester::rearm(std::size_t slot, std::uint64_t first_page, std::span<const std::uint64_t> pages) {
  if (first_page % 64 != 0) throw std::invalid_argument("pages to re-arm must start at a multiple of 64");
  std::lock_guard lock(mutex_);
  auto& unarmed = gather_unarmed_locked(slot);
  for (std::size_t w = 0; w < pages.size() && first_page / 64 + w < unarmed.size(); ++w)
    unarmed[first_page / 64 + w] &= ~pages[w];
}

std::vector<std::uint64_t>& DirtyRingHarvester::gather_unarmed_locked(std::size_t slot) {
  harvest_locked();
  auto& unarmed = unarmed_.at(slot);
  take_locked(slot, [&](std::size_t, std::uint64_t page) { unarmed[page / 64] |= std::uint64_t{1} << (page % 64); });
  return unarmed;
}

void DirtyRingHarvester::take_by_vcpu(std::size_t slot, std::span<std::uint64_t> unnamed,
                                      std::span<const std::span<std::uint64_t>> vcpu_bitmaps) {
  if (vcpu_bitmaps.size() < pages_.size()) throw std::invalid_argument("a dirty bitmap is needed for every vCPU");
  const auto too_small = [&](std::span<std::uint64_t> bitmap) { return bitmap.size() * 64 < slot_pages_.at(slot); };
  if (too_small(unnamed) || std::ranges::any_of(vcpu_bitmaps, too_small))
    throw std::invalid_argument("dirty bitmap too small for slot");
  std::lock_guard lock(mutex_);
  harvest_locked();
  take_locked(slot, [&](std::size_t vcpu, std::uint64_t page) { vcpu_bitmaps[vcpu][page / 64] |= std::uint64_t{1} << (page % 64); });
  auto& unarmed = unarmed_.at(slot);
  for (std::size_t w = 0; w < unarmed.size(); ++w) unnamed[w] |= std::exchange(unarmed[w], 0);
}

std::vector<std::uint64_t> DirtyRingHarvester::pages_added_by_vcpu() {
  std::lock_guard lock(mutex_);
  harvest_locked();
  return pages_added_;
}

}  // namespace mig::kvm
