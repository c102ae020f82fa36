#include "kvm/state.h"

#include <cstring>
#include <sstream>

namespace mig::kvm {

namespace {

constexpr std::uint32_t kMsrTsc = 0x10;
constexpr std::uint32_t kMsrTscAdjust = 0x3b;
// Hyper-V's clocks, which KVM lists whether or not the guest uses Hyper-V: the time the
// vCPU has run (restored as an offset, then counting on) and the reference time counter
// (read from KVM's clock; a restore's write is ignored).
constexpr std::uint32_t kMsrHypervVpRuntime = 0x40000010;
constexpr std::uint32_t kMsrHypervTimeRefCount = 0x40000020;

bool is_clock(std::uint32_t msr) {
  return msr == kMsrTsc || msr == kMsrTscAdjust || msr == kMsrHypervVpRuntime || msr == kMsrHypervTimeRefCount;
}

// Offset of the LAPIC timer current-count register (TMCCT) in the register page.
constexpr std::size_t kLapicTimerCurrentCount = 0x390;
// The processor priority (PPR) is derived from the task priority and the highest vector in
// service; KVM recomputes it when the state is set, and the copy in a saved page can lag
// (seen nested: 0x40 saved with nothing in service, 0 after the restore). Not compared.
constexpr std::size_t kLapicProcessorPriority = 0xa0;

template <typename T>
bool same_bytes(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// The first MSR that differs (clocks aside), or "" where none does.
std::string msr_difference(const std::vector<kvm_msr_entry>& a, const std::vector<kvm_msr_entry>& b) {
  if (a.size() != b.size()) return "msrs (count)";
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].index != b[i].index) return "msrs (list)";
    if (is_clock(a[i].index)) continue;
    if (a[i].data != b[i].data) {
      std::ostringstream text;
      text << std::hex << std::showbase << "msr " << a[i].index << ": " << a[i].data << " against " << b[i].data;
      return text.str();
    }
  }
  return "";
}

// The first LAPIC register (16-byte aligned, as the APIC lays them out) that differs.
std::string lapic_difference(const kvm_lapic_state& a, const kvm_lapic_state& b) {
  for (std::size_t offset = 0; offset < sizeof a.regs; offset += 16) {
    if (std::memcmp(a.regs + offset, b.regs + offset, 16) != 0) {
      std::uint32_t value_a = 0, value_b = 0;  // a register's value is the first 4 of its 16 bytes
      std::memcpy(&value_a, a.regs + offset, sizeof value_a);
      std::memcpy(&value_b, b.regs + offset, sizeof value_b);
      std::ostringstream text;
      text << std::hex << std::showbase << "lapic register " << offset << ": " << value_a << " against " << value_b;
      return text.str();
    }
  }
  return "";
}

}  // namespace

std::string difference_ignoring_time(const VcpuState& a, const VcpuState& b) {
  kvm_lapic_state lapic_a = a.lapic, lapic_b = b.lapic;
  for (auto* lapic : {&lapic_a, &lapic_b})
    for (const std::size_t derived : {kLapicTimerCurrentCount, kLapicProcessorPriority}) std::memset(lapic->regs + derived, 0, 4);
  if (!same_bytes(a.mp_state, b.mp_state)) return "mp_state";
  if (!same_bytes(a.regs, b.regs)) return "regs";
  if (!same_bytes(a.sregs, b.sregs)) return "sregs";
  if (a.xsave != b.xsave) return "xsave";
  if (!same_bytes(a.xcrs, b.xcrs)) return "xcrs";
  if (!same_bytes(a.debugregs, b.debugregs)) return "debugregs";
  if (auto lapic = lapic_difference(lapic_a, lapic_b); !lapic.empty()) return lapic;
  if (auto msr = msr_difference(a.msrs, b.msrs); !msr.empty()) return msr;
  if (!same_bytes(a.events, b.events)) return "events";
  if (a.cpuid.size() != b.cpuid.size() ||
      std::memcmp(a.cpuid.data(), b.cpuid.data(), a.cpuid.size() * sizeof(kvm_cpuid_entry2)) != 0)
    return "cpuid";
  if (a.tsc_khz != b.tsc_khz) return "tsc_khz";
  return "";
}

std::string difference_ignoring_time(const VmState& a, const VmState& b) {
  kvm_pit_state2 pit_a = a.pit, pit_b = b.pit;
  for (auto* pit : {&pit_a, &pit_b})
    for (auto& channel : pit->channels) channel.count_load_time = 0;
  if (!same_bytes(a.pic_master, b.pic_master)) return "pic_master";
  if (!same_bytes(a.pic_slave, b.pic_slave)) return "pic_slave";
  if (!same_bytes(a.ioapic, b.ioapic)) return "ioapic";
  if (!same_bytes(pit_a, pit_b)) return "pit";
  return "";
}

}  // namespace mig::kvm
