// The dirty ring's two halves: the collector and harvester (kvm/dirty_ring.h), which KVM's
// rings use too, and the synthetic guest's producer (vmm/soft_dirty_rings.h), which plays the
// kernel; and the dirty limiter that KVM guests are held to their cap by.
#include <catch2/catch.hpp>

#include <chrono>
#include <optional>
#include <span>
#include <vector>

#include "kvm/dirty_ring.h"
#include "vmm/dirty_limiter.h"
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
  rings.harvester().take(0, region0);
  CHECK(region0[0] == 1ull << 5);
  CHECK(count(region0) == 1);
  rings.harvester().take(1, region1);  // found by the first harvest, kept for its region's call
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
    rings.harvester().harvest();
    CHECK_FALSE(rings.note_write(0, 1, 0));
    std::vector<std::uint64_t> all(2);
    rings.harvester().take(0, all);
    CHECK(count(all) == 64 + 1);  // vCPU 0's 64 pages, and vCPU 1's page 5 again
  }
  SECTION("taken by vCPU, each page is with the vCPU that published it") {
    CHECK_FALSE(rings.note_write(0, 0, 7));
    CHECK_FALSE(rings.note_write(1, 0, 7));  // second: not published
    std::vector<std::uint64_t> of_vcpu0(2), of_vcpu1(2);
    const std::vector<std::span<std::uint64_t>> by_vcpu{of_vcpu0, of_vcpu1};
    std::vector<std::uint64_t> unnamed(2);
    rings.harvester().take_by_vcpu(0, unnamed, by_vcpu);
    CHECK(count(unnamed) == 0);
    CHECK(of_vcpu0[0] == 1ull << 7);
    CHECK(of_vcpu1[0] == 1ull << 5);
    CHECK(count(of_vcpu0) + count(of_vcpu1) == 2);
    std::vector<std::uint64_t> again(2);
    rings.harvester().take(0, again);
    CHECK(count(again) == 0);  // taken once only, whichever way
  }
  SECTION("starting again forgets what was published before") {
    rings.set_logging(true);
    std::fill(region0.begin(), region0.end(), 0);
    rings.harvester().take(0, region0);
    CHECK(count(region0) == 0);
    CHECK_FALSE(rings.note_write(0, 0, 5));  // and re-armed its pages
    rings.harvester().take(0, region0);
    CHECK(count(region0) == 1);
  }
  CHECK_THROWS_WITH(vmm::SoftDirtyRings(1, {64}, 100), Catch::Contains("power of two"));
}

TEST_CASE("the harvester takes every ring at once, names each page's first vCPU, and recycles after each harvest") {
  std::vector<kvm::DirtyGfn> ring0(4), ring1(4);
  int recycled = 0;
  kvm::DirtyRingHarvester harvester({ring0, ring1}, {128, 64}, [&] { ++recycled; });
  publish(ring0[0], 0, 5);
  publish(ring1[0], 0, 5);    // the same page, later in the other ring: vCPU 0 named it first
  publish(ring1[1], 1, 63);
  publish(ring1[2], 1, 64);   // past its slot: not the guest's RAM, dropped
  publish(ring1[3], 7, 0);    // no such slot
  harvester.harvest();
  CHECK(recycled == 1);
  CHECK(ring0[0].flags == kvm::kDirtyGfnReset);
  // Pages added to the dirty set: vCPU 1's page 5 was dirty already, and two were not RAM.
  CHECK(harvester.pages_added_by_vcpu() == std::vector<std::uint64_t>{1, 1});
  std::vector<std::uint64_t> of_vcpu0(2), of_vcpu1(2);
  std::vector<std::uint64_t> unnamed(2);
  harvester.take_by_vcpu(0, unnamed, std::vector<std::span<std::uint64_t>>{of_vcpu0, of_vcpu1});
  CHECK(of_vcpu0[0] == 1ull << 5);
  CHECK(count(of_vcpu1) == 0);
  std::vector<std::uint64_t> slot0(2), slot1(1);
  harvester.take(1, slot1);
  CHECK(slot1[0] == 1ull << 63);
  harvester.take(1, slot1);  // taken once only
  CHECK(slot1[0] == 1ull << 63);
  // Each harvest re-arms, so a page rewritten is named again; it is added once until the
  // migration takes it (page 9), and again after (page 63, taken above).
  publish(ring1[0], 1, 63);
  publish(ring0[1], 0, 9);
  harvester.harvest();
  publish(ring0[2], 0, 9);
  harvester.harvest();
  CHECK(harvester.pages_added_by_vcpu() == std::vector<std::uint64_t>{2, 2});
  harvester.take(0, slot0);
  publish(ring0[3], 0, 9);
  CHECK(harvester.pages_added_by_vcpu() == std::vector<std::uint64_t>{3, 2});

  publish(ring0[0], 0, 9);
  harvester.forget();  // logging starts afresh
  std::vector<std::uint64_t> after_forget(2);
  harvester.take(0, after_forget);
  CHECK(count(after_forget) == 0);
  std::vector<std::uint64_t> small(1);
  CHECK_THROWS_WITH(harvester.take(0, small), Catch::Contains("too small"));
}

