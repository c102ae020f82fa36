#include "vmm/synthetic_vm.h"

#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstring>

#include "common/thread_name.h"
#include "guest/probe.h"
#include "kvm/machine.h"
#include "transport/bytes.h"

namespace mig::vmm {

namespace {

constexpr std::uint32_t kSectionVersion = 2;  // 2: the computing vCPUs
constexpr double kMaxDirtyMBps = 1e6;
constexpr std::chrono::milliseconds kHeartbeatPeriod{1};
constexpr std::uint64_t kDiskBlock = 64 * 1024;
constexpr std::uint64_t kDiskSpan = 64ull << 20;  // the part of the disk from offset 0 that is written
constexpr double kDiskMBps = 2;                   // blocks written per second, in MB/s

std::uint64_t total_pages(const kvm::GuestMemory& memory) { return memory.total_bytes() / kvm::kPageSize; }

// A block's contents for its number and generation: every word differs, so a block written
// elsewhere, an old generation or a torn write all show.
void disk_pattern(std::span<std::uint64_t> words, std::uint64_t block, std::uint32_t generation) {
  for (std::size_t i = 0; i < words.size(); ++i) words[i] = ((block << 32) | generation) ^ (i * 0x9E3779B97F4A7C15ull);
}

}  // namespace

SyntheticVm::SyntheticVm(kvm::GuestMemory memory, unsigned vcpus, SyntheticWorkload workload,
                         std::vector<std::unique_ptr<kvm::DiskImage>> disks, DirtyTracking tracking)
    : memory_(std::move(memory)), workload_(workload), probe_(vcpus), sweeps_(vcpus), thread_ids_(vcpus) {
  if (vcpus == 0 || vcpus > kvm::kMaxVcpus)
    throw std::invalid_argument("a synthetic guest has 1 to " + std::to_string(kvm::kMaxVcpus) + " vCPUs");
  shares_ = plan_shares(total_pages(memory_), vcpus, workload.compute_vcpus);
  for (auto& image : disks) disks_.push_back(std::make_unique<ImageDisk>(std::move(image)));
  if (!disks_.empty()) disk_work_.generations.resize(std::min(kDiskSpan, disks_[0]->size()) / kDiskBlock);
  if (tracking.kind == DirtyTracking::Kind::ring) {
    std::vector<std::uint64_t> region_pages;
    for (const auto& r : memory_.regions()) region_pages.push_back(r.layout.size / kvm::kPageSize);
    rings_ = std::make_unique<SoftDirtyRings>(vcpus, region_pages, tracking.ring_entries);
  }
}

// The sweeping vCPUs split memory evenly; the computing ones, the last, get none.
std::vector<SyntheticVm::Share> SyntheticVm::plan_shares(std::uint64_t pages, unsigned vcpus, unsigned computing) {
  if (computing >= vcpus) throw std::invalid_argument("a synthetic guest needs one vCPU at least that sweeps memory");
  const unsigned sweeping = vcpus - computing;
  if (pages < sweeping) throw std::invalid_argument("a synthetic guest needs a page of memory per sweeping vCPU at least");
  std::vector<Share> shares(vcpus);
  for (unsigned i = 0; i < sweeping; ++i) {
    shares[i].first_page = pages * i / sweeping;
    shares[i].pages = pages * (i + 1) / sweeping - shares[i].first_page;
  }
  return shares;
}

SyntheticVm::~SyntheticVm() = default;

std::unique_ptr<SyntheticVm> SyntheticVm::boot(std::uint64_t mem_bytes, unsigned vcpus, const kvm::MemoryOptions& memory,
                                               SyntheticWorkload workload, std::vector<std::unique_ptr<kvm::DiskImage>> disks,
                                               DirtyTracking tracking) {
  if (!std::isfinite(workload.dirty_MBps) || workload.dirty_MBps < 0 || workload.dirty_MBps > kMaxDirtyMBps)
    throw std::invalid_argument("a synthetic guest dirties 0 to 1000000 MB/s");
  const auto layout = kvm::pc_memory_layout(mem_bytes);
  std::unique_ptr<SyntheticVm> vm(
      new SyntheticVm(kvm::GuestMemory::create(layout, memory), vcpus, workload, std::move(disks), tracking));
  vm->resume();
  return vm;
}

engine::VmFactory SyntheticVm::factory(kvm::MemoryOptions memory, std::vector<kvm::DiskConfig> disks, DirtyTracking tracking) {
  return [memory, disks, tracking](const engine::VmShape& shape) -> std::unique_ptr<engine::MigratableVm> {
    auto images = open_incoming_disks(shape.disks, disks);
    std::vector<kvm::RegionLayout> layout;
    for (const auto& r : shape.regions) layout.push_back({r.guest_addr, r.size});
    if (shape.shared_memory_fds.empty()) require_host_memory(shape);
    auto guest_memory = shape.shared_memory_fds.empty() ? kvm::GuestMemory::create(layout, memory)
                                                        : kvm::GuestMemory::adopt(layout, shape.shared_memory_fds);
    return std::unique_ptr<SyntheticVm>(new SyntheticVm(std::move(guest_memory), shape.vcpus, {}, std::move(images), tracking));
  };
}

void SyntheticVm::start_dirty_log() {
  // The write log runs always; starting means forgetting what was written before.
  for (std::size_t i = 0; i < memory_.regions().size(); ++i) {
    std::vector<std::uint64_t> discarded((memory_.regions()[i].layout.size / kvm::kPageSize + 63) / 64);
    memory_.take_vmm_writes(i, discarded);
  }
  if (rings_) rings_->set_logging(true);
}

void SyntheticVm::stop_dirty_log() {
  if (rings_) rings_->set_logging(false);
}

void SyntheticVm::fetch_dirty_log(std::size_t region, std::span<std::uint64_t> bitmap) {
  std::fill(bitmap.begin(), bitmap.end(), 0);
  memory_.take_vmm_writes(region, bitmap);
  if (rings_) rings_->harvester().take(region, bitmap);
}

void SyntheticVm::fetch_dirty_log_unarmed(std::size_t region, std::span<std::uint64_t> bitmap) {
  std::fill(bitmap.begin(), bitmap.end(), 0);
  if (!rings_) return memory_.peek_vmm_writes(region, bitmap);
  memory_.take_vmm_writes(region, bitmap);
  rings_->harvester().take_unarmed(region, bitmap);
}

void SyntheticVm::rearm_dirty_pages(std::size_t region, std::uint64_t first_page, std::span<const std::uint64_t> pages) {
  if (rings_)
    rings_->harvester().rearm(region, first_page, pages);
  else
    memory_.forget_vmm_writes(region, first_page, pages);
}

void SyntheticVm::fetch_dirty_log_by_vcpu(std::size_t region, std::span<std::uint64_t> bitmap,
                                          std::span<const std::span<std::uint64_t>> vcpu_bitmaps) {
  if (!rings_) return MigratableVm::fetch_dirty_log_by_vcpu(region, bitmap, vcpu_bitmaps);
  std::fill(bitmap.begin(), bitmap.end(), 0);
  memory_.take_vmm_writes(region, bitmap);
  for (auto vcpu_bitmap : vcpu_bitmaps) std::fill(vcpu_bitmap.begin(), vcpu_bitmap.end(), 0);
  rings_->harvester().take_by_vcpu(region, bitmap, vcpu_bitmaps);
}

bool SyntheticVm::set_throttle(double share) {
  throttler_.set(share);
  return true;
}

bool SyntheticVm::set_vcpu_dirty_limit(double bytes_per_s) {
  if (!rings_) return false;  // a bitmap cannot say which vCPU dirtied a page
  {
    std::lock_guard lock(mutex_);  // so that a vCPU held under the old cap sees the new one
    dirty_limit_pages_per_s_.store(std::max(bytes_per_s, 0.0) / kvm::kPageSize);
  }
  changed_.notify_all();
  return true;
}

std::vector<int> SyntheticVm::vcpu_threads() const {
  std::lock_guard lock(mutex_);
  return thread_ids_;
}

void SyntheticVm::start_vcpus() {
  for (unsigned i = 0; i < sweeps_.size(); ++i)
    vcpus_.emplace_back([this, i](std::stop_token stop) { run_vcpu(i, stop); });
}

void SyntheticVm::pause() {
  throttler_.stop();
  pause_vcpus();
}

void SyntheticVm::resume() {
  resume_vcpus();
  if (vcpus_.empty()) start_vcpus();
}

void SyntheticVm::pause_vcpus() {
  std::unique_lock lock(mutex_);
  pause_requested_ = true;
  changed_.notify_all();  // wakes a vCPU held to its dirty limit
  changed_.wait(lock, [&] { return vcpus_.empty() || parked_ == vcpus_.size(); });
}

void SyntheticVm::resume_vcpus() {
  {
    std::lock_guard lock(mutex_);
    pause_requested_ = false;
  }
  changed_.notify_all();
}

bool SyntheticVm::park_while_paused(std::stop_token stop) {
  std::unique_lock lock(mutex_);
  if (!pause_requested_) return false;
  ++parked_;
  changed_.notify_all();
  changed_.wait(lock, stop, [&] { return !pause_requested_; });
  --parked_;
  return true;
}

void SyntheticVm::run_vcpu(unsigned index, std::stop_token stop) {
  using clock = std::chrono::steady_clock;
  name_this_thread("vcpu" + std::to_string(index));  // as a KVM guest's: tools find them by name
  {
    std::lock_guard lock(mutex_);
    thread_ids_[index] = static_cast<int>(::gettid());
  }
  const bool computing = computes(index);
  if (computing) report(index, MIG_PROBE_READY, 0);  // it has no memory to fill
  const double blocks_per_heartbeat = index == 0 && !disks_.empty() ? kDiskMBps * 1e6 / kDiskBlock / 1000 : 0;
  double credit = 0, disk_credit = 0;
  DirtyPacing pacing;
  auto next_heartbeat = clock::now();
  while (!stop.stop_requested()) {
    if (park_while_paused(stop)) next_heartbeat = clock::now();  // a paused guest does not catch up
    if (stop.stop_requested()) break;  // stopped while paused: not one write more
    if (!computing && hold_to_dirty_limit(index, pacing, stop)) continue;  // held: a pause may have come meanwhile
    next_heartbeat += kHeartbeatPeriod;
    if (computing) {
      compute_period(index, next_heartbeat);
    } else {
      sweep_period(index, next_heartbeat, credit);
    }
    for (disk_credit += blocks_per_heartbeat; disk_credit >= 1; disk_credit -= 1) disk_step();
    report(index, MIG_PROBE_HEARTBEAT, static_cast<std::uint32_t>(++sweeps_[index].heartbeat_seq));
    std::this_thread::sleep_until(next_heartbeat);
    // Behind by more than a few periods (an overloaded host, a held vCPU): no burst of
    // heartbeats to catch up.
    if (clock::now() - next_heartbeat > 10 * kHeartbeatPeriod) next_heartbeat = clock::now();
  }
}

// One heartbeat period of sweeping: flat out while filling memory (or with no rate), else
// the vCPU's part of the guest's rate.
void SyntheticVm::sweep_period(unsigned index, std::chrono::steady_clock::time_point until, double& credit) {
  const unsigned sweeping = vcpu_count() - workload_.compute_vcpus;
  const bool filling = sweeps_[index].pass == 0;
  if (filling || workload_.dirty_MBps == 0) {
    // Until the period ends, or the fill does: the vCPU has said it is ready, and from then on
    // keeps to its rate (a fill ends within a period, and the rest of it flat out would be a
    // burst of several thousand pages).
    while (std::chrono::steady_clock::now() < until && !(filling && sweeps_[index].pass > 0))
      for (int i = 0; i < 64; ++i) sweep_page(index);
    return;
  }
  for (credit += workload_.dirty_MBps * 1e6 / kvm::kPageSize / 1000 / sweeping; credit >= 1; credit -= 1) sweep_page(index);
}

// One heartbeat period of computing: chains of multiply-adds (an LCG) in units of 1024,
// which touch no memory, counted and reported.
void SyntheticVm::compute_period(unsigned index, std::chrono::steady_clock::time_point until) {
  std::uint64_t x = index, units = 0;
  while (std::chrono::steady_clock::now() < until) {
    for (int i = 0; i < 1024; ++i) x = x * 6364136223846793005ull + 1442695040888963407ull;
    ++units;
  }
  [[maybe_unused]] volatile std::uint64_t result = x;  // the work must be done
  report(index, MIG_PROBE_WORK, static_cast<std::uint32_t>(units));
}

// Dirty-limit: waits until what vCPU `index` published since its cap was set fits in the cap,
// or the cap changes. Returns whether it waited.
bool SyntheticVm::hold_to_dirty_limit(unsigned index, DirtyPacing& pacing, std::stop_token stop) {
  const double limit = dirty_limit_pages_per_s_.load();
  if (!rings_ || limit <= 0) return false;
  const auto now = std::chrono::steady_clock::now();
  const auto due = pacing.hold_until(limit, rings_->published(index), now);
  if (due <= now) return false;
  std::unique_lock lock(mutex_);
  changed_.wait_until(lock, stop, due, [&] { return pause_requested_ || dirty_limit_pages_per_s_.load() != limit; });
  return true;
}

// The workload guest's sweep: a page must hold the pass number it was left with.
void SyntheticVm::sweep_page(unsigned index) {
  Sweep& sweep = sweeps_[index];
  const Share& share = shares_[index];
  const GuestPage page = guest_page(share.first_page + sweep.position);
  // Atomic, since the migration reads the page while this thread writes it, as KVM's vCPUs do.
  std::atomic_ref word(*page.word);
  if (word.load(std::memory_order_relaxed) != sweep.pass) report(index, MIG_PROBE_CHECK_FAIL, MIG_CHECK_FAIL_SWEEP);
  word.store(sweep.pass + 1, std::memory_order_relaxed);
  if (!rings_) {
    memory_.note_vmm_write(page.guest_addr, sizeof(std::uint64_t));
  } else if (rings_->note_write(index, page.region, page.index)) {
    rings_->harvester().harvest();  // its ring is full: KVM would exit to the VMM, which harvests
  }
  if (++sweep.position < share.pages) return;
  sweep.position = 0;
  ++sweep.pass;
  report(index, MIG_PROBE_SWEEP_PASS, static_cast<std::uint32_t>(sweep.pass));
  if (sweep.pass == 1) report(index, MIG_PROBE_READY, 0);
}

// Writes the next block, then reads back the one written before it and checks it.
void SyntheticVm::disk_step() {
  DiskWork& work = disk_work_;
  if (work.failed || work.generations.empty()) return;
  std::vector<std::uint64_t> words(kDiskBlock / sizeof(std::uint64_t));
  try {
    const std::uint64_t block = work.next_block;
    disk_pattern(words, block, ++work.generations[block]);
    disks_[0]->guest_write(block * kDiskBlock, std::as_bytes(std::span(words)));
    if (work.previous_block != DiskWork::kNoBlock) {
      disks_[0]->read(work.previous_block * kDiskBlock, std::as_writable_bytes(std::span(words)));
      std::vector<std::uint64_t> expected(words.size());
      disk_pattern(expected, work.previous_block, work.generations[work.previous_block]);
      if (words != expected) report(0, MIG_PROBE_CHECK_FAIL, MIG_CHECK_FAIL_DISK_DATA);
      report(0, MIG_PROBE_DISK_CHECKS, ++work.checks);
    }
    work.previous_block = block;
    work.next_block = (block + 1) % work.generations.size();
  } catch (const std::exception&) {
    work.failed = true;
    report(0, MIG_PROBE_CHECK_FAIL, MIG_CHECK_FAIL_DISK_IO);
  }
}

std::vector<engine::MigratableDisk*> SyntheticVm::disks() {
  std::vector<engine::MigratableDisk*> out;
  for (auto& d : disks_) out.push_back(d.get());
  return out;
}

void SyntheticVm::report(unsigned vcpu, std::uint16_t port, std::uint32_t value) {
  std::uint8_t bytes[4];
  std::memcpy(bytes, &value, sizeof bytes);
  probe_.io(vcpu, port, true, bytes, sizeof bytes);
}

SyntheticVm::GuestPage SyntheticVm::guest_page(std::uint64_t page) const {
  for (std::uint32_t region = 0; region < memory_.regions().size(); ++region) {
    const auto& r = memory_.regions()[region];
    const std::uint64_t pages = r.layout.size / kvm::kPageSize;
    if (page < pages)
      return {reinterpret_cast<std::uint64_t*>(r.host() + page * kvm::kPageSize), r.layout.guest_addr + page * kvm::kPageSize,
              region, page};
    page -= pages;
  }
  throw std::logic_error("a synthetic vCPU's page lies outside its memory");
}

std::vector<engine::StateSection> SyntheticVm::save_state() {
  wire::ByteWriter sweeps;
  sweeps.put(workload_.dirty_MBps);
  sweeps.put(std::uint32_t{workload_.compute_vcpus});
  sweeps.put_vector(sweeps_);
  std::vector<engine::StateSection> sections = {{"synthetic", kSectionVersion, sweeps.take()},
                                                {"probe", kSectionVersion, encode_heartbeats(probe_.save())}};
  if (disks_.empty()) return sections;
  wire::ByteWriter disk;
  disk.put(disk_work_.next_block);
  disk.put(disk_work_.previous_block);
  disk.put(disk_work_.checks);
  disk.put(static_cast<std::uint8_t>(disk_work_.failed));
  disk.put_vector(disk_work_.generations);
  sections.push_back({"synthetic.disk", kSectionVersion, disk.take()});
  return sections;
}

SyntheticVm::DiskWork SyntheticVm::decode_disk_work(std::span<const std::byte> data) const {
  wire::ByteReader r(data);
  DiskWork work;
  work.next_block = r.get<std::uint64_t>("synthetic disk section");
  work.previous_block = r.get<std::uint64_t>("synthetic disk section");
  work.checks = r.get<std::uint32_t>("synthetic disk section");
  work.failed = r.get<std::uint8_t>("synthetic disk section") != 0;
  work.generations = r.get_vector<std::uint32_t>(kDiskSpan / kDiskBlock, "synthetic disk section");
  r.expect_end("synthetic disk section");
  const auto blocks = disk_work_.generations.size();
  if (work.generations.size() != blocks || work.next_block >= blocks ||
      (work.previous_block != DiskWork::kNoBlock && work.previous_block >= blocks))
    throw wire::ProtocolError("the synthetic disk section does not fit this guest's first disk");
  return work;
}

void SyntheticVm::restore_state(const std::vector<engine::StateSection>& sections) {
  std::optional<std::vector<Sweep>> sweeps;
  std::optional<std::vector<kvm::HeartbeatState>> heartbeats;
  std::optional<DiskWork> disk_work;
  SyntheticWorkload workload;
  for (const auto& s : sections) {
    const bool expected = (s.name == "synthetic" && !sweeps) || (s.name == "probe" && !heartbeats) ||
                          (s.name == "synthetic.disk" && !disk_work && !disks_.empty());
    if (!expected)
      throw wire::ProtocolError("state section '" + s.name + "' is not a synthetic guest's: this receiver takes synthetic guests only");
    if (s.version != kSectionVersion)
      throw wire::ProtocolError("state section '" + s.name + "' has version " + std::to_string(s.version) +
                                ", this build restores version " + std::to_string(kSectionVersion));
    if (s.name == "synthetic") {
      wire::ByteReader r(s.data);
      workload.dirty_MBps = r.get<double>("synthetic section");
      workload.compute_vcpus = r.get<std::uint32_t>("synthetic section");
      sweeps = r.get_vector<Sweep>(kvm::kMaxVcpus, "synthetic section");
      r.expect_end("synthetic section");
    } else if (s.name == "probe") {
      heartbeats = decode_heartbeats(s.data);
    } else {
      disk_work = decode_disk_work(s.data);
    }
  }
  if (!sweeps || !heartbeats || disk_work.has_value() != !disks_.empty())
    throw wire::ProtocolError("state is incomplete: the synthetic, probe or synthetic disk section is missing");
  if (!std::isfinite(workload.dirty_MBps) || workload.dirty_MBps < 0 || workload.dirty_MBps > kMaxDirtyMBps)
    throw wire::ProtocolError("the synthetic guest's dirty rate is out of range");
  if (sweeps->size() != sweeps_.size()) throw wire::ProtocolError("the synthetic section's vCPU count differs from the guest's");
  std::vector<Share> shares;
  try {
    shares = plan_shares(total_pages(memory_), vcpu_count(), workload.compute_vcpus);
  } catch (const std::invalid_argument& e) {
    throw wire::ProtocolError(std::string("the synthetic section's computing vCPUs do not fit: ") + e.what());
  }
  for (std::size_t i = 0; i < sweeps_.size(); ++i) {
    if ((*sweeps)[i].position >= std::max<std::uint64_t>(shares[i].pages, 1))  // a computing vCPU's stays 0
      throw wire::ProtocolError("the synthetic section's sweep of vCPU " + std::to_string(i) + " does not fit the guest's memory");
  }
  workload_ = workload;
  shares_ = std::move(shares);
  sweeps_ = *sweeps;
  if (disk_work) disk_work_ = std::move(*disk_work);
  probe_.restore(*heartbeats);
}

}  // namespace mig::vmm
