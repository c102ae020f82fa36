// Dirty traces (files, synthesis, recording from a VM) and the simulator that replays them.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

#include "engine/dirty_trace.h"
#include "engine/simulator.h"
#include "fake_vm.h"

using namespace mig;
using namespace std::chrono_literals;
using Catch::Matchers::Contains;

namespace {

struct TempFile {
  std::string path = (std::filesystem::temp_directory_path() / ("mig-trace-" + std::to_string(::getpid()) + "-" +
                                                                std::to_string(counter++)))
                         .string();
  ~TempFile() { std::remove(path.c_str()); }
  static inline int counter = 0;
};

// A trace of `pages` pages that writes `per_interval` pages (the first ones) in every interval.
engine::DirtyTrace steady_trace(std::uint64_t pages, std::uint64_t per_interval, std::size_t intervals) {
  engine::DirtyTrace t;
  t.regions = {{0, pages * engine::kPageSize}};
  t.pages = pages;
  t.workload = "steady";
  for (std::uint64_t p = 0; p < pages; ++p) t.populated.push_back(p);
  std::vector<std::uint64_t> frame;
  for (std::uint64_t p = 0; p < per_interval; ++p) frame.push_back(p);
  t.frames.assign(intervals, frame);
  return t;
}

// `trace` with its writes named: each page's writer is `writer_of(page)` (a vCPU or kNoVcpu).
template <typename WriterOf>
engine::DirtyTrace named(engine::DirtyTrace trace, unsigned vcpus, WriterOf writer_of) {
  trace.vcpus = vcpus;
  trace.writers.clear();
  for (const auto& frame : trace.frames) {
    auto& writers = trace.writers.emplace_back();
    for (auto page : frame) writers.push_back(writer_of(page));
  }
  return trace;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

void overwrite(const std::string& path, std::size_t offset, const std::string& bytes) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// 100 MB/s, 1 ms each way, and nothing else: no set-up, restore or state to send.
engine::SimulatorOptions simple_link() {
  engine::SimulatorOptions o;
  o.bandwidth_Bps = 100e6;
  o.latency_ms = 1;
  o.setup_ms = 0;
  o.restore_ms = 0;
  o.state_bytes = 0;
  return o;
}

}  // namespace

TEST_CASE("a trace written is the trace read back, and a synthetic one is seeded and sized as asked") {
  const auto trace = engine::synthesize_trace("hotcold:rate=40M,wss=16M,mem=64M,seconds=2,populated=32M");
  CHECK(trace.pages == 16384);
  CHECK(trace.frames.size() == 200);
  CHECK(trace.populated.size() == 8192);
  std::uint64_t writes = 0;
  for (const auto& frame : trace.frames) {
    writes += frame.size();
    for (auto page : frame) CHECK(page < 4096);  // the working set
  }
  CHECK(writes > 15000);  // 40 MB/s for 2 s is 19531 writes, some to the same page in an interval
  CHECK(writes <= 19531);
  CHECK(engine::synthesize_trace("hotcold:rate=40M,wss=16M,mem=64M,seconds=2,populated=32M").frames == trace.frames);

  TempFile file;
  engine::write_trace(file.path, trace);
  const auto read = engine::read_trace(file.path);
  CHECK(read.interval == trace.interval);
  CHECK(read.regions == trace.regions);
  CHECK(read.workload == trace.workload);
  CHECK(read.populated == trace.populated);
  CHECK(read.frames == trace.frames);
  // Sparse bitmaps compress: 200 intervals of a 64 MiB guest in a few KiB.
  CHECK(std::filesystem::file_size(file.path) < 200 * 2048 / 4);

  // Named vCPUs take the writes in turn: the same pages, each with one of them.
  const auto named = engine::synthesize_trace("hotcold:rate=40M,wss=16M,mem=64M,seconds=2,populated=32M,vcpus=3");
  CHECK(named.frames == trace.frames);
  CHECK(named.vcpus == 3);
  REQUIRE(named.writers.size() == named.frames.size());
  std::uint64_t by_vcpu[4] = {};  // the last: none named, which must stay 0
  for (const auto& writers : named.writers)
    for (auto writer : writers) ++by_vcpu[std::min<std::size_t>(writer, 3)];
  for (int v = 0; v < 3; ++v) CHECK(by_vcpu[v] > writes / 4);
  CHECK(by_vcpu[3] == 0);
  CHECK(trace.writers.empty());
  CHECK_THROWS_WITH(engine::synthesize_trace("random:rate=1M,vcpus=1.5"), Contains("vcpus a whole number"));

  CHECK_THROWS_WITH(engine::synthesize_trace("zigzag:rate=1M"), Contains("not random, sweep or hotcold"));
  CHECK_THROWS_WITH(engine::synthesize_trace("random:speed=1M"), Contains("'speed=1M' is unknown"));
  CHECK_THROWS_WITH(engine::synthesize_trace("random:rate=fast"), Contains("rate=fast is not a quantity"));
}

TEST_CASE("a trace names the vCPU that dirtied each page, and a version 1 trace, which names none, is still read") {
  const auto trace = named(engine::synthesize_trace("random:rate=40M,wss=4M,mem=8M,seconds=1"), 3, [](std::uint64_t page) {
    return page % 4 == 3 ? engine::kNoVcpu : static_cast<std::uint16_t>(page % 4);
  });
  TempFile file;
  engine::write_trace(file.path, trace);
  const auto read = engine::read_trace(file.path);
  CHECK(read.vcpus == 3);
  CHECK(read.frames == trace.frames);
  CHECK(read.writers == trace.writers);
  std::uint64_t of_vcpu2 = 0;
  engine::for_each_write(read, 0, 100, [&](std::uint64_t page, double) { of_vcpu2 += page % 4 == 2; }, 2);
  std::uint64_t all_of_vcpu2 = 0;
  for (const auto& frame : read.frames) all_of_vcpu2 += static_cast<std::uint64_t>(std::count_if(frame.begin(), frame.end(), [](auto p) { return p % 4 == 2; }));
  CHECK(of_vcpu2 == all_of_vcpu2);

  // Version 1: the same header without the vCPU count (after the 6-byte workload "steady").
  engine::write_trace(file.path, steady_trace(1024, 10, 5));
  auto bytes = read_bytes(file.path);
  REQUIRE(bytes.substr(40, 6) == "steady");
  bytes.erase(46, 4);
  bytes.replace(8, 4, std::string("\x01\0\0\0", 4));
  std::ofstream(file.path, std::ios::binary | std::ios::trunc) << bytes;
  const auto old = engine::read_trace(file.path);
  CHECK(old.vcpus == 0);
  CHECK(old.writers.empty());
  CHECK(old.frames == steady_trace(1024, 10, 5).frames);
  CHECK(old.writer(0, 0) == engine::kNoVcpu);
}

TEST_CASE("a damaged trace is refused with one line naming the file and the damage") {
  TempFile file;
  engine::write_trace(file.path, steady_trace(1024, 10, 5));
  const auto size = std::filesystem::file_size(file.path);

  // Each damage, and the words that must name it.
  std::string expected;
  SECTION("not a trace") {
    overwrite(file.path, 0, "NOTATRAC");
    expected = "is not a dirty trace";
  }
  SECTION("another version") {
    overwrite(file.path, 8, std::string("\x07\0\0\0", 4));
    expected = "has version 7";
  }
  SECTION("an absurd vCPU count") {
    overwrite(file.path, 46, std::string("\x00\x00\x01\0", 4));
    expected = "names 65536 vCPUs";
  }
  SECTION("an absurd region count") {
    overwrite(file.path, 16, std::string("\xff\xff\0\0", 4));
    expected = "has 65535 regions";
  }
  SECTION("truncated in a frame") {
    std::filesystem::resize_file(file.path, size - 3);
    expected = "is truncated in its frame";
  }
  SECTION("a corrupt frame") {
    overwrite(file.path, size - 4, "ZZZZ");
    expected = "has a corrupt frame";
  }
  SECTION("a frame marking a page past the guest's end (found by fuzz_trace)") {
    // 1024 pages shrunk to 1000 in the header: the bitmaps keep their 16 words, and the
    // frame's pages 1000..1009 now lie beyond the guest.
    auto trace = steady_trace(1024, 1010, 5);
    trace.populated.resize(1000);
    engine::write_trace(file.path, trace);
    overwrite(file.path, 28, std::string("\x00\x80\x3e\0\0\0\0\0", 8));
    expected = "marks pages beyond the guest in its frame";
  }
  CHECK_THROWS_WITH(engine::read_trace(file.path), Contains("dirty trace " + file.path + " " + expected));
  CHECK_THROWS_WITH(engine::read_trace(file.path + ".missing"), Contains("cannot read the dirty trace"));
}

TEST_CASE("a recording VM writes what the guest dirtied, and the engine still sees every page") {
  TempFile file;
  auto fake = std::make_unique<test::FakeVm>(std::vector<std::uint64_t>{256, 64});
  test::FakeVm& guest = *fake;
  for (std::uint64_t p = 0; p < 16; ++p) guest.write(0, p, p + 1);  // populated before recording
  {
    engine::RecordingVm recording(std::move(fake), file.path, "two writes", 5ms);
    std::this_thread::sleep_for(20ms);
    guest.write(0, 100, 7);
    guest.write(1, 3, 9);
    std::this_thread::sleep_for(20ms);
    // The migration goes through the recorder: memory arrives whole, and verifies.
    const auto migration = test::migrate_fake(recording, engine::SenderOptions{});
    REQUIRE(migration.sent.status == engine::MigrationStatus::completed);
    CHECK(migration.sent.verified);
    REQUIRE(migration.destination != nullptr);
    CHECK(migration.destination->region_memory(0) == guest.region_memory(0));
    CHECK(migration.destination->region_memory(1) == guest.region_memory(1));
    CHECK(recording.frames_recorded() >= 4);
    // The brakes reach the guest through the recorder (a dirty limit once did not, and
    // dirty-limit ran without its cap whenever a trace was recorded).
    guest.dirty_limit_calms_at = 2e6;
    CHECK(recording.set_vcpu_dirty_limit(1e6));
    CHECK(guest.dirty_limits == std::vector<double>{1e6});
  }  // the guest, which the recorder owns, goes with it; the trace is complete

  const auto trace = engine::read_trace(file.path);
  CHECK(trace.workload == "two writes");
  CHECK(trace.interval == 5ms);
  CHECK(trace.pages == 320);
  CHECK(trace.populated.size() == 16);
  std::vector<std::uint64_t> written;
  for (const auto& frame : trace.frames) written.insert(written.end(), frame.begin(), frame.end());
  CHECK(std::count(written.begin(), written.end(), 100) == 1);
  CHECK(std::count(written.begin(), written.end(), 256 + 3) == 1);  // region 1 follows region 0
}

TEST_CASE("a page the guest writes while the recorder looks up populated pages is in the trace") {
  TempFile file;
  auto fake = std::make_unique<test::FakeVm>(std::vector<std::uint64_t>{256});
  test::FakeVm& guest = *fake;
  guest.after_populated = [](test::FakeVm& vm, std::size_t) { vm.write(0, 42, 1); };  // a fill racing the recorder
  {
    engine::RecordingVm recording(std::move(fake), file.path, "racing fill", 5ms);
    std::this_thread::sleep_for(20ms);
  }
  const auto trace = engine::read_trace(file.path);
  bool found = std::find(trace.populated.begin(), trace.populated.end(), 42u) != trace.populated.end();
  for (const auto& frame : trace.frames) found = found || std::find(frame.begin(), frame.end(), 42u) != frame.end();
  CHECK(found);
}

TEST_CASE("the simulator replays a trace through the policy and the round accounting") {
  auto o = simple_link();

  SECTION("an idle guest: round 0, then the final round with nothing left") {
    const auto trace = steady_trace(1000, 0, 100);
    const auto m = engine::simulate(trace, o);
    CHECK(m.rounds == 2);
    REQUIRE(m.round_table.size() == 1);
    CHECK(m.round_table[0].pages_sent == 1000);
    const double round0_ms = (1000.0 * engine::kWirePageBytes + 128) / 100e6 * 1000 + 2;
    CHECK(m.round_table[0].duration_s * 1000 == Approx(round0_ms));
    CHECK(m.downtime_ms == Approx(128 / 100e6 * 1000 + 3));  // the final frames, 1.5 round trips
    CHECK(m.total_ms == Approx(4 + round0_ms + m.downtime_ms + 1));
    CHECK(m.stop_reason == engine::StopReason::converged);
    CHECK(m.bytes_sent == 1000 * engine::kWirePageBytes + 256);
  }

  SECTION("a guest that writes 50 pages per 10 ms: each round leaves what its time let it write") {
    const auto trace = steady_trace(100000, 50, 1000);
    const auto m = engine::simulate(trace, o);
    REQUIRE(m.round_table.size() >= 2);
    // Round 0 takes about 4.1 s: every interval writes the same 50 pages.
    CHECK(m.round_table[0].dirty_pages == 50);
    CHECK(m.round_table[1].pages_sent == 50);
    CHECK(m.stop_reason == engine::StopReason::converged);
    CHECK(m.policy == "mig");
  }

  SECTION("a trace recorded from boot: what the guest wrote before the migration starts is sent in round 0") {
    auto trace = steady_trace(1000, 0, 100);
    trace.populated.clear();  // nothing held data when recording began
    for (std::uint64_t p = 0; p < 300; ++p) trace.frames[p / 10].push_back(p);  // written in the first 0.3 s
    o.trace_start_s = 0.5;
    const auto m = engine::simulate(trace, o);
    REQUIRE(m.round_table.size() == 1);
    CHECK(m.round_table[0].pages_sent == 300);
    o.trace_start_s = 0.15;  // half of them: the rest are written once the migration runs
    CHECK(engine::simulate(trace, o).round_table[0].pages_sent == 150);
  }

  SECTION("a trace shorter than the migration loops back to where the migration started, not to the guest's fill") {
    auto trace = steady_trace(1000, 0, 10);  // 0.1 s
    trace.populated.clear();
    for (std::uint64_t p = 0; p < 1000; ++p) trace.frames[0].push_back(p);  // the fill, then nothing
    o.bandwidth_Bps = 10e6;  // round 0 takes 0.41 s: the trace runs out four times over
    o.trace_start_s = 0.05;
    const auto m = engine::simulate(trace, o);
    REQUIRE(m.round_table.size() == 1);
    CHECK(m.round_table[0].dirty_pages == 0);
    o.trace_start_s = 0.1;
    CHECK_THROWS_WITH(engine::simulate(trace, o), Contains("within the trace (0 to 0.1 s)"));
  }

  SECTION("a page written before its turn leaves with the write, once; one written after it left is sent again") {
    auto trace = steady_trace(1000, 0, 100);
    for (std::uint64_t p = 900; p < 1000; ++p) trace.frames[0].push_back(p);  // early; their turn comes last
    for (std::uint64_t p = 0; p < 10; ++p) trace.frames[3].push_back(p);      // after they left
    const auto m = engine::simulate(trace, o);
    REQUIRE(m.round_table.size() == 1);
    CHECK(m.round_table[0].dirty_pages == 10);
    CHECK(m.bytes_sent == 1010 * engine::kWirePageBytes + 256);  // the ten go again in the final round
  }

  SECTION("a sender that reads ahead of the link: a write between a page's read and its leaving goes again") {
    auto trace = steady_trace(1000, 0, 100);
    // Pages 512 to 999, one stretch the sender re-arms as it reads page 512, which leaves at
    // about 21 ms: written at 10 to 20 ms, before that.
    for (std::uint64_t p = 900; p < 1000; ++p) trace.frames[1].push_back(p);
    CHECK(engine::simulate(trace, o).round_table[0].dirty_pages == 0);
    o.read_ahead_bytes = 500 * engine::kWirePageBytes;  // read about 20 ms early: the writes come after
    CHECK(engine::simulate(trace, o).round_table[0].dirty_pages == 100);
  }

  SECTION("under the sender's limit, the token buckets' first burst leaves at the link's rate, then the limit holds") {
    const auto trace = steady_trace(10000, 0, 100);
    o.bandwidth_Bps = 1e9;
    o.bandwidth_limit_Bps = 100e6;
    o.channels = 2;
    const double bytes = 10000.0 * engine::kWirePageBytes + 128;
    const double burst = 2 * 2.0 * (1 << 20);  // each channel's bucket holds 2 MiB (10 ms at 50 MB/s is less)
    const auto m = engine::simulate(trace, o);
    REQUIRE(m.round_table.size() == 1);
    CHECK(m.round_table[0].duration_s * 1000 == Approx((bytes - burst) / 100e6 * 1000 + 2));
    CHECK(m.downtime_ms == Approx(128 / 1e9 * 1000 + 3));  // the final round is not limited
    o.bandwidth_Bps = 50e6;  // a link slower than the limit: the limit never binds
    CHECK(engine::simulate(trace, o).round_table[0].duration_s * 1000 == Approx(bytes / 50e6 * 1000 + 2));
  }

  SECTION("under the sender's limit, a round spends what the last round trip left unspent, and no more") {
    // Pages 0-999 written in each of the first 3 s: round 0 (about 0.4 s) leaves 1000 dirty,
    // and round 1 starts with 2 ms of tokens, earned in round 0's round trip.
    const auto trace = steady_trace(10000, 1000, 300);
    o.bandwidth_Bps = 1e9;
    o.bandwidth_limit_Bps = 100e6;
    o.convergence.downtime_target_ms = 1;
    o.convergence.max_rounds = 2;
    const auto m = engine::simulate(trace, o);
    REQUIRE(m.round_table.size() == 2);
    REQUIRE(m.round_table[1].pages_sent == 1000);
    const double round1_bytes = 1000.0 * engine::kWirePageBytes + 128;
    CHECK(m.round_table[1].duration_s * 1000 == Approx((round1_bytes - 2e-3 * 100e6) / 100e6 * 1000 + 2));
  }

  SECTION("the same trace and options predict the same migration; a K-times guest sends K times the pages") {
    const auto trace = engine::synthesize_trace("random:rate=20M,wss=8M,mem=32M,seconds=5");
    const auto once = engine::simulate(trace, o);
    CHECK(engine::simulate(trace, o).total_ms == once.total_ms);
    o.guest_scale = 4;
    const auto big = engine::simulate(trace, o);
    CHECK(big.guest_bytes == 4 * once.guest_bytes);
    CHECK(big.round_table[0].pages_sent == 4 * once.round_table[0].pages_sent);
    CHECK(big.total_ms > 3 * once.total_ms);
  }

  SECTION("the policy decides: xen stops a guest that outruns the link, ovirt-steps gives up on it") {
    const auto trace = engine::synthesize_trace("random:rate=400M,wss=64M,mem=64M,seconds=20");
    o.policy = engine::PolicyRegistry::global().make("xen");
    const auto xen = engine::simulate(trace, o);
    CHECK(xen.policy == "xen");
    CHECK_FALSE(xen.aborted);
    CHECK_THAT(xen.stop_rule, Contains("xen:"));
    o.policy = engine::PolicyRegistry::global().make("ovirt-steps:steps=1:50");
    const auto ovirt = engine::simulate(trace, o);
    CHECK(ovirt.aborted);
    CHECK_THAT(ovirt.stop_rule, Contains("past the last step"));
  }

  SECTION("dirty-limit holds a trace's dirtying vCPU to the limit - where the trace names the vCPUs") {
    // vCPU 0 dirties 40 MB/s over a 20 MB/s link; vCPU 1 writes nothing.
    const auto unnamed = engine::synthesize_trace("random:rate=40M,wss=32M,mem=32M,seconds=20");
    const auto trace = named(unnamed, 2, [](std::uint64_t) { return std::uint16_t{0}; });
    o.bandwidth_Bps = 20e6;
    o.policy = engine::PolicyRegistry::global().make("dirty-limit:limit=1");
    const auto limited = engine::simulate(trace, o);
    CHECK(limited.stop_reason == engine::StopReason::converged);
    const auto& last = limited.round_table.back();
    CHECK(last.dirty_limit_MBps == 1);
    // 1 MB/s, and at most 10 ms of catching up, over the round.
    CHECK(static_cast<double>(last.dirty_pages * engine::kPageSize) <= 1e6 * (last.duration_s + 0.011));
    CHECK(last.dirty_pages > 0);

    // Unnamed, the same guest cannot take the limit: no brake, and it never converges.
    const auto unbraked = engine::simulate(unnamed, o);
    CHECK(unbraked.stop_reason != engine::StopReason::converged);
    for (const auto& r : unbraked.round_table) CHECK(r.dirty_limit_MBps == 0);
    // Nor is a write no vCPU is named for ever held.
    const auto vmm_writes = engine::simulate(named(unnamed, 2, [](std::uint64_t) { return engine::kNoVcpu; }), o);
    CHECK(vmm_writes.stop_reason != engine::StopReason::converged);
    CHECK(vmm_writes.round_table.back().dirty_limit_MBps == 1);
  }

  SECTION("options it cannot model are refused") {
    o.bandwidth_Bps = 0;
    CHECK_THROWS_WITH(engine::simulate(steady_trace(10, 1, 1), o), Contains("bandwidth"));
    o.bandwidth_Bps = 1e6;
    CHECK_THROWS_WITH(engine::simulate(steady_trace(10, 1, 0), o), Contains("no intervals"));
    o.bandwidth_limit_Bps = -1;
    CHECK_THROWS_WITH(engine::simulate(steady_trace(10, 1, 1), o), Contains("bandwidth limit"));
  }
}

TEST_CASE("the simulator switches to post-copy as the engine does, and each page left goes once") {
  auto o = simple_link();
  const double rtt_ms = 2, page_ms = engine::kWirePageBytes / 100e6 * 1000;

  SECTION("right after round 0: the pages dirtied meanwhile go after the switch, pushed or requested") {
    const auto trace = steady_trace(1000, 50, 1000);  // pages 0-49 written in every 10 ms
    o.postcopy = engine::SimulatorOptions::Postcopy::after_round_0;
    const auto m = engine::simulate(trace, o);
    REQUIRE(m.postcopy);
    const auto& p = *m.postcopy;
    CHECK(m.stop_reason == engine::StopReason::postcopy);
    CHECK(m.rounds == 2);
    REQUIRE(m.round_table.size() == 1);
    CHECK(p.pages_needed == 50);
    CHECK(p.pages_urgent + p.pages_background == 50);
    CHECK(p.requests == p.pages_urgent);
    CHECK(p.requests > 0);  // the guest writes some before the push reaches them
    CHECK(p.blocktime_ms == Approx(static_cast<double>(p.requests) * (rtt_ms + page_ms)));
    // The state (none here), the bitmap of 1000 pages and the frames, then Ready and Commit.
    CHECK(m.downtime_ms == Approx((128.0 + 128) / 100e6 * 1000 + 1.5 * rtt_ms));
    CHECK(p.switchover_ms == Approx(m.round_table[0].duration_s * 1000 + 2 * rtt_ms));
    // The link is busy until the last page has left, requested or not; a request is answered
    // before the push ends, and lands at most a round trip and a page later.
    CHECK(p.postcopy_ms >= Approx(50 * page_ms + rtt_ms));
    CHECK(p.postcopy_ms <= Approx(50 * page_ms + rtt_ms + rtt_ms + page_ms));
    CHECK(m.total_ms == Approx(p.switchover_ms + m.downtime_ms + 0.5 * rtt_ms + p.postcopy_ms));
    CHECK(p.bytes_before == m.round_table[0].bytes_sent);
    CHECK(p.bytes_after == 256 + 50 * engine::kWirePageBytes);
    CHECK(m.bytes_sent == p.bytes_before + p.bytes_after);
  }

  SECTION("a page the guest writes after the push delivered it is never requested") {
    auto trace = steady_trace(1000, 0, 1000);
    for (std::uint64_t p = 0; p < 50; ++p) trace.frames[3].push_back(p);  // during round 0, after their read
    for (std::uint64_t p = 0; p < 50; ++p) trace.frames[20].push_back(p);  // long after the switch
    o.postcopy = engine::SimulatorOptions::Postcopy::after_round_0;
    const auto p = engine::simulate(trace, o).postcopy.value();
    CHECK(p.pages_needed == 50);
    CHECK(p.requests == 0);
    CHECK(p.pages_background == 50);
    CHECK(p.blocktime_ms == 0);
    CHECK(p.postcopy_ms == Approx(50 * page_ms + rtt_ms));
  }

  SECTION("the push is paced by the sender's limit, the answers to requests are not; a writer waits for its page") {
    // Pages 0-499 are written at once (dirty: their stretch was re-armed as round 0 began),
    // and again within 10 ms, 2.5 s in: after the switch, with the push at 1 MB/s (4 ms a
    // page) about 125 pages in. Of the rest, those the writer reaches before the push does
    // are requested; each request holds it 2 ms, in which the push goes on half a page.
    auto trace = steady_trace(1000, 0, 1000);
    for (std::uint64_t p = 0; p < 500; ++p) {
      trace.frames[0].push_back(p);
      trace.frames[250].push_back(p);
    }
    o.bandwidth_limit_Bps = 1e6;
    o.postcopy = engine::SimulatorOptions::Postcopy::after_round_0;
    const auto m = engine::simulate(trace, o);
    const auto& p = m.postcopy.value();
    CHECK(p.pages_needed == 500);
    INFO("requests " << p.requests << ", post-copy " << p.postcopy_ms << " ms");
    CHECK(p.requests > 200);  // unpaced, the push would have delivered every page in 21 ms
    CHECK(p.requests < 300);  // a writer that did not wait would request every page not pushed yet
    CHECK(p.blocktime_ms == Approx(static_cast<double>(p.requests) * (rtt_ms + page_ms)));
    CHECK(p.postcopy_ms == Approx(static_cast<double>(p.pages_background) * engine::kWirePageBytes / 1e6 * 1000).epsilon(0.05));
  }

  SECTION("with post-copy on, a pre-copy that cannot converge switches instead of stopping or giving up") {
    const auto trace = engine::synthesize_trace("random:rate=400M,wss=64M,mem=64M,seconds=20");
    o.can_throttle = false;  // nor can auto-converge slow it
    o.postcopy = engine::SimulatorOptions::Postcopy::on_no_progress;
    const auto unconverged = engine::simulate(trace, o);
    CHECK(unconverged.stop_reason == engine::StopReason::postcopy);
    CHECK(unconverged.round_table.size() > 1);
    CHECK(unconverged.postcopy);
    o.policy = engine::PolicyRegistry::global().make("ovirt-steps:steps=1:50,then=postcopy");
    const auto ovirt = engine::simulate(trace, o);
    CHECK_FALSE(ovirt.aborted);
    CHECK(ovirt.postcopy);
    o.postcopy = engine::SimulatorOptions::Postcopy::off;  // the engine fails as the policy asks, and the source runs on
    CHECK(engine::simulate(trace, o).aborted);
  }

  SECTION("a guest that converges stops and copies, post-copy on or not") {
    const auto trace = steady_trace(1000, 0, 100);
    o.postcopy = engine::SimulatorOptions::Postcopy::on_no_progress;
    const auto m = engine::simulate(trace, o);
    CHECK(m.stop_reason == engine::StopReason::converged);
    CHECK_FALSE(m.postcopy);
  }
}
