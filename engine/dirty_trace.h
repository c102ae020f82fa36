// Dirty traces: which pages a guest wrote, interval by interval, recorded from a running VM
// (RecordingVm) or made from a workload description (synthesize_trace), and replayed by the
// simulator (engine/simulator.h) or by a VM that writes them again (bench/sim-validate).
//
// The file: a header (magic "MIGTRACE", version, interval, the guest's regions, the workload
// in words, the pages populated when recording began, how many vCPUs the frames name), then
// one frame per interval: dirty bitmaps of the whole guest (regions in order, a bit per
// page), zstd-compressed together. A frame holds one bitmap of the pages no vCPU is named for
// (the VMM's writes, or every write where the VM cannot tell, as with KVM's bitmap), then one
// per named vCPU. Sparse bitmaps compress to a few bytes, so a minute of a busy guest stays
// small. Version 1 files (no vCPUs named) are still read.
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <istream>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../engine/vm.h"

namespace mig::engine {

// A write no vCPU is named for: the VMM's, or any where the VM could not tell.
inline constexpr std::uint16_t kNoVcpu = 0xffff;

struct DirtyTrace {
  std::chrono::microseconds interval{10000};
  std::vector<wire::Region> regions;
  std::string workload;                       // what the guest ran, in words
  std::uint64_t pages = 0;                    // the guest's, all regions
  std::vector<std::uint64_t> populated;       // pages that held data when recording began, ascending
  std::vector<std::vector<std::uint64_t>> frames;  // per interval: the pages written, ascending
  // Where the VM said which vCPU dirtied a page (dirty rings): `vcpus` vCPUs, and per frame,
  // per page of it, the vCPU that dirtied it (or kNoVcpu). Otherwise 0 and empty. A ring
  // names a page once until it is reset, and the recorder resets every interval, so each
  // page of a frame has one writer.
  unsigned vcpus = 0;
  std::vector<std::vector<std::uint16_t>> writers;

  std::uint16_t writer(std::size_t frame, std::size_t index) const { return writers.empty() ? kNoVcpu : writers[frame][index]; }