// What the engine's late re-arming relies on with rings (engine/vm.h): taken unarmed, a page
// is reported until re-armed; a write before its re-arming goes with it, one after does not.
TEST_CASE("pages taken unarmed are reported until re-armed - exactly those asked for, by any take") {
  std::vector<kvm::DirtyGfn> ring(8);
  int recycled = 0;
  kvm::DirtyRingHarvester harvester({ring}, {128}, [&] { ++recycled; });
  publish(ring[0], 0, 3);
  publish(ring[1], 0, 70);
  std::vector<std::uint64_t> taken(2), again(2);
  harvester.take_unarmed(0, taken);
  CHECK(taken == std::vector<std::uint64_t>{1ull << 3, 1ull << 6});
  harvester.take_unarmed(0, again);
  CHECK(again == taken);  // nothing re-armed yet

  publish(ring[2], 0, 3);  // written again before its re-arming
  publish(ring[3], 0, 4);  // a page the re-arming does not name
  const int recycled_before = recycled;
  harvester.rearm(0, 0, std::vector<std::uint64_t>{1ull << 3});
  CHECK(recycled == recycled_before + 1);  // harvested first: the entries are recycled, so a next write publishes again
  std::fill(again.begin(), again.end(), 0);
  harvester.take_unarmed(0, again);
  CHECK(again == std::vector<std::uint64_t>{1ull << 4, 1ull << 6});

  publish(ring[4], 0, 3);  // after its re-arming
  std::vector<std::uint64_t> all(2);
  harvester.take(0, all);
  CHECK(all == std::vector<std::uint64_t>{1ull << 3 | 1ull << 4, 1ull << 6});
  std::fill(all.begin(), all.end(), 0);
  harvester.take(0, all);  // take() re-arms what it reports
  CHECK(count(all) == 0);

  publish(ring[5], 0, 9);
  std::fill(taken.begin(), taken.end(), 0);
  harvester.take_unarmed(0, taken);
  publish(ring[6], 0, 10);
  std::vector<std::uint64_t> unnamed(2), of_vcpu0(2);
  harvester.take_by_vcpu(0, unnamed, std::vector<std::span<std::uint64_t>>{of_vcpu0});
  CHECK(unnamed == std::vector<std::uint64_t>{1ull << 9, 0});  // left unarmed: reported, by no vCPU
  CHECK(of_vcpu0 == std::vector<std::uint64_t>{1ull << 10, 0});
  std::fill(all.begin(), all.end(), 0);
  harvester.take(0, all);  // and re-armed, as take() does
  CHECK(count(all) == 0);
  CHECK_THROWS_WITH(harvester.rearm(0, 1, all), Catch::Contains("multiple of 64"));
}

TEST_CASE("the dirty limiter holds each vCPU that is ahead of its cap until the cap catches up - and no other") {
  using namespace std::chrono_literals;
  using Clock = vmm::DirtyLimiter::Clock;
  std::vector<std::uint64_t> dirtied{0, 0};
  std::vector<std::pair<unsigned, Clock::time_point>> holds;
  vmm::DirtyLimiter limiter([&] { return dirtied; }, [&](unsigned vcpu, Clock::time_point until) { holds.emplace_back(vcpu, until); });
  auto held_until = [&](unsigned vcpu) -> std::optional<Clock::duration> {
    for (const auto& [held, until] : holds)
      if (held == vcpu) return until.time_since_epoch();
    return std::nullopt;
  };
  auto near = [](std::optional<Clock::duration> got, Clock::time_point want) {
    return got && std::chrono::abs(*got - want.time_since_epoch()) < 1us;
  };
  const auto t0 = Clock::now();
  limiter.look(1000, t0);  // the pacing begins: 1000 pages a second for each vCPU
  CHECK(holds.empty());

  dirtied = {500, 5};  // 10 ms on, vCPU 0 has dirtied half a second's worth; vCPU 1 less than its share
  limiter.look(1000, t0 + 10ms);
  CHECK(near(held_until(0), t0 + 500ms));
  CHECK_FALSE(held_until(1));

  // vCPU 1 idles until 300 ms: it banks no more than 10 ms of it, so a burst then is held.
  holds.clear();
  limiter.look(1000, t0 + 300ms);
  CHECK(near(held_until(0), t0 + 500ms));  // still held: its count has not moved
  CHECK_FALSE(held_until(1));
  dirtied = {500, 105};
  holds.clear();
  limiter.look(1000, t0 + 310ms);
  CHECK(near(held_until(1), t0 + 400ms));  // paced from 300 ms, not from the start

  // A new cap starts every vCPU's pacing afresh.
  holds.clear();
  limiter.look(2000, t0 + 320ms);
  CHECK(holds.empty());
}
