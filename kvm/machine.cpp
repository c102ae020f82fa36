#include "kvm/machine.h"

#include <signal.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <stdexcept>

#include "common/thread_name.h"

namespace mig::kvm {

namespace {

// Delivered to a vCPU thread to knock it out of KVM_RUN. The handler does nothing: what
// matters is that KVM_RUN returns EINTR.
int kick_signal() { return SIGRTMIN; }

void install_kick_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_handler = [](int) {};
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;  // no SA_RESTART: the ioctl must return
    if (::sigaction(kick_signal(), &sa, nullptr) != 0) throw_errno("sigaction(kick signal)");
  });
}

// Only Intel's PML holds a vCPU's dirty pages back until it leaves the guest. AMD hosts and
// PVM (shadow paging) log each page in the ring as the guest's write faults, so a harvest
// there needs no kick: on this PVM host the kicks alone made a ring harvest cost 0.8-3 ms.
bool vcpus_buffer_dirty_pages() {
  static const bool pml = [] {
    std::ifstream parameter("/sys/module/kvm_intel/parameters/pml");
    char enabled = 'N';
    return parameter >> enabled && (enabled == 'Y' || enabled == '1');
  }();
  return pml;
}

void validate(const MachineConfig& config) {
  if (config.vcpus == 0 || config.vcpus > kMaxVcpus)
    throw std::invalid_argument("vCPU count must be between 1 and " + std::to_string(kMaxVcpus));
  std::uint64_t total = 0;
  for (const auto& r : config.layout) total += r.size;
  if (total < (4u << 20)) throw std::invalid_argument("guest memory must be at least 4 MiB");
}

}  // namespace

std::unique_ptr<Machine> Machine::create(const MachineConfig& config) {
  validate(config);
  KvmSystem sys = KvmSystem::open(config.kvm_path);
  // Before any memory is built: a model this host cannot give is refused at once.
  auto cpuid = config.cpu_model ? apply_cpu_model(*config.cpu_model, sys.supported_cpuid()) : sys.supported_cpuid();
  GuestMemory memory = config.shared_memory_fds.empty() ? GuestMemory::create(config.layout, config.memory)
                                                       : GuestMemory::adopt(config.layout, config.shared_memory_fds);
  Vm vm = Vm::create(sys, config.dirty_ring_entries);
  vm.map_memory(memory);
  return std::unique_ptr<Machine>(new Machine(config, std::move(sys), std::move(memory), std::move(vm), std::move(cpuid)));
}

Machine::Machine(const MachineConfig& config, KvmSystem sys, GuestMemory memory, Vm vm, CpuidEntries cpuid)
    : config_(config), sys_(std::move(sys)), guest_cpuid_(std::move(cpuid)), memory_(std::move(memory)), vm_(std::move(vm)),
      serial_(config.serial_path), probe_(config.vcpus), thread_ids_(config.vcpus), held_until_(config.vcpus),
      run_phase_(config.vcpus),
      ring_full_exits_(config.vcpus) {
  install_kick_handler();
  for (unsigned i = 0; i < config.vcpus; ++i) vcpus_.push_back(Vcpu::create(sys_, vm_, i, guest_cpuid_));
  if (vm_.dirty_ring_entries() > 0) {
    std::vector<std::span<DirtyGfn>> rings;
    for (const auto& vcpu : vcpus_) rings.push_back(vcpu.dirty_ring());
    std::vector<std::uint64_t> slot_pages;
    for (std::size_t slot = 0; slot < vm_.slot_count(); ++slot) slot_pages.push_back(vm_.slot_pages(slot));
    dirty_rings_ = std::make_unique<DirtyRingHarvester>(std::move(rings), std::move(slot_pages), [this] { vm_.reset_dirty_rings(); });
  }
  guest_tsc_khz_ = vcpus_[0].tsc_khz();
  // Sorted so that IA32_TSC (0x10) is restored before IA32_TSC_DEADLINE (0x6e0).
  std::vector<std::uint32_t> msrs = vcpus_[0].restorable_msrs(sys_.msr_index_list());
  std::sort(msrs.begin(), msrs.end());
  for (auto& vcpu : vcpus_) vcpu.set_saved_msrs(msrs);
}

Machine::~Machine() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
    pause_requested_ = true;
  }
  for (std::size_t i = 0; i < threads_.size(); ++i) {
    vcpus_[i].run()->immediate_exit = 1;
    ::pthread_kill(threads_[i].native_handle(), kick_signal());
  }
  state_changed_.notify_all();
  for (auto& t : threads_) t.join();
}

void Machine::boot(const MultibootImage& image, const std::string& cmdline) {
  const BootInfo info = load_multiboot(image, memory_, cmdline);
  vcpus_[0].set_multiboot_entry(info.entry, info.info_addr);
}

