// The dirty ring's two halves: the collector (kvm/dirty_ring.h), which a KVM ring would use
// too, and the synthetic guest's producer (vmm/soft_dirty_rings.h), which plays the kernel.
#include <catch2/catch.hpp>

#include <span>
#include <vector>

#include "kvm/dirty_ring.h"
#include "vmm/soft_dirty_rings.h"

using namespace mig;

namespace {

void publish(kvm::DirtyGfn& entry, std::uint32_t slot, std::uint64_t offset) {
  entry.slot = slot;
  entry.offset = offset;
  entry.flags = kvm::kDirtyGfnDirty;
}

std::vector<std::uint64_t> harvest(kvm::DirtyRingCollector& collector) {
  std::vector<std::uint64_t> offsets;
  collector.harvest([&](std::uint32_t, std::uint64_t offset) { offsets.push_back(offset); });
  return offsets;
}

std::uint64_t count(const std::vector<std::uint64_t>& bitmap) {
  std::uint64_t pages = 0;
  for (auto word : bitmap) pages += static_cast<std::uint64_t>(__builtin_popcountll(word));
  return pages;
}

}  // namespace

TEST_CASE("the collector takes published entries in order, marks them for reset, and wraps round the ring") {
  std::vector<kvm::DirtyGfn> ring(4);
  kvm::DirtyRingCollector collector(ring);
  CHECK(harvest(collector).empty());
  publish(ring[0], 1, 10);
  publish(ring[1], 1, 11);
  CHECK(harvest(collector) == std::vector<std::uint64_t>{10, 11});
  CHECK(ring[0].flags == kvm::kDirtyGfnReset);
  CHECK(harvest(collector).empty());  // taken once only
  // The kernel recycles the two, and publishes round the end of the ring.
  ring[0].flags = ring[1].flags = 0;
  publish(ring[2], 0, 12);
  publish(ring[3], 0, 13);
  publish(ring[0], 0, 14);
  CHECK(harvest(collector) == std::vector<std::uint64_t>{12, 13, 14});
  std::vector<kvm::DirtyGfn> odd(3);
  CHECK_THROWS_WITH(kvm::DirtyRingCollector(odd), Catch::Contains("power of two"));
}

TEST_CASE("soft dirty rings publish a page once per reset, into the ring of the vCPU that wrote it first") {
  vmm::SoftDirtyRings rings(2, {128, 64}, 64);
  std::vector<std::uint64_t> region0(2), region1(1);
  CHECK_FALSE(rings.note_write(0, 0, 5));  // logging off: nothing
  rings.set_logging(true);
  CHECK_FALSE(rings.note_write(0, 0, 5));
  CHECK_FALSE(rings.note_write(1, 0, 5));  // written again, by another vCPU: not published again
  CHECK_FALSE(rings.note_write(1, 1, 63));
  CHECK(rings.published(0) == 1);
  CHECK(rings.published(1) == 1);
  rings.take(0, region0);
  CHECK(region0[0] == 1ull << 5);
  CHECK(count(region0) == 1);
  rings.take(1, region1);  // found by the first harvest, kept for its region's call
  CHECK(region1[0] == 1ull << 63);
  // Reset: the next write publishes the page anew.
  CHECK_FALSE(rings.note_write(1, 0, 5));
  CHECK(rings.published(1) == 2);

  SECTION("a ring that fills says so, and a harvest frees it") {
    bool full = false;
    std::uint64_t page = 0;
    for (; page < 128 && !full; ++page) full = rings.note_write(0, 0, page == 5 ? 127 : page);
    CHECK(full);
    CHECK(rings.published(0) == 1 + 64);
    rings.harvest();
    CHECK_FALSE(rings.note_write(0, 1, 0));
    std::vector<std::uint64_t> all(2);
    rings.take(0, all);
    CHECK(count(all) == 64 + 1);  // vCPU 0's 64 pages, and vCPU 1's page 5 again
  }
  SECTION("taken by vCPU, each page is with the vCPU that published it") {
    CHECK_FALSE(rings.note_write(0, 0, 7));
    CHECK_FALSE(rings.note_write(1, 0, 7));  // second: not published
    std::vector<std::uint64_t> of_vcpu0(2), of_vcpu1(2);
    const std::vector<std::span<std::uint64_t>> by_vcpu{of_vcpu0, of_vcpu1};
    rings.take_by_vcpu(0, by_vcpu);
    CHECK(of_vcpu0[0] == 1ull << 7);
    CHECK(of_vcpu1[0] == 1ull << 5);
    CHECK(count(of_vcpu0) + count(of_vcpu1) == 2);
    std::vector<std::uint64_t> again(2);
    rings.take(0, again);
    CHECK(count(again) == 0);  // taken once only, whichever way
  }
  SECTION("starting again forgets what was published before") {
    rings.set_logging(true);
    std::fill(region0.begin(), region0.end(), 0);
    rings.take(0, region0);
    CHECK(count(region0) == 0);
    CHECK_FALSE(rings.note_write(0, 0, 5));  // and re-armed its pages
    rings.take(0, region0);
    CHECK(count(region0) == 1);
  }
  CHECK_THROWS_WITH(vmm::SoftDirtyRings(1, {64}, 100), Catch::Contains("power of two"));
}
