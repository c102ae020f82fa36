#include "kvm/vm.h"

#include <sys/ioctl.h>

#include <algorithm>
#include <bit>
#include <stdexcept>
#include <string>
#include <vector>

#include "kvm/dirty_ring.h"

namespace mig::kvm {

namespace {
// Where KVM puts the real-mode TSS (three pages) on Intel; just below the BIOS area, above
// any RAM we map (RAM stops at 3 GiB).
constexpr std::uint64_t kTssAddress = 0xfffbd000;

kvm_irqchip get_irqchip(int vm_fd, std::uint32_t chip_id) {
  kvm_irqchip chip{};
  chip.chip_id = chip_id;
  check_syscall("KVM_GET_IRQCHIP", [&] { return ::ioctl(vm_fd, KVM_GET_IRQCHIP, &chip); });
  return chip;
}
// KVM_CAP_DIRTY_LOG_RING, before any vCPU exists: the ACQ_REL flavour where the host has
// it (the collector reads and marks entries with acquire and release either way).
void enable_dirty_ring(const KvmSystem& sys, int vm_fd, std::uint32_t entries) {
  const bool acq_rel = sys.check_extension(KVM_CAP_DIRTY_LOG_RING_ACQ_REL) > 0;
  const int max_bytes = sys.check_extension(acq_rel ? KVM_CAP_DIRTY_LOG_RING_ACQ_REL : KVM_CAP_DIRTY_LOG_RING);
  if (max_bytes <= 0) throw std::runtime_error("this host's KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING): use the dirty bitmap");
  const std::uint64_t max_entries = static_cast<std::uint64_t>(max_bytes) / sizeof(DirtyGfn);
  // The kernel keeps entries in reserve (576 with Intel's PML buffer) and refuses a ring no
  // larger than that; QEMU's floor, 1024, clears it.
  constexpr std::uint32_t kMinEntries = 1024;
  if (entries < kMinEntries || entries > max_entries || !std::has_single_bit(entries))
    throw std::invalid_argument("a KVM dirty ring holds a power of two of entries, from " + std::to_string(kMinEntries) + " to " +
                                std::to_string(max_entries) + " on this host");
  const std::uint64_t bytes = std::uint64_t{entries} * sizeof(DirtyGfn);
  kvm_enable_cap cap{};
  cap.cap = acq_rel ? KVM_CAP_DIRTY_LOG_RING_ACQ_REL : KVM_CAP_DIRTY_LOG_RING;
  cap.args[0] = bytes;
  check_syscall("KVM_ENABLE_CAP(DIRTY_LOG_RING)", [&] { return ::ioctl(vm_fd, KVM_ENABLE_CAP, &cap); });
}

}  // namespace

Vm Vm::create(const KvmSystem& sys, std::uint32_t dirty_ring_entries) {
  Vm vm;
  vm.fd_ = UniqueFd(check_syscall("KVM_CREATE_VM", [&] { return ::ioctl(sys.fd(), KVM_CREATE_VM, 0); }));
  const int fd = vm.fd_.get();
  if (sys.check_extension(KVM_CAP_SET_TSS_ADDR) > 0)
    check_syscall("KVM_SET_TSS_ADDR", [&] { return ::ioctl(fd, KVM_SET_TSS_ADDR, kTssAddress); });
  check_syscall("KVM_CREATE_IRQCHIP", [&] { return ::ioctl(fd, KVM_CREATE_IRQCHIP, 0); });
  kvm_pit_config pit{};
  pit.flags = KVM_PIT_SPEAKER_DUMMY;
  check_syscall("KVM_CREATE_PIT2", [&] { return ::ioctl(fd, KVM_CREATE_PIT2, &pit); });
  if (dirty_ring_entries > 0) {
    enable_dirty_ring(sys, fd, dirty_ring_entries);
    vm.dirty_ring_entries_ = dirty_ring_entries;
  } else if (sys.has_manual_dirty_protect()) {
    // Without KVM_DIRTY_LOG_INITIALLY_SET: enabling logging write-protects everything, and the
    // first fetch reports only pages written since.
    kvm_enable_cap cap{};
    cap.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
    cap.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
    check_syscall("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)", [&] { return ::ioctl(fd, KVM_ENABLE_CAP, &cap); });
    vm.manual_protect_ = true;
  }
  return vm;
}

void Vm::map_memory(const GuestMemory& memory) {
  for (const auto& region : memory.regions()) {
    kvm_userspace_memory_region slot{};
    slot.slot = static_cast<std::uint32_t>(slots_.size());
    slot.guest_phys_addr = region.layout.guest_addr;
    slot.memory_size = region.layout.size;
    slot.userspace_addr = reinterpret_cast<std::uint64_t>(region.host());
    check_syscall("KVM_SET_USER_MEMORY_REGION", [&] { return ::ioctl(fd_.get(), KVM_SET_USER_MEMORY_REGION, &slot); });
    slots_.push_back(slot);
  }
}

void Vm::set_dirty_logging(bool on) {
  for (auto& slot : slots_) {
    slot.flags = on ? KVM_MEM_LOG_DIRTY_PAGES : 0;
    check_syscall("KVM_SET_USER_MEMORY_REGION(dirty logging)",
                  [&] { return ::ioctl(fd_.get(), KVM_SET_USER_MEMORY_REGION, &slot); });
  }
  dirty_logging_ = on;
}

void Vm::fetch_and_clear_dirty_log(std::size_t slot, std::span<std::uint64_t> bitmap) {
  fetch_dirty_log_unarmed(slot, bitmap);
  rearm_dirty_pages(slot, 0, bitmap);
}

void Vm::fetch_dirty_log_unarmed(std::size_t slot, std::span<std::uint64_t> bitmap) {
  if (dirty_ring_entries_ > 0) throw std::logic_error("Vm::fetch_dirty_log_unarmed on a VM with dirty rings");
  if (bitmap.size() * 64 < slot_pages(slot)) throw std::invalid_argument("dirty bitmap too small for slot");
  kvm_dirty_log log{};
  log.slot = static_cast<std::uint32_t>(slot);
  log.dirty_bitmap = bitmap.data();
  check_syscall("KVM_GET_DIRTY_LOG", [&] { return ::ioctl(fd_.get(), KVM_GET_DIRTY_LOG, &log); });
}

void Vm::rearm_dirty_pages(std::size_t slot, std::uint64_t first_page, std::span<const std::uint64_t> pages) {
  if (!manual_protect_) return;  // KVM_GET_DIRTY_LOG already cleared and re-protected
  const std::uint64_t slot_end = slot_pages(slot);
  if (first_page % 64 != 0 || first_page >= slot_end) throw std::invalid_argument("pages to re-arm outside the slot");
  // KVM takes a count that is a multiple of 64 or ends the slot.
  const std::uint64_t count = std::min<std::uint64_t>(pages.size() * 64, slot_end - first_page);
  if (count == 0) return;
  kvm_clear_dirty_log clear{};
  clear.slot = static_cast<std::uint32_t>(slot);
  clear.first_page = first_page;
  clear.num_pages = static_cast<std::uint32_t>(count);
  clear.dirty_bitmap = const_cast<std::uint64_t*>(pages.data());  // only read
  check_syscall("KVM_CLEAR_DIRTY_LOG", [&] { return ::ioctl(fd_.get(), KVM_CLEAR_DIRTY_LOG, &clear); });
}

void Vm::reset_dirty_rings() {
  check_syscall("KVM_RESET_DIRTY_RINGS", [&] { return ::ioctl(fd_.get(), KVM_RESET_DIRTY_RINGS, 0); });
}

VmState Vm::save_state() const {
  const int fd = fd_.get();
  VmState state;
  state.pic_master = get_irqchip(fd, KVM_IRQCHIP_PIC_MASTER);
  state.pic_slave = get_irqchip(fd, KVM_IRQCHIP_PIC_SLAVE);
  state.ioapic = get_irqchip(fd, KVM_IRQCHIP_IOAPIC);
  check_syscall("KVM_GET_PIT2", [&] { return ::ioctl(fd, KVM_GET_PIT2, &state.pit); });
  check_syscall("KVM_GET_CLOCK", [&] { return ::ioctl(fd, KVM_GET_CLOCK, &state.clock); });
  return state;
}

void Vm::restore_state(const VmState& state) {
  const int fd = fd_.get();
  for (const kvm_irqchip* chip : {&state.pic_master, &state.pic_slave, &state.ioapic}) {
    kvm_irqchip copy = *chip;
    check_syscall("KVM_SET_IRQCHIP", [&] { return ::ioctl(fd, KVM_SET_IRQCHIP, &copy); });
  }
  kvm_pit_state2 pit = state.pit;
  check_syscall("KVM_SET_PIT2", [&] { return ::ioctl(fd, KVM_SET_PIT2, &pit); });
  // Only the clock value is meaningful to set; KVM rejects flags it did not hand out for SET.
  kvm_clock_data clock{};
  clock.clock = state.clock.clock;
  check_syscall("KVM_SET_CLOCK", [&] { return ::ioctl(fd, KVM_SET_CLOCK, &clock); });
}

}  // namespace mig::kvm
