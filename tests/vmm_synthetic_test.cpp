// The synthetic guest: no KVM needed, so these run everywhere.
#include <catch2/catch.hpp>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <thread>
#include <unistd.h>

#include "engine/dirty_trace.h"
#include "guest/probe.h"
#include "kvm/disk_image.h"
#include "transport/protocol.h"
#include "vmm/kvm_vm.h"
#include "vmm/synthetic_vm.h"

using namespace mig;
using namespace std::chrono;

namespace {

constexpr std::uint64_t kMem = 8ull << 20;

std::unique_ptr<vmm::SyntheticVm> boot(double dirty_MBps = 20) {
  auto vm = vmm::SyntheticVm::boot(kMem, 2, {}, {dirty_MBps});
  REQUIRE(vm->probe().wait_ready(seconds(20)));
  return vm;
}

std::uint64_t heartbeats(const vmm::SyntheticVm& vm) {
  std::uint64_t total = 0;
  for (const auto& hb : vm.probe().snapshot()) total += hb.count;
  return total;
}

std::uint64_t check_failures(const vmm::SyntheticVm& vm) {
  std::uint64_t total = 0;
  for (const auto& hb : vm.probe().snapshot()) total += hb.check_failures;
  return total;
}

std::uint64_t dirty_pages(vmm::SyntheticVm& vm) {
  std::vector<std::uint64_t> bitmap(kMem / engine::kPageSize / 64);
  vm.fetch_dirty_log(0, bitmap);
  std::uint64_t pages = 0;
  for (auto word : bitmap) pages += static_cast<std::uint64_t>(__builtin_popcountll(word));
  return pages;
}

// Waits until every vCPU has finished `passes` more sweeps, so each page was checked again.
void wait_for_passes(const vmm::SyntheticVm& vm, std::uint32_t passes) {
  const auto start = vm.probe().snapshot();
  for (int i = 0; i < 2000; ++i) {
    const auto now = vm.probe().snapshot();
    bool done = true;
    for (std::size_t v = 0; v < now.size(); ++v) done = done && now[v].sweep_passes >= start[v].sweep_passes + passes;
    if (done) return;
    std::this_thread::sleep_for(milliseconds(10));
  }
  FAIL("the synthetic guest's sweep did not advance");
}

}  // namespace

TEST_CASE("a paused synthetic guest neither writes nor beats, and its writes are in the dirty log") {
  auto vm = boot();
  vm->start_dirty_log();
  std::this_thread::sleep_for(milliseconds(50));
  vm->pause();
  CHECK(dirty_pages(*vm) > 0);
  const auto beats = heartbeats(*vm);
  std::this_thread::sleep_for(milliseconds(50));
  CHECK(heartbeats(*vm) == beats);
  CHECK(dirty_pages(*vm) == 0);
  vm->resume();
  std::this_thread::sleep_for(milliseconds(50));
  CHECK(heartbeats(*vm) > beats);
  CHECK(dirty_pages(*vm) > 0);
  CHECK(vm->vcpu_threads().size() == 2);
  CHECK(check_failures(*vm) == 0);
}

TEST_CASE("a synthetic guest reports a page that does not hold what it left there") {
  auto vm = boot(0);  // sweeping as fast as it can, so the damaged page comes round soon
  vm->pause();
  auto* word = reinterpret_cast<std::uint64_t*>(vm->memory_regions()[0].host + 5 * engine::kPageSize);
  *word += 7;
  vm->resume();
  wait_for_passes(*vm, 2);
  const auto hb = vm->probe().snapshot();
  CHECK(hb[0].check_failures >= 1);
  CHECK(hb[0].last_failure_code == MIG_CHECK_FAIL_SWEEP);
}