  std::uint64_t guest_bytes() const { return pages * kPageSize; }
  double seconds() const { return static_cast<double>(frames.size()) * static_cast<double>(interval.count()) / 1e6; }
};

// Where in its interval a write of `page` in interval `interval` falls, in [0, 1): a fixed
// hash (splitmix64), since a trace records only the interval. Replays (the simulator, a VM
// writing a trace again) spread writes so, and agree on it.
inline double write_moment(std::uint64_t page, std::uint64_t interval) {
  std::uint64_t z = page * 0x9e3779b97f4a7c15ull + interval + 0x632be59bd9b4e019ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

inline constexpr std::uint32_t kEveryWriter = 0x10000;

// Calls visit(page, when) for each write of the trace in [from, to), times in intervals since
// the trace began, of one writer (a vCPU, or kNoVcpu) or of all. Past its end, the trace is
// replayed again from interval `loop_from` (where what it records is the workload, not the
// guest's boot or fill), which must be one of its intervals.
template <typename Visit>
void for_each_write(const DirtyTrace& trace, double from, double to, Visit&& visit, std::uint32_t only = kEveryWriter,
                    std::uint64_t loop_from = 0) {
  const std::uint64_t frames = trace.frames.size();
  for (auto j = static_cast<std::uint64_t>(from); static_cast<double>(j) < to; ++j) {
    const double begin = std::max(0.0, from - static_cast<double>(j)), end = std::min(1.0, to - static_cast<double>(j));
    const std::size_t frame = j < frames ? j : loop_from + (j - loop_from) % (frames - loop_from);
    const auto& pages = trace.frames[frame];
    for (std::size_t i = 0; i < pages.size(); ++i) {
      if (only != kEveryWriter && trace.writer(frame, i) != only) continue;
      const double moment = write_moment(pages[i], j);
      if (moment >= begin && moment < end) visit(pages[i], static_cast<double>(j) + moment);
    }
  }
}

// Throws std::runtime_error, one line naming the file and what is wrong with it (not a trace,
// another version, truncated, absurd sizes, a frame that does not decompress to its bitmap).
DirtyTrace read_trace(const std::string& path);
// The same from a stream (seekable); `name` is what errors call it.
DirtyTrace parse_trace(std::istream& in, const std::string& name);
void write_trace(const std::string& path, const DirtyTrace& trace);

// Appends frames to a trace file as they come, so a recording cut short keeps what it had.
class DirtyTraceWriter {
 public:
  // Writes the header: everything in `header` but its frames.
  DirtyTraceWriter(const std::string& path, const DirtyTrace& header);
  ~DirtyTraceWriter();
  DirtyTraceWriter(const DirtyTraceWriter&) = delete;
  DirtyTraceWriter& operator=(const DirtyTraceWriter&) = delete;
  // One interval: 1 + the header's vcpus bitmaps of all the guest's pages, regions in order,
  // one after the other: the pages no vCPU is named for, then each vCPU's.
  void append(std::span<const std::uint64_t> bitmaps);
  std::uint64_t bytes_written() const { return bytes_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::uint64_t bytes_ = 0;
};

// A workload as words, for traces without a guest: "random:rate=100M,wss=256M,mem=512M,seconds=30"
// (pages written uniformly at random in the first `wss` bytes, `rate` bytes per second),
// "sweep:..." (the same, but in address order, round and round), or "hotcold:...,hot=0.1"
// (90 % of writes go to the hottest tenth of the working set). `populated` (default the
// whole `mem`) is what held data at the start; `vcpus=N` names N vCPUs, which take the writes
// in turn (default 0: none named). Seeded, so the same words give the same trace.
// Throws std::invalid_argument for words it does not understand.
DirtyTrace synthesize_trace(const std::string& workload, std::chrono::microseconds interval = std::chrono::milliseconds(10));

// A MigratableVm that records its guest's dirty pages into a trace while it runs, and still
// serves the engine's dirty log: it owns the inner VM's log, fetches it every interval, and
// hands the engine what accumulated since the engine's last fetch (fetching afresh first, so
// the engine never misses a page). Where the inner VM names the vCPU that dirtied a page
// (dirty rings), so does the trace. Recording starts at construction and ends at destruction.
class RecordingVm final : public MigratableVm {
 public:
  RecordingVm(std::unique_ptr<MigratableVm> inner, const std::string& path, std::string workload,
              std::chrono::microseconds interval = std::chrono::milliseconds(10));
  ~RecordingVm() override;

  std::uint64_t frames_recorded() const;
  std::uint64_t bytes_written() const;

  unsigned vcpu_count() const override { return inner_->vcpu_count(); }
  std::vector<MemoryRegion> memory_regions() const override { return inner_->memory_regions(); }
  void start_dirty_log() override;
  void stop_dirty_log() override;
  void fetch_dirty_log(std::size_t region, std::span<std::uint64_t> bitmap) override;
  // The engine's pages re-arm when it says, whatever the inner VM does: a write after the
  // last look at the inner VM is reported next time.
  void fetch_dirty_log_unarmed(std::size_t region, std::span<std::uint64_t> bitmap) override;
  void rearm_dirty_pages(std::size_t region, std::uint64_t first_page, std::span<const std::uint64_t> pages) override;
  std::vector<int> shareable_memory_fds() const override { return inner_->shareable_memory_fds(); }
  void populated_pages(std::size_t region, std::span<std::uint64_t> bitmap) override { inner_->populated_pages(region, bitmap); }
  std::string postcopy_unsupported() const override { return inner_->postcopy_unsupported(); }
  std::vector<wire::CpuidLeaf> guest_cpuid() const override { return inner_->guest_cpuid(); }
  std::uint32_t guest_tsc_khz() const override { return inner_->guest_tsc_khz(); }
  std::vector<int> vcpu_threads() const override { return inner_->vcpu_threads(); }
  bool set_throttle(double share) override { return inner_->set_throttle(share); }
  bool set_vcpu_dirty_limit(double bytes_per_s) override { return inner_->set_vcpu_dirty_limit(bytes_per_s); }
  void pause() override { inner_->pause(); }
  void resume() override { inner_->resume(); }
  std::vector<StateSection> save_state() override { return inner_->save_state(); }
  void restore_state(const std::vector<StateSection>& sections) override { inner_->restore_state(sections); }
  std::vector<MigratableDisk*> disks() override { return inner_->disks(); }
  std::optional<GuestHandover> wait_guest_handover(std::chrono::milliseconds timeout) override {
    return inner_->wait_guest_handover(timeout);
  }

 private:
  // With mutex_ held: the inner log (of one region, or all) into this interval's bitmap and
  // the engine's.
  void fetch_inner(std::size_t region);
  void fetch_inner();
  void record();       // the recording thread

  std::unique_ptr<MigratableVm> inner_;
  const std::vector<MemoryRegion> regions_;
  const std::chrono::microseconds interval_;
  const unsigned named_vcpus_;  // 0 where the inner VM cannot tell
  std::unique_ptr<DirtyTraceWriter> writer_;
  mutable std::mutex mutex_;
  std::condition_variable stop_;
  bool stopping_ = false;
  std::vector<std::vector<std::uint64_t>> scratch_;  // per region, for the inner fetch: 1 + named_vcpus_ bitmaps
  std::vector<std::uint64_t> interval_bitmaps_;       // the whole guest's, this interval: 1 + named_vcpus_ bitmaps
  std::vector<std::vector<std::uint64_t>> engine_bitmaps_;  // per region, since the engine's last fetch
  bool engine_logging_ = false;
  std::uint64_t frames_ = 0;
  std::thread thread_;
};

}  // namespace mig::engine
