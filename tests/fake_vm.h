// A MigratableVm with plain memory, for engine tests without KVM. A writer thread can dirty
// pages while a migration runs; pause() stops it the way stopping vCPUs would.
#pragma once

#include <sys/socket.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <future>
#include <functional>
#include <cstring>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <utility>

#include "common/page_allocator.h"
#include "engine/incoming_migration.h"
#include "engine/pages.h"
#include "engine/source_migration.h"
#include "engine/vm.h"
#include "kvm/disk_image.h"
#include "vmm/image_disk.h"
#include "transport/stream.h"

namespace mig::test {

// A disk on a real image file (real OFD locks, real holes), written by the test as a guest
// would write it (ImageDisk::guest_write).
using vmm::ImageDisk;

class FakeVm final : public engine::MigratableVm {
 public:
  explicit FakeVm(std::vector<std::uint64_t> region_pages) {
    for (std::size_t r = 0; r < region_pages.size(); ++r) {
      memory_.emplace_back(region_pages[r] * engine::kPageSize);
      dirty_.emplace_back((region_pages[r] + 63) / 64);
      touched_.emplace_back((region_pages[r] + 63) / 64);
    }
  }

  std::vector<wire::CpuidLeaf> cpuid;  // what guest_cpuid() says
  std::vector<wire::CpuidLeaf> guest_cpuid() const override { return cpuid; }
  std::uint32_t tsc_khz = 0;  // what guest_tsc_khz() says
  std::uint32_t guest_tsc_khz() const override { return tsc_khz; }
  std::vector<int> memory_fds;  // what shareable_memory_fds() says; only offered, never handed over
  std::vector<int> shareable_memory_fds() const override { return memory_fds; }

  // Writes `value` at the start of a page, as a vCPU would: refused while paused.
  bool write(std::size_t region, std::uint64_t page, std::uint64_t value) {
    std::lock_guard lock(mutex_);
    if (paused_) return false;
    std::memcpy(memory_[region].data() + page * engine::kPageSize + (value % 512) * 8, &value, 8);
    set(touched_[region], page);
    if (logging_) set(dirty_[region], page);
    return true;
  }
  const GuestBytes& region_memory(std::size_t r) const { return memory_[r]; }
  GuestBytes& region_memory(std::size_t r) { return memory_[r]; }

  unsigned vcpu_count() const override { return 2; }
  std::vector<engine::MemoryRegion> memory_regions() const override {
    std::vector<engine::MemoryRegion> out;
    for (std::size_t r = 0; r < memory_.size(); ++r)
      out.push_back({r << 30, memory_[r].size(), const_cast<std::byte*>(memory_[r].data())});
    return out;
  }
  void start_dirty_log() override {
    std::lock_guard lock(mutex_);
    logging_ = true;
    for (auto& d : dirty_) std::fill(d.begin(), d.end(), 0);
  }
  void stop_dirty_log() override {
    std::lock_guard lock(mutex_);
    logging_ = false;
    if (fail_stop_dirty_log) throw std::runtime_error("KVM_SET_USER_MEMORY_REGION: out of memory");
  }
  void fetch_dirty_log(std::size_t region, std::span<std::uint64_t> bitmap) override { fetch(region, bitmap, true); }
  // Re-arming waits for the engine, as with KVM's manual protection: the bits stay set.
  void fetch_dirty_log_unarmed(std::size_t region, std::span<std::uint64_t> bitmap) override {
    fetch(region, bitmap, false);
  }
  void rearm_dirty_pages(std::size_t region, std::uint64_t first_page, std::span<const std::uint64_t> pages) override {
    std::lock_guard lock(mutex_);
    engine::clear_pages(dirty_[region], first_page, pages);
  }
  void populated_pages(std::size_t region, std::span<std::uint64_t> bitmap) override {
    {
      std::lock_guard lock(mutex_);
      std::copy(touched_[region].begin(), touched_[region].end(), bitmap.begin());
    }
    if (after_populated) after_populated(*this, region);  // a write the scan just missed
  }
  // Throttling works only with `throttle_calms_at` set; a thrashing guest then calms down once
  // throttled that far, as a CPU-bound writer slowed enough would.
  bool set_throttle(double share) override {
    if (!throttle_calms_at) return false;
    std::lock_guard lock(mutex_);
    throttles.push_back(share);
    if (share >= *throttle_calms_at) thrash = false;
    return true;
  }
  // A dirty limit works only with `dirty_limit_calms_at` set (bytes/s); a thrashing guest
  // then calms down under a cap that low, as a vCPU held to it would.
  bool set_vcpu_dirty_limit(double bytes_per_s) override {
    if (!dirty_limit_calms_at) return false;
    std::lock_guard lock(mutex_);
    dirty_limits.push_back(bytes_per_s);
    if (bytes_per_s > 0 && bytes_per_s <= *dirty_limit_calms_at) thrash = false;
    return true;
  }
  void pause() override {
    std::lock_guard lock(mutex_);
    paused_ = true;
    ++pauses;
  }
  void resume() override {
    {
      std::lock_guard lock(mutex_);
      paused_ = false;
      ++resumes;
    }
    if (after_resume) after_resume(*this);
  }
  bool paused() {
    std::lock_guard lock(mutex_);
    return paused_;
  }
  std::vector<engine::StateSection> save_state() override {
    return {{"fake.cpu", 3, {std::byte{0xab}, std::byte{0xcd}}}, {"fake.dev", 1, {}}};
  }
  void restore_state(const std::vector<engine::StateSection>& sections) override { restored = sections; }
  std::vector<engine::MigratableDisk*> disks() override {
    std::vector<engine::MigratableDisk*> out;
    for (auto& d : disk_list) out.push_back(d.get());
    return out;
  }
  std::vector<std::unique_ptr<ImageDisk>> disk_list;