TEST_CASE("a synthetic guest's memory and state, moved by hand, run on with no failure and no break") {
  auto source = boot(0);
  source->pause();
  const auto sections = source->save_state();
  engine::VmShape shape{2, {{0, kMem}}, {}, {}};
  auto destination = vmm::SyntheticVm::factory({})(shape);
  std::memcpy(destination->memory_regions()[0].host, source->memory_regions()[0].host, kMem);
  destination->restore_state(sections);
  destination->resume();
  const auto handover = destination->wait_guest_handover(seconds(5));
  REQUIRE(handover);
  CHECK(handover->sequence_continued);
  auto& synthetic = dynamic_cast<vmm::SyntheticVm&>(*destination);
  wait_for_passes(synthetic, 2);
  CHECK(check_failures(synthetic) == 0);

  SECTION("a page left behind is found") {
    synthetic.pause();
    const auto sections_now = synthetic.save_state();
    auto second = vmm::SyntheticVm::factory({})(shape);
    std::memcpy(second->memory_regions()[0].host, synthetic.memory_regions()[0].host, kMem);
    std::memset(second->memory_regions()[0].host + 100 * engine::kPageSize, 0, engine::kPageSize);
    second->restore_state(sections_now);
    second->resume();
    auto& moved = dynamic_cast<vmm::SyntheticVm&>(*second);
    wait_for_passes(moved, 2);
    CHECK(check_failures(moved) >= 1);
  }
}

TEST_CASE("a synthetic guest refuses state that is not a synthetic guest's of its shape") {
  auto source = boot();
  source->pause();
  const auto good = source->save_state();
  engine::VmShape shape{2, {{0, kMem}}, {}, {}};
  auto restore = [&](std::vector<engine::StateSection> sections) { vmm::SyntheticVm::factory({})(shape)->restore_state(sections); };
  REQUIRE_NOTHROW(restore(good));
  auto with_synthetic = [&](auto change) {
    auto sections = good;
    change(sections[0].data);
    return sections;
  };
  const double nan = std::nan("");
  CHECK_THROWS_WITH(restore({{"vcpu.0", 1, {}}, good[1]}), Catch::Contains("not a synthetic guest's"));
  CHECK_THROWS_WITH(restore({good[1]}), Catch::Contains("incomplete"));
  CHECK_THROWS_WITH(restore({good[0], good[0], good[1]}), Catch::Contains("not a synthetic guest's"));
  CHECK_THROWS_WITH(restore(with_synthetic([&](auto& d) { std::memcpy(d.data(), &nan, sizeof nan); })),
                    Catch::Contains("dirty rate"));
  // The section: the rate (8 bytes), the computing vCPUs (4), the sweeps' byte count (8),
  // then per vCPU its position, pass and heartbeat sequence (8 bytes each).
  CHECK_THROWS_WITH(restore(with_synthetic([](auto& d) { std::memset(d.data() + 20, 0xff, 8); })),
                    Catch::Contains("does not fit"));
  CHECK_THROWS_WITH(restore(with_synthetic([](auto& d) {
                      const std::uint64_t one_vcpu = 24;
                      std::memcpy(d.data() + 12, &one_vcpu, 8);
                      d.resize(d.size() - 24);
                    })),
                    Catch::Contains("vCPU count"));
  CHECK_THROWS_WITH(restore(with_synthetic([](auto& d) { d[8] = std::byte{2}; })), Catch::Contains("computing vCPUs do not fit"));
  // vCPU 1 made a computing one: its sweep position must then be 0.
  CHECK_THROWS_WITH(restore(with_synthetic([](auto& d) {
                      d[8] = std::byte{1};
                      std::memset(d.data() + 44, 0x01, 1);
                    })),
                    Catch::Contains("sweep of vCPU 1 does not fit"));
  CHECK_THROWS_AS(restore(with_synthetic([](auto& d) { d.resize(d.size() - 3); })), wire::ProtocolError);
  CHECK_THROWS_WITH(vmm::SyntheticVm::factory({})(engine::VmShape{2, {{0, kMem}}, {}, {{1 << 20, 65536, true, "/x"}}}),
                    Catch::Contains("give mig-recv --disk PATH"));
  // And a KVM guest's VMM, the other way round, says what it was sent.
  CHECK_THROWS_WITH(vmm::decode_state(good), Catch::Contains("only a mig-recv --synthetic-guest takes it"));
}