void Machine::attach_disk(std::unique_ptr<DiskImage> image) {
  if (!threads_.empty()) throw std::logic_error("Machine::attach_disk after start");
  // I/O ports from 0xc000, as SeaBIOS assigns them on QEMU's pc machine; INTA# on GSI 10/11.
  const auto index = static_cast<std::uint16_t>(disks_.size());
  disks_.push_back(std::make_unique<VirtioBlk>(vm_, memory_, std::move(image),
                                               static_cast<std::uint16_t>(0xc000 + index * VirtioBlk::kBarSize),
                                               static_cast<std::uint8_t>(10 + index % 2)));
  pci_.attach(*disks_.back());
}

void Machine::set_dirty_logging(bool on) {
  // Before logging starts: pages published before are not this log's, and a page dropped
  // after it started would be lost.
  if (on && dirty_rings_) dirty_rings_->forget();
  vm_.set_dirty_logging(on);
}

void Machine::fetch_and_clear_dirty_log(std::size_t slot, std::span<std::uint64_t> bitmap) {
  fetch_dirty_log(slot, bitmap, true);
}

void Machine::fetch_dirty_log_unarmed(std::size_t slot, std::span<std::uint64_t> bitmap) {
  fetch_dirty_log(slot, bitmap, false);
}

void Machine::fetch_dirty_log(std::size_t slot, std::span<std::uint64_t> bitmap, bool rearm) {
  if (dirty_rings_) {
    std::fill(bitmap.begin(), bitmap.end(), 0);
    flush_vcpu_dirty_buffers();
    if (rearm)
      dirty_rings_->take(slot, bitmap);
    else
      dirty_rings_->take_unarmed(slot, bitmap);
  } else if (rearm) {
    vm_.fetch_and_clear_dirty_log(slot, bitmap);
  } else {
    vm_.fetch_dirty_log_unarmed(slot, bitmap);
  }
  memory_.take_vmm_writes(slot, bitmap);
}

// With rings, what a vCPU's PML buffer still holds counts as written after: no kick here.
void Machine::rearm_dirty_pages(std::size_t slot, std::uint64_t first_page, std::span<const std::uint64_t> pages) {
  if (dirty_rings_)
    dirty_rings_->rearm(slot, first_page, pages);
  else
    vm_.rearm_dirty_pages(slot, first_page, pages);
}

void Machine::fetch_dirty_log_by_vcpu(std::size_t slot, std::span<std::uint64_t> bitmap,
                                      std::span<const std::span<std::uint64_t>> vcpu_bitmaps) {
  if (!dirty_rings_) throw std::logic_error("Machine::fetch_dirty_log_by_vcpu needs dirty rings");
  for (auto words : vcpu_bitmaps) std::fill(words.begin(), words.end(), 0);
  std::fill(bitmap.begin(), bitmap.end(), 0);
  flush_vcpu_dirty_buffers();
  dirty_rings_->take_by_vcpu(slot, bitmap, vcpu_bitmaps);
  memory_.take_vmm_writes(slot, bitmap);
}

std::vector<std::uint64_t> Machine::pages_dirtied_by_vcpu() {
  if (!dirty_rings_) throw std::logic_error("Machine::pages_dirtied_by_vcpu needs dirty rings");
  flush_vcpu_dirty_buffers();
  return dirty_rings_->pages_added_by_vcpu();
}

