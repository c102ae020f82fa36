#include "kvm/state.h"

#include <cstring>

namespace mig::kvm {

namespace {

constexpr std::uint32_t kMsrTsc = 0x10;
constexpr std::uint32_t kMsrTscAdjust = 0x3b;
// Offset of the LAPIC timer current-count register (TMCCT) in the register page.
constexpr std::size_t kLapicTimerCurrentCount = 0x390;

template <typename T>
bool same_bytes(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

bool same_msrs_ignoring_tsc(const std::vector<kvm_msr_entry>& a, const std::vector<kvm_msr_entry>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].index != b[i].index) return false;
    if (a[i].index == kMsrTsc || a[i].index == kMsrTscAdjust) continue;
    if (a[i].data != b[i].data) return false;
  }
  return true;
}

}  // namespace

bool equal_ignoring_time(const VcpuState& a, const VcpuState& b) {
  kvm_lapic_state lapic_a = a.lapic, lapic_b = b.lapic;
  std::memset(lapic_a.regs + kLapicTimerCurrentCount, 0, 4);
  std::memset(lapic_b.regs + kLapicTimerCurrentCount, 0, 4);
  return same_bytes(a.mp_state, b.mp_state) && same_bytes(a.regs, b.regs) && same_bytes(a.sregs, b.sregs) &&
         a.xsave == b.xsave && same_bytes(a.xcrs, b.xcrs) && same_bytes(a.debugregs, b.debugregs) &&
         same_bytes(lapic_a, lapic_b) && same_msrs_ignoring_tsc(a.msrs, b.msrs) &&
         same_bytes(a.events, b.events) && a.cpuid.size() == b.cpuid.size() &&
         std::memcmp(a.cpuid.data(), b.cpuid.data(), a.cpuid.size() * sizeof(kvm_cpuid_entry2)) == 0 &&
         a.tsc_khz == b.tsc_khz;
}

bool equal_ignoring_time(const VmState& a, const VmState& b) {
  kvm_pit_state2 pit_a = a.pit, pit_b = b.pit;
  for (auto* pit : {&pit_a, &pit_b})
    for (auto& channel : pit->channels) channel.count_load_time = 0;
  return same_bytes(a.pic_master, b.pic_master) && same_bytes(a.pic_slave, b.pic_slave) &&
         same_bytes(a.ioapic, b.ioapic) && same_bytes(pit_a, pit_b);
}

}  // namespace mig::kvm
