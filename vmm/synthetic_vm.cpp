#include "vmm/synthetic_vm.h"

#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstring>

#include "guest/probe.h"
#include "kvm/machine.h"
#include "transport/bytes.h"

namespace mig::vmm {

namespace {

constexpr std::uint32_t kSectionVersion = 1;
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
                         std::vector<std::unique_ptr<kvm::DiskImage>> disks)
    : memory_(std::move(memory)), workload_(workload), probe_(vcpus), shares_(vcpus), sweeps_(vcpus), thread_ids_(vcpus) {
  if (vcpus == 0 || vcpus > kvm::kMaxVcpus)
    throw std::invalid_argument("a synthetic guest has 1 to " + std::to_string(kvm::kMaxVcpus) + " vCPUs");
  const std::uint64_t pages = total_pages(memory_);
  if (pages < vcpus) throw std::invalid_argument("a synthetic guest needs a page of memory per vCPU at least");
  for (unsigned i = 0; i < vcpus; ++i) {
    shares_[i].first_page = pages * i / vcpus;
    shares_[i].pages = pages * (i + 1) / vcpus - shares_[i].first_page;
  }
  for (auto& image : disks) disks_.push_back(std::make_unique<ImageDisk>(std::move(image)));
  if (!disks_.empty()) disk_work_.generations.resize(std::min(kDiskSpan, disks_[0]->size()) / kDiskBlock);
}

SyntheticVm::~SyntheticVm() = default;

std::unique_ptr<SyntheticVm> SyntheticVm::boot(std::uint64_t mem_bytes, unsigned vcpus, const kvm::MemoryOptions& memory,
                                               SyntheticWorkload workload, std::vector<std::unique_ptr<kvm::DiskImage>> disks) {
  if (!std::isfinite(workload.dirty_MBps) || workload.dirty_MBps < 0 || workload.dirty_MBps > kMaxDirtyMBps)
    throw std::invalid_argument("a synthetic guest dirties 0 to 1000000 MB/s");
  const auto layout = kvm::pc_memory_layout(mem_bytes);
  std::unique_ptr<SyntheticVm> vm(new SyntheticVm(kvm::GuestMemory::create(layout, memory), vcpus, workload, std::move(disks)));
  vm->resume();
  return vm;
}

engine::VmFactory SyntheticVm::factory(kvm::MemoryOptions memory, std::vector<kvm::DiskConfig> disks) {
  return [memory, disks](const engine::VmShape& shape) -> std::unique_ptr<engine::MigratableVm> {
    if (shape.disks.size() < disks.size())
      throw std::runtime_error("mig-recv was given " + std::to_string(disks.size()) + " disks, the source has " +
                               std::to_string(shape.disks.size()));
    std::vector<std::unique_ptr<kvm::DiskImage>> images;
    for (std::size_t i = 0; i < shape.disks.size(); ++i) images.push_back(open_incoming_disk(shape.disks[i], i, disks));
    std::vector<kvm::RegionLayout> layout;
    for (const auto& r : shape.regions) layout.push_back({r.guest_addr, r.size});
    if (shape.shared_memory_fds.empty()) require_host_memory(shape);
    auto guest_memory = shape.shared_memory_fds.empty() ? kvm::GuestMemory::create(layout, memory)
                                                        : kvm::GuestMemory::adopt(layout, shape.shared_memory_fds);
    return std::unique_ptr<SyntheticVm>(new SyntheticVm(std::move(guest_memory), shape.vcpus, {}, std::move(images)));
  };
}

void SyntheticVm::start_dirty_log() {
  // The write log runs always; starting means forgetting what was written before.
  for (std::size_t i = 0; i < memory_.regions().size(); ++i) {
    std::vector<std::uint64_t> discarded((memory_.regions()[i].layout.size / kvm::kPageSize + 63) / 64);
    memory_.take_vmm_writes(i, discarded);
  }
}

void SyntheticVm::fetch_dirty_log(std::size_t region, std::span<std::uint64_t> bitmap) {
  std::fill(bitmap.begin(), bitmap.end(), 0);
  memory_.take_vmm_writes(region, bitmap);
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
  std::unique_lock lock(mutex_);
  pause_requested_ = true;
  changed_.wait(lock, [&] { return vcpus_.empty() || parked_ == vcpus_.size(); });
}

void SyntheticVm::resume() {
  {
    std::lock_guard lock(mutex_);
    pause_requested_ = false;
  }
  changed_.notify_all();
  if (vcpus_.empty()) start_vcpus();
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
  {
    std::lock_guard lock(mutex_);
    thread_ids_[index] = static_cast<int>(::gettid());
  }
  Sweep& sweep = sweeps_[index];
  const double pages_per_heartbeat = workload_.dirty_MBps * 1e6 / kvm::kPageSize / 1000 / vcpu_count();
  const double blocks_per_heartbeat = index == 0 && !disks_.empty() ? kDiskMBps * 1e6 / kDiskBlock / 1000 : 0;
  double credit = 0, disk_credit = 0;
  auto next_heartbeat = clock::now();
  while (!stop.stop_requested()) {
    if (park_while_paused(stop)) next_heartbeat = clock::now();  // a paused guest does not catch up
    if (stop.stop_requested()) break;  // stopped while paused: not one write more
    next_heartbeat += kHeartbeatPeriod;
    if (sweep.pass == 0 || workload_.dirty_MBps == 0) {
      while (clock::now() < next_heartbeat)
        for (int i = 0; i < 64; ++i) sweep_page(index);
    } else {
      for (credit += pages_per_heartbeat; credit >= 1; credit -= 1) sweep_page(index);
    }
    for (disk_credit += blocks_per_heartbeat; disk_credit >= 1; disk_credit -= 1) disk_step();
    report(index, MIG_PROBE_HEARTBEAT, static_cast<std::uint32_t>(++sweep.heartbeat_seq));
    std::this_thread::sleep_until(next_heartbeat);
    // Behind by more than a few periods (an overloaded host): no burst of heartbeats to catch up.
    if (clock::now() - next_heartbeat > 10 * kHeartbeatPeriod) next_heartbeat = clock::now();
  }
}

// The workload guest's sweep: a page must hold the pass number it was left with.
void SyntheticVm::sweep_page(unsigned index) {
  Sweep& sweep = sweeps_[index];
  const Share& share = shares_[index];
  std::uint64_t guest_addr = 0;
  // Atomic, since the migration reads the page while this thread writes it, as KVM's vCPUs do.
  std::atomic_ref word(*page_word(share.first_page + sweep.position, guest_addr));
  if (word.load(std::memory_order_relaxed) != sweep.pass) report(index, MIG_PROBE_CHECK_FAIL, MIG_CHECK_FAIL_SWEEP);
  word.store(sweep.pass + 1, std::memory_order_relaxed);
  memory_.note_vmm_write(guest_addr, sizeof(std::uint64_t));
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

std::uint64_t* SyntheticVm::page_word(std::uint64_t page, std::uint64_t& guest_addr) const {
  for (const auto& r : memory_.regions()) {
    const std::uint64_t pages = r.layout.size / kvm::kPageSize;
    if (page < pages) {
      guest_addr = r.layout.guest_addr + page * kvm::kPageSize;
      return reinterpret_cast<std::uint64_t*>(r.host() + page * kvm::kPageSize);
    }
    page -= pages;
  }
  throw std::logic_error("a synthetic vCPU's page lies outside its memory");
}

std::vector<engine::StateSection> SyntheticVm::save_state() {
  wire::ByteWriter sweeps;
  sweeps.put(workload_.dirty_MBps);
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
    if (s.version != kSectionVersion)
      throw wire::ProtocolError("state section '" + s.name + "' has version " + std::to_string(s.version) +
                                ", this build restores version " + std::to_string(kSectionVersion));
    if (s.name == "synthetic" && !sweeps) {
      wire::ByteReader r(s.data);
      workload.dirty_MBps = r.get<double>("synthetic section");
      sweeps = r.get_vector<Sweep>(kvm::kMaxVcpus, "synthetic section");
      r.expect_end("synthetic section");
    } else if (s.name == "probe" && !heartbeats) {
      heartbeats = decode_heartbeats(s.data);
    } else if (s.name == "synthetic.disk" && !disk_work && !disks_.empty()) {
      disk_work = decode_disk_work(s.data);
    } else {
      throw wire::ProtocolError("state section '" + s.name + "' is not a synthetic guest's: this receiver takes synthetic guests only");
    }
  }
  if (!sweeps || !heartbeats || disk_work.has_value() != !disks_.empty())
    throw wire::ProtocolError("state is incomplete: the synthetic, probe or synthetic disk section is missing");
  if (!std::isfinite(workload.dirty_MBps) || workload.dirty_MBps < 0 || workload.dirty_MBps > kMaxDirtyMBps)
    throw wire::ProtocolError("the synthetic guest's dirty rate is out of range");
  if (sweeps->size() != sweeps_.size()) throw wire::ProtocolError("the synthetic section's vCPU count differs from the guest's");
  for (std::size_t i = 0; i < sweeps_.size(); ++i) {
    if ((*sweeps)[i].position >= shares_[i].pages)
      throw wire::ProtocolError("the synthetic section's sweep of vCPU " + std::to_string(i) + " does not fit the guest's memory");
  }
  workload_ = workload;
  sweeps_ = *sweeps;
  if (disk_work) disk_work_ = std::move(*disk_work);
  probe_.restore(*heartbeats);
}

}  // namespace mig::vmm