// On Intel's PML a vCPU's dirty pages reach its ring only when it leaves the guest: KVM
// flushes the PML buffer (up to 512 pages) at every exit. KVM_GET_DIRTY_LOG kicks the vCPUs
// itself; a ring harvest does not. So before one, every vCPU that may be in the guest is
// kicked out once, as QEMU does, and waited for, at most 50 ms: past that its pages come with
// the next round instead. Nothing is lost either way: the pause's exits flush the last ones.
// Without PML there is nothing to flush, and no vCPU is disturbed.
void Machine::flush_vcpu_dirty_buffers() {
  if (!vcpus_buffer_dirty_pages()) return;
  using clock = std::chrono::steady_clock;
  std::vector<std::uint64_t> phase(threads_.size());
  for (std::size_t i = 0; i < threads_.size(); ++i) phase[i] = run_phase_[i].load();
  for (const auto give_up = clock::now() + std::chrono::milliseconds(50);;) {
    bool all_left = true;
    for (std::size_t i = 0; i < threads_.size(); ++i) {
      if (phase[i] % 2 == 0 || run_phase_[i].load() != phase[i]) continue;
      all_left = false;
      // Again at each look: a kick that lands just before KVM_RUN is lost.
      ::pthread_kill(threads_[i].native_handle(), kick_signal());
    }
    if (all_left || clock::now() > give_up) return;
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

void Machine::hold_vcpu(unsigned index, std::chrono::steady_clock::time_point until) {
  {
    // Under the lock, so that a vCPU already held sees the new time (a release among them).
    std::lock_guard lock(mutex_);
    held_until_.at(index).store(until.time_since_epoch().count());
  }
  state_changed_.notify_all();
  // A signal only, not immediate_exit: that is the pause's, and a vCPU about to enter runs
  // on until its next exit or the next hold, which costs it no more than a look's period.
  if (index < threads_.size()) ::pthread_kill(threads_[index].native_handle(), kick_signal());
}

void Machine::start() {
  if (!threads_.empty()) throw std::logic_error("Machine::start called twice");
  pause_requested_ = false;
  for (auto& disk : disks_) disk->resume();
  for (auto& vcpu : vcpus_) vcpu.run()->immediate_exit = 0;
  for (unsigned i = 0; i < vcpus_.size(); ++i) threads_.emplace_back([this, i] { vcpu_loop(i); });
}

void Machine::pause() {
  {
    std::lock_guard lock(mutex_);
    pause_requested_ = true;
  }
  state_changed_.notify_all();  // a held vCPU goes to park
  // immediate_exit before the signal: a thread that checked the flag just before we set it
  // and is about to enter KVM_RUN then returns at once instead of running on.
  for (std::size_t i = 0; i < threads_.size(); ++i) {
    __atomic_store_n(&vcpus_[i].run()->immediate_exit, 1, __ATOMIC_SEQ_CST);
    ::pthread_kill(threads_[i].native_handle(), kick_signal());
  }
  {
    std::unique_lock lock(mutex_);
    state_changed_.wait(lock, [&] { return parked_ + stopped_ == threads_.size(); });
  }
  for (auto& disk : disks_) disk->quiesce();
}

void Machine::resume() {
  if (threads_.empty()) return start();
  for (auto& disk : disks_) disk->resume();
  std::lock_guard lock(mutex_);
  for (auto& vcpu : vcpus_) vcpu.run()->immediate_exit = 0;
  pause_requested_ = false;
  state_changed_.notify_all();
}

void Machine::park(Vcpu& vcpu) {
  // One more KVM_RUN with immediate_exit set completes an I/O instruction whose exit we just
  // handled (its result is only written back into registers on re-entry), without running
  // the guest. Only then is the saved state consistent.
  vcpu.run()->immediate_exit = 1;
  vcpu.enter();
  std::unique_lock lock(mutex_);
  ++parked_;
  state_changed_.notify_all();
  state_changed_.wait(lock, [&] { return !pause_requested_.load() || stopping_; });
  --parked_;
}

// Dirty-limit: keeps vCPU `index` out of the guest until its hold ends, or a pause or the
// end comes. Returns whether it held it.
bool Machine::wait_while_held(unsigned index) {
  using clock = std::chrono::steady_clock;
  auto until = [&] { return clock::time_point{clock::duration(held_until_[index].load())}; };
  if (until() <= clock::now()) return false;
  std::unique_lock lock(mutex_);
  while (!pause_requested_.load() && !stopping_ && clock::now() < until()) state_changed_.wait_until(lock, until());
  return true;
}

// KVM_RUN, with run_phase_ odd meanwhile (flush_vcpu_dirty_buffers waits on it).
bool Machine::enter_guest(unsigned index) {
  run_phase_[index].fetch_add(1);
  try {
    const bool exited = vcpus_[index].enter();
    run_phase_[index].fetch_add(1);
    return exited;
  } catch (...) {
    run_phase_[index].fetch_add(1);
    throw;
  }
}

std::vector<int> Machine::vcpu_thread_ids() const {
  std::vector<int> ids;
  for (const auto& id : thread_ids_) ids.push_back(id.load());
  return ids;
}

std::vector<std::uint64_t> Machine::dirty_ring_full_exits() const {
  std::vector<std::uint64_t> exits;
  for (const auto& count : ring_full_exits_) exits.push_back(count.load(std::memory_order_relaxed));
  return exits;
}

void Machine::vcpu_loop(unsigned index) {
  Vcpu& vcpu = vcpus_[index];
  name_this_thread("vcpu" + std::to_string(index));
  thread_ids_[index] = static_cast<int>(::gettid());
  try {
    for (;;) {
      if (pause_requested_.load()) {
        park(vcpu);
        std::lock_guard lock(mutex_);
        if (stopping_) break;
        continue;
      }
      if (wait_while_held(index)) continue;
      if (!enter_guest(index)) continue;  // kicked
      if (!dispatch_exit(vcpu)) break;
    }
  } catch (const std::exception& e) {
    fail("vCPU " + std::to_string(index) + ": " + e.what());
  }
  std::lock_guard lock(mutex_);
  ++stopped_;
  state_changed_.notify_all();
}

bool Machine::dispatch_exit(Vcpu& vcpu) {
  kvm_run* run = vcpu.run();
  switch (run->exit_reason) {
    case KVM_EXIT_IO: {
      auto* data = reinterpret_cast<std::uint8_t*>(run) + run->io.data_offset;
      const bool is_write = run->io.direction == KVM_EXIT_IO_OUT;
      for (std::uint32_t i = 0; i < run->io.count; ++i, data += run->io.size) {
        if (serial_.handles(run->io.port))
          serial_.io(run->io.port, is_write, data);
        else if (probe_.handles(run->io.port))
          probe_.io(vcpu.index(), run->io.port, is_write, data, run->io.size);
        else if (pci_.handles(run->io.port))
          pci_.io(run->io.port, is_write, data, run->io.size);
        else if (VirtioBlk* disk = disk_at(run->io.port))
          disk->io(run->io.port, is_write, data, run->io.size);
        else if (!is_write)
          std::memset(data, 0xff, run->io.size);  // nothing there: the bus floats high
      }
      return true;
    }
    case KVM_EXIT_MMIO:
      if (!run->mmio.is_write) std::memset(run->mmio.data, 0xff, sizeof run->mmio.data);
      return true;
    case KVM_EXIT_INTR:
      return true;
    case KVM_EXIT_DIRTY_RING_FULL:
      // Its ring is (nearly) full: it re-enters only once a harvest and a reset free it.
      ring_full_exits_[vcpu.index()].fetch_add(1, std::memory_order_relaxed);
      dirty_rings_->harvest();
      return true;
    case KVM_EXIT_HLT:
      fail("vCPU " + std::to_string(vcpu.index()) + " halted with interrupts off");
      return false;
    case KVM_EXIT_SHUTDOWN:
      fail("vCPU " + std::to_string(vcpu.index()) + ": guest shut down (triple fault)");
      return false;
    case KVM_EXIT_FAIL_ENTRY:
      fail("vCPU " + std::to_string(vcpu.index()) + ": KVM could not enter the guest, hardware reason " +
           std::to_string(run->fail_entry.hardware_entry_failure_reason));
      return false;
    case KVM_EXIT_INTERNAL_ERROR:
      fail("vCPU " + std::to_string(vcpu.index()) + ": KVM internal error, suberror " +
           std::to_string(run->internal.suberror));
      return false;
    default:
      fail("vCPU " + std::to_string(vcpu.index()) + ": unhandled exit reason " + std::to_string(run->exit_reason));
      return false;
  }
}

void Machine::fail(std::string reason) {
  std::lock_guard lock(mutex_);
  if (!failure_) failure_ = std::move(reason);
}

std::optional<std::string> Machine::failure() const {
  std::lock_guard lock(mutex_);
  return failure_;
}

MachineState Machine::save_state() const {
  if (!pause_requested_.load()) throw std::logic_error("Machine::save_state needs a paused machine");
  MachineState state;
  for (const auto& vcpu : vcpus_) state.vcpus.push_back(vcpu.save_state());
  state.vm = vm_.save_state();
  state.serial = serial_.save();
  state.probe = probe_.save();
  for (const auto& disk : disks_) state.disks.push_back(disk->save());
  return state;
}

void Machine::restore_state(const MachineState& state) {
  if (!pause_requested_.load()) throw std::logic_error("Machine::restore_state needs a paused machine");
  if (state.vcpus.size() != vcpus_.size())
    throw std::runtime_error("saved state has " + std::to_string(state.vcpus.size()) + " vCPUs, this machine " +
                             std::to_string(vcpus_.size()));
  for (std::size_t i = 0; i < vcpus_.size(); ++i) vcpus_[i].restore_state(state.vcpus[i]);
  // The guest keeps the CPU and TSC rate it had on its source, whatever this host offers.
  guest_cpuid_ = state.vcpus[0].cpuid;
  guest_tsc_khz_ = state.vcpus[0].tsc_khz;
  // VM-wide state after the vCPUs: the PIC and IOAPIC deliver into LAPICs that now exist in
  // their saved form, and kvmclock is set last, as close to resuming as we can.
  vm_.restore_state(state.vm);
  serial_.restore(state.serial);
  probe_.restore(state.probe);
  if (state.disks.size() != disks_.size())
    throw std::runtime_error("saved state has " + std::to_string(state.disks.size()) + " disks, this machine " +
                             std::to_string(disks_.size()));
  for (std::size_t i = 0; i < disks_.size(); ++i) disks_[i]->restore(state.disks[i]);
}

VirtioBlk* Machine::disk_at(std::uint16_t port) const {
  for (const auto& disk : disks_)
    if (disk->handles(port)) return disk.get();
  return nullptr;
}

}  // namespace mig::kvm