  std::atomic<int> pauses{0}, resumes{0};
  bool thrash = false;
  bool fail_stop_dirty_log = false;
  std::optional<double> throttle_calms_at;
  std::vector<double> throttles;  // every set_throttle() call
  std::optional<double> dirty_limit_calms_at;
  std::vector<double> dirty_limits;  // every set_vcpu_dirty_limit() call
  std::function<void(FakeVm&)> before_fetch;
  std::function<void(FakeVm&)> after_resume;  // on the thread that resumed it
  std::function<void(FakeVm&, std::size_t region)> after_populated;
  std::vector<engine::StateSection> restored;

 private:
  static void set(std::vector<std::uint64_t>& bits, std::uint64_t page) { bits[page / 64] |= 1ull << (page % 64); }
  void fetch(std::size_t region, std::span<std::uint64_t> bitmap, bool rearm) {
    if (before_fetch && region == 0) before_fetch(*this);  // the guest's writes during the round
    std::lock_guard lock(mutex_);
    // A thrashing guest rewrites everything it ever touched between any two fetches.
    const auto& source = thrash ? touched_[region] : dirty_[region];
    std::copy(source.begin(), source.end(), bitmap.begin());
    if (rearm) std::fill(dirty_[region].begin(), dirty_[region].end(), 0);
  }
  std::mutex mutex_;
  bool paused_ = false, logging_ = false;
  std::vector<GuestBytes> memory_;
  std::vector<std::vector<std::uint64_t>> dirty_, touched_;
};

// Dirties random pages of `vm` until stopped.
class Writer {
 public:
  Writer(FakeVm& vm, std::uint64_t pages, std::chrono::microseconds period)
      : thread_([&vm, pages, period, this] {
          std::mt19937_64 rng(7);
          std::uint64_t value = 1;
          while (!stop_) {
            vm.write(0, rng() % pages, value++);
            std::this_thread::sleep_for(period);
          }
        }) {}
  ~Writer() {
    stop_ = true;
    thread_.join();
  }

 private:
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

inline std::pair<transport::Stream, transport::Stream> stream_pair() {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) throw std::runtime_error("socketpair failed");
  return {transport::Stream(UniqueFd(fds[0])), transport::Stream(UniqueFd(fds[1]))};
}

// Socketpairs stand in for connections: what the sender opens, the receiver accepts.
class Connections {
 public:
  transport::Stream open() {
    auto [near, far] = test::stream_pair();
    std::lock_guard lock(mutex_);
    waiting_.push_back(std::move(far));
    ready_.notify_all();
    return std::move(near);
  }
  transport::Stream accept(std::chrono::milliseconds timeout) {
    std::unique_lock lock(mutex_);
    if (!ready_.wait_for(lock, timeout, [&] { return !waiting_.empty(); })) throw transport::PeerError("nobody connected");
    auto stream = std::move(waiting_.front());
    waiting_.pop_front();
    return stream;
  }

 private:
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<transport::Stream> waiting_;
};

// Builds FakeVms of the sender's shape; the last one built is left in *made. `open_disk`
// gives the image for each of the sender's disks.
using DiskOpener = std::function<std::unique_ptr<kvm::DiskImage>(const engine::VmShape::Disk&)>;
inline engine::VmFactory fake_factory(FakeVm** made, DiskOpener open_disk = {}) {
  return [made, open_disk](const engine::VmShape& shape) -> std::unique_ptr<engine::MigratableVm> {
    std::vector<std::uint64_t> pages;
    for (const auto& r : shape.regions) pages.push_back(r.size / engine::kPageSize);
    auto vm = std::make_unique<FakeVm>(pages);
    for (const auto& d : shape.disks) vm->disk_list.push_back(std::make_unique<ImageDisk>(open_disk(d)));
    *made = vm.get();
    return vm;
  };
}

struct FakeMigration {
  engine::MigrationStats sent;
  engine::IncomingResult received;
  FakeVm* destination = nullptr;  // owned by received.vm when it completed
};

// Migrates `source` to a receiver on another thread, over a socketpair.
inline FakeMigration migrate_fake(engine::MigratableVm& source, const engine::SenderOptions& options,
                                  std::shared_ptr<engine::MigrationControl> control = nullptr) {
  using namespace std::chrono_literals;
  auto [send_end, recv_end] = stream_pair();
  FakeMigration m;
  auto receiver = std::async(std::launch::async, [&, s = std::move(recv_end)]() mutable {
    return engine::IncomingMigration(s, fake_factory(&m.destination), engine::ReceiverOptions{2000ms, 100ms, {}, {}}).run();
  });
  m.sent = engine::SourceMigration(source, send_end, options, std::move(control)).run();
  send_end = transport::Stream(UniqueFd());  // closed, as a process that is done would
  m.received = receiver.get();
  return m;
}

}  // namespace mig::test