TEST_CASE("a synthetic guest with a disk writes blocks, reads each back - and reports one found changed") {
  const std::string path = "/tmp/mig-synthetic-disk-" + std::to_string(::getpid()) + ".img";
  std::remove(path.c_str());
  std::vector<std::unique_ptr<kvm::DiskImage>> disks;
  disks.push_back(kvm::DiskImage::open({path, kvm::ImageFormat::raw, kvm::CacheMode::writeback}, kvm::DiskImage::Open::create, 8 << 20));
  auto vm = vmm::SyntheticVm::boot(kMem, 1, {}, {20}, std::move(disks));
  REQUIRE(vm->disks().size() == 1);
  auto disk_checks = [&] { return vm->probe().snapshot()[0].disk_checks; };
  for (int i = 0; i < 300 && disk_checks() < 5; ++i) std::this_thread::sleep_for(milliseconds(10));
  REQUIRE(disk_checks() >= 5);
  CHECK(check_failures(*vm) == 0);
  // Every block so far: damage them all, so the next read-back finds one changed.
  vm->pause();
  const std::vector<std::byte> zeros(1 << 20);
  dynamic_cast<vmm::ImageDisk&>(*vm->disks()[0]).image().write(0, zeros);
  vm->resume();
  for (int i = 0; i < 300 && check_failures(*vm) == 0; ++i) std::this_thread::sleep_for(milliseconds(10));
  CHECK(vm->probe().snapshot()[0].last_failure_code == MIG_CHECK_FAIL_DISK_DATA);
  vm.reset();
  std::remove(path.c_str());
}

namespace {

std::unique_ptr<vmm::SyntheticVm> boot_with_rings(double dirty_MBps, unsigned compute_vcpus = 0) {
  vmm::DirtyTracking rings;
  rings.kind = vmm::DirtyTracking::Kind::ring;
  rings.ring_entries = 64;  // small, so that rings fill up and the vCPUs harvest them too
  auto vm = vmm::SyntheticVm::boot(kMem, 2, {}, {dirty_MBps, compute_vcpus}, {}, rings);
  REQUIRE(vm->probe().wait_ready(seconds(20)));
  return vm;
}

std::uint64_t work(const vmm::SyntheticVm& vm, unsigned vcpu) { return vm.probe().work().at(vcpu); }

}  // namespace

TEST_CASE("with dirty rings a synthetic guest's log holds exactly the pages it wrote - full rings included") {
  auto vm = boot_with_rings(0);  // flat out: 64-entry rings fill many times a millisecond
  vm->pause();
  vm->start_dirty_log();
  CHECK(dirty_pages(*vm) == 0);
  const auto before = vm->probe().snapshot();
  vm->resume();
  std::this_thread::sleep_for(milliseconds(30));
  vm->pause();
  const auto after = vm->probe().snapshot();
  // Each vCPU sweeps its half (1024 pages) in order; while paused, every page either was
  // written since logging started or was not. A guest that wrote a whole pass meanwhile
  // dirtied all of them.
  const std::uint64_t dirtied = dirty_pages(*vm);
  CHECK(dirtied > 0);
  if (after[0].sweep_passes > before[0].sweep_passes + 1 && after[1].sweep_passes > before[1].sweep_passes + 1)
    CHECK(dirtied == kMem / engine::kPageSize);
  CHECK(dirty_pages(*vm) == 0);  // harvested and reset
  vm->stop_dirty_log();
  vm->resume();
  std::this_thread::sleep_for(milliseconds(20));
  vm->pause();
  CHECK(dirty_pages(*vm) == 0);  // logging off: nothing published
  CHECK(check_failures(*vm) == 0);
}

TEST_CASE("a dirty limit holds the dirtying vCPU to its cap - and leaves the computing one alone") {
  auto vm = boot_with_rings(40, 1);
  vm->start_dirty_log();
  const auto measure = [&] {
    dirty_pages(*vm);
    const auto work_before = work(*vm, 1);
    std::this_thread::sleep_for(milliseconds(500));
    return std::pair{dirty_pages(*vm), work(*vm, 1) - work_before};
  };
  const auto [free_pages, free_work] = measure();
  REQUIRE(vm->set_vcpu_dirty_limit(1e6));  // 1 MB/s: 122 pages in 500 ms
  std::this_thread::sleep_for(milliseconds(50));
  const auto [limited_pages, limited_work] = measure();
  INFO("pages dirtied in 500 ms: " << free_pages << " free, " << limited_pages << " at 1 MB/s; work: " << free_work << " free, "
                                   << limited_work << " limited");
  CHECK(free_pages > 2000);      // 40 MB/s: about 4900 in 500 ms
  CHECK(limited_pages < 400);    // 122, and at most 10 ms of catching up
  CHECK(limited_pages > 20);     // held to the cap, not stopped
  CHECK(limited_work > free_work / 2);  // the computing vCPU runs on (a loose bound: two cores, other tests)
  REQUIRE(vm->set_vcpu_dirty_limit(0));
  std::this_thread::sleep_for(milliseconds(50));
  CHECK(measure().first > 2000);
  vm->pause();  // a paused vCPU held to its cap still parks
  CHECK(check_failures(*vm) == 0);
}

