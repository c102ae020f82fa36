#include "kvm/vcpu.h"

#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "kvm/abi.h"
#include "kvm/cpu_features.h"

namespace mig::kvm {

namespace {

std::vector<std::byte> make_cpuid2(const std::vector<kvm_cpuid_entry2>& entries) {
  std::vector<std::byte> buffer(sizeof(abi::Cpuid2Header) + entries.size() * sizeof(kvm_cpuid_entry2));
  auto* header = reinterpret_cast<abi::Cpuid2Header*>(buffer.data());
  header->nent = static_cast<std::uint32_t>(entries.size());
  std::memcpy(header + 1, entries.data(), entries.size() * sizeof(kvm_cpuid_entry2));
  return buffer;
}

// The supported table with this vCPU's APIC ID filled in (leaf 1 EBX[31:24] and the x2APIC
// ID in leaves 0xB and 0x1F), so that each vCPU sees itself as a distinct processor.
std::vector<kvm_cpuid_entry2> cpuid_for_vcpu(const CpuidEntries& supported, unsigned index) {
  std::vector<kvm_cpuid_entry2> entries = supported;
  for (auto& e : entries) {
    if (e.function == 1) e.ebx = (e.ebx & 0x00ffffffu) | (index << 24);
    if (e.function == 0xb || e.function == 0x1f) e.edx = index;
  }
  return entries;
}

// A kvm_msrs header followed by its entries, in the kernel's layout (see abi.h).
struct MsrBuffer {
  std::vector<std::byte> bytes;
  explicit MsrBuffer(std::size_t count) : bytes(sizeof(abi::MsrsHeader) + count * sizeof(kvm_msr_entry)) {
    header()->nmsrs = static_cast<std::uint32_t>(count);
  }
  abi::MsrsHeader* header() { return reinterpret_cast<abi::MsrsHeader*>(bytes.data()); }
  kvm_msr_entry* entries() { return reinterpret_cast<kvm_msr_entry*>(header() + 1); }
};

// KVM_GET_MSRS / KVM_SET_MSRS return how many entries they processed; anything short of all
// of them is an error for us.
void transfer_msrs(int vcpu_fd, unsigned long request, const char* what, MsrBuffer& buffer) {
  const int done = check_syscall(what, [&] { return ::ioctl(vcpu_fd, request, buffer.header()); });
  if (static_cast<std::uint32_t>(done) != buffer.header()->nmsrs)
    throw std::runtime_error(std::string(what) + ": MSR " + std::to_string(buffer.entries()[done].index) +
                             " was refused");
}

template <typename T>
void vcpu_ioctl(int fd, unsigned long request, const char* what, T* arg) {
  check_syscall(what, [&] { return ::ioctl(fd, request, arg); });
}

// The KVM_SET_* ioctls only read their argument; the cast is for ioctl's untyped signature.
template <typename T>
void vcpu_set(int fd, unsigned long request, const char* what, const T& value) {
  vcpu_ioctl(fd, request, what, const_cast<T*>(&value));
}

}  // namespace

Vcpu Vcpu::create(const KvmSystem& sys, const Vm& vm, unsigned index, const std::vector<kvm_cpuid_entry2>& cpuid_table) {
  Vcpu vcpu;
  vcpu.sys_ = &sys;
  vcpu.index_ = index;
  vcpu.fd_ = UniqueFd(check_syscall("KVM_CREATE_VCPU", [&] { return ::ioctl(vm.fd(), KVM_CREATE_VCPU, index); }));
  vcpu.run_area_ =
      Mapping::map(sys.vcpu_mmap_size(), PROT_READ | PROT_WRITE, MAP_SHARED, vcpu.fd_.get(), 0, "mmap kvm_run");
  if (vm.dirty_ring_entries() > 0)
    vcpu.dirty_ring_area_ = Mapping::map(vm.dirty_ring_entries() * sizeof(DirtyGfn), PROT_READ | PROT_WRITE, MAP_SHARED,
                                         vcpu.fd_.get(), KVM_DIRTY_LOG_PAGE_OFFSET * ::getpagesize(), "mmap dirty ring");
  vcpu.set_cpuid(cpuid_for_vcpu(cpuid_table, index));
  return vcpu;
}

void Vcpu::set_cpuid(std::vector<kvm_cpuid_entry2> cpuid) {
  auto table = make_cpuid2(cpuid);
  vcpu_ioctl(fd(), abi::kSetCpuid2, "KVM_SET_CPUID2", table.data());
  cpuid_ = std::move(cpuid);
}

std::uint32_t Vcpu::tsc_khz() const {
  return static_cast<std::uint32_t>(check_syscall("KVM_GET_TSC_KHZ", [&] { return ::ioctl(fd_.get(), KVM_GET_TSC_KHZ, 0); }));
}

bool Vcpu::enter() {
  if (::ioctl(fd_.get(), KVM_RUN, 0) == 0) return true;
  if (errno == EINTR || errno == EAGAIN) return false;
  throw_errno("KVM_RUN");
}

std::vector<std::uint32_t> Vcpu::restorable_msrs(const std::vector<std::uint32_t>& candidates) const {
  std::vector<std::uint32_t> kept;
  for (std::uint32_t index : candidates) {
    MsrBuffer buffer(1);
    buffer.entries()[0].index = index;
    if (::ioctl(fd_.get(), abi::kGetMsrs, buffer.header()) != 1) continue;
    if (::ioctl(fd_.get(), abi::kSetMsrs, buffer.header()) != 1) continue;
    kept.push_back(index);
  }
  return kept;
}

void Vcpu::set_multiboot_entry(std::uint32_t entry, std::uint32_t info_addr) {
  kvm_sregs sregs{};
  vcpu_ioctl(fd(), KVM_GET_SREGS, "KVM_GET_SREGS", &sregs);
  auto flat = [](kvm_segment& seg, std::uint16_t selector, std::uint8_t type) {
    seg.base = 0;
    seg.limit = 0xffffffff;
    seg.selector = selector;
    seg.type = type;
    seg.present = 1;
    seg.dpl = 0;
    seg.db = 1;
    seg.s = 1;
    seg.l = 0;
    seg.g = 1;
  };
  flat(sregs.cs, 0x08, 0xb);  // execute/read, accessed
  for (kvm_segment* seg : {&sregs.ds, &sregs.es, &sregs.fs, &sregs.gs, &sregs.ss}) flat(*seg, 0x10, 0x3);
  sregs.cr0 = 0x11;  // PE | ET: protected mode, paging off, as the multiboot spec requires
  vcpu_ioctl(fd(), KVM_SET_SREGS, "KVM_SET_SREGS", &sregs);

  kvm_regs regs{};
  regs.rflags = 0x2;
  regs.rip = entry;
  regs.rax = 0x2badb002;  // multiboot v1 bootloader magic
  regs.rbx = info_addr;
  vcpu_ioctl(fd(), KVM_SET_REGS, "KVM_SET_REGS", &regs);
}

VcpuState Vcpu::save_state() const {
  const int fd = fd_.get();
  VcpuState s;
  // MP_STATE first: reading it makes KVM settle a pending INIT/SIPI into the state we save.
  vcpu_ioctl(fd, KVM_GET_MP_STATE, "KVM_GET_MP_STATE", &s.mp_state);
  vcpu_ioctl(fd, KVM_GET_REGS, "KVM_GET_REGS", &s.regs);
  vcpu_ioctl(fd, KVM_GET_SREGS, "KVM_GET_SREGS", &s.sregs);
  s.xsave.resize(sys_->xsave_size());
  vcpu_ioctl(fd, sys_->has_xsave2() ? abi::kGetXsave2 : abi::kGetXsave, "KVM_GET_XSAVE2", s.xsave.data());
  vcpu_ioctl(fd, KVM_GET_XCRS, "KVM_GET_XCRS", &s.xcrs);
  vcpu_ioctl(fd, KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS", &s.debugregs);
  vcpu_ioctl(fd, KVM_GET_LAPIC, "KVM_GET_LAPIC", &s.lapic);
  MsrBuffer msrs(saved_msrs_.size());
  for (std::size_t i = 0; i < saved_msrs_.size(); ++i) msrs.entries()[i].index = saved_msrs_[i];
  transfer_msrs(fd, abi::kGetMsrs, "KVM_GET_MSRS", msrs);
  s.msrs.assign(msrs.entries(), msrs.entries() + saved_msrs_.size());
  // VCPU_EVENTS last: everything read before may still have queued an exception or NMI.
  vcpu_ioctl(fd, KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS", &s.events);

  // The table the vCPU was given, not KVM_GET_CPUID2's: a PVM host reports the hardware's
  // features there, beyond its own KVM_GET_SUPPORTED_CPUID, and every destination would
  // then refuse a guest that had moved once as asking for a CPU it lacks.
  s.cpuid = cpuid_;
  s.tsc_khz = tsc_khz();
  return s;
}

void Vcpu::restore_state(const VcpuState& s) {
  const int fd = fd_.get();
  // A guest calibrated at one TSC rate must not silently run at another (see plan_tsc).
  const auto tsc = plan_tsc(s.tsc_khz, tsc_khz(), sys_->can_scale_tsc());
  if (tsc.plan == TscPlan::refuse) throw std::runtime_error(tsc.reason);
  if (tsc.plan == TscPlan::scale) check_syscall("KVM_SET_TSC_KHZ", [&] { return ::ioctl(fd, KVM_SET_TSC_KHZ, s.tsc_khz); });
  // CPUID before anything that depends on the features it exposes (XSAVE layout, MSRs).
  set_cpuid(s.cpuid);
  vcpu_set(fd, KVM_SET_MP_STATE, "KVM_SET_MP_STATE", s.mp_state);
  // REGS before VCPU_EVENTS: KVM_SET_REGS clears a pending exception.
  vcpu_set(fd, KVM_SET_REGS, "KVM_SET_REGS", s.regs);
  // SREGS before LAPIC: SREGS carries the APIC base that LAPIC state is interpreted against.
  vcpu_set(fd, KVM_SET_SREGS, "KVM_SET_SREGS", s.sregs);
  if (s.xsave.size() < sizeof(abi::Xsave)) throw std::runtime_error("saved XSAVE area is too small");
  std::vector<std::uint8_t> xsave = s.xsave;
  xsave.resize(std::max(xsave.size(), sys_->xsave_size()));
  vcpu_ioctl(fd, abi::kSetXsave, "KVM_SET_XSAVE", xsave.data());
  vcpu_set(fd, KVM_SET_XCRS, "KVM_SET_XCRS", s.xcrs);
  vcpu_set(fd, KVM_SET_DEBUGREGS, "KVM_SET_DEBUGREGS", s.debugregs);
  // LAPIC before MSRs: IA32_TSC_DEADLINE only takes once the LAPIC timer is in deadline mode,
  // and TSC itself comes earlier in the MSR list than TSC_DEADLINE so the deadline is
  // interpreted against the restored TSC.
  vcpu_set(fd, KVM_SET_LAPIC, "KVM_SET_LAPIC", s.lapic);
  MsrBuffer msrs(s.msrs.size());
  std::memcpy(msrs.entries(), s.msrs.data(), s.msrs.size() * sizeof(kvm_msr_entry));
  transfer_msrs(fd, abi::kSetMsrs, "KVM_SET_MSRS", msrs);
  saved_msrs_.clear();
  for (const auto& e : s.msrs) saved_msrs_.push_back(e.index);
  // VCPU_EVENTS last: it re-injects the pending exception/interrupt/NMI that earlier SETs
  // would otherwise clear.
  vcpu_set(fd, KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS", s.events);
}

}  // namespace mig::kvm
