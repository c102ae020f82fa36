// Complete, restorable VM and vCPU state as plain values. Saving produces one of these,
// restoring consumes one; nothing here refers to a live VM.
#pragma once

#include <linux/kvm.h>

#include <cstdint>
#include <string>
#include <vector>

namespace mig::kvm {

struct VcpuState {
  kvm_mp_state mp_state{};
  kvm_regs regs{};
  kvm_sregs sregs{};
  std::vector<std::uint8_t> xsave;  // KVM_GET_XSAVE2 layout, sized by KVM_CAP_XSAVE2
  kvm_xcrs xcrs{};
  kvm_debugregs debugregs{};
  kvm_lapic_state lapic{};
  std::vector<kvm_msr_entry> msrs;
  kvm_vcpu_events events{};
  std::vector<kvm_cpuid_entry2> cpuid;
  std::uint32_t tsc_khz = 0;
};

struct VmState {
  kvm_irqchip pic_master{};
  kvm_irqchip pic_slave{};
  kvm_irqchip ioapic{};
  kvm_pit_state2 pit{};
  kvm_clock_data clock{};
};

// Fields whose value moves with wall-clock time even in a paused VM (the TSC, Hyper-V's
// clocks, kvmclock, the LAPIC timer's current count, PIT load times), and the LAPIC's
// processor priority, which KVM derives afresh on a restore. State comparisons skip them,
// and name the first field that differs ("" where none does), so that a failed check says
// what moved.
std::string difference_ignoring_time(const VcpuState& a, const VcpuState& b);
std::string difference_ignoring_time(const VmState& a, const VmState& b);

}  // namespace mig::kvm