TEST_CASE("lifting a dirty limit frees a vCPU held under it at once") {
  auto vm = boot_with_rings(40, 0);
  vm->start_dirty_log();
  REQUIRE(vm->set_vcpu_dirty_limit(4096));  // a page a second: past its credit, each vCPU waits a second a page
  std::this_thread::sleep_for(milliseconds(100));
  REQUIRE(vm->set_vcpu_dirty_limit(0));
  dirty_pages(*vm);
  std::this_thread::sleep_for(milliseconds(100));
  CHECK(dirty_pages(*vm) > 300);  // 40 MB/s: about 980 pages in 100 ms
  CHECK(check_failures(*vm) == 0);
}

TEST_CASE("a synthetic guest throttles as a whole - and takes a dirty limit only with rings") {
  auto vm = vmm::SyntheticVm::boot(kMem, 2, {}, {20, 1});
  REQUIRE(vm->probe().wait_ready(seconds(20)));
  CHECK_FALSE(vm->set_vcpu_dirty_limit(1e6));  // a bitmap cannot say which vCPU dirtied a page
  const auto work_in = [&](milliseconds time) {
    const auto before = work(*vm, 1);
    std::this_thread::sleep_for(time);
    return work(*vm, 1) - before;
  };
  const auto free_running = work_in(300ms);
  REQUIRE(vm->set_throttle(0.7));
  const auto throttled = work_in(300ms);
  INFO("work in 300 ms: " << free_running << " free, " << throttled << " throttled at 70 %");
  CHECK(throttled < free_running * 2 / 3);
  vm->pause();  // ends the throttle, and the throttler does not resume the vCPUs
  const auto parked = work(*vm, 1);
  std::this_thread::sleep_for(50ms);
  CHECK(work(*vm, 1) == parked);
  CHECK(vm->probe().snapshot()[1].ready);  // a computing vCPU is ready at once
}


TEST_CASE("a synthetic guest keeps to its rate from the moment it says it is ready") {
  // Its fill ends within a heartbeat period; the rest of that period used to run flat out, a
  // burst of thousands of pages after the guest said it was ready.
  for (int boot_number = 0; boot_number < 5; ++boot_number) {
    auto vm = vmm::SyntheticVm::boot(kMem, 2, {}, {1});
    REQUIRE(vm->probe().wait_ready(seconds(20)));
    vm->start_dirty_log();
    std::this_thread::sleep_for(milliseconds(100));
    INFO("boot " << boot_number);
    CHECK(dirty_pages(*vm) < 200);  // 1 MB/s: 24 pages in 100 ms
  }
}

TEST_CASE("a trace recorded from a synthetic guest with rings names the vCPU that dirtied each page") {
  const auto path = (std::filesystem::temp_directory_path() / ("mig-named-" + std::to_string(::getpid()) + ".trace")).string();
  {
    engine::RecordingVm recording(boot_with_rings(40), path, "two sweeping vCPUs", milliseconds(5));
    std::this_thread::sleep_for(milliseconds(100));
  }
  const auto trace = engine::read_trace(path);
  std::remove(path.c_str());
  CHECK(trace.vcpus == 2);
  REQUIRE(trace.writers.size() == trace.frames.size());
  // Each vCPU sweeps its own half of the guest; the VMM writes nothing meanwhile.
  std::uint64_t writes[2] = {};
  for (std::size_t f = 0; f < trace.frames.size(); ++f) {
    for (std::size_t i = 0; i < trace.frames[f].size(); ++i) {
      const auto writer = trace.writer(f, i);
      REQUIRE(writer < 2);
      CHECK(writer == (trace.frames[f][i] < trace.pages / 2 ? 0 : 1));
      ++writes[writer];
    }
  }
  CHECK(writes[0] > 200);  // 20 MB/s each: about 490 pages in 100 ms
  CHECK(writes[1] > 200);
}
