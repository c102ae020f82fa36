// What a guest's CPU needs that a host's KVM cannot give (the pre-flight check a receiver
// makes at Hello, before any page is sent), and the CPU several hosts have in common. Pure
// functions of CPUID tables.
#pragma once

#include <linux/kvm.h>

#include <span>
#include <string>
#include <vector>

namespace mig::kvm {

// The names of what `guest` (the CPUID the guest was given) has and `host` (KVM's supported
// CPUID here) lacks: a different vendor, feature flags ("AVX-512F", or "CPUID.(7,0).EBX[16]"
// for a flag without a name here), and XSAVE state components. Empty when the host can give
// the guest its CPU. Bits that change at run time (OSXSAVE, OSPKE) and fields that are not
// flags (counts, sizes, APIC IDs) are not compared.
// A guest given wider physical addresses than the host has ("46-bit physical addresses") is
// refused as well.
std::vector<std::string> missing_cpu_features(std::span<const kvm_cpuid_entry2> guest, std::span<const kvm_cpuid_entry2> host);

// The names of the well-known flags `cpuid` sets ("SSE4.2", "AVX2", "NX"): for people
// reading a CPU model.
std::vector<std::string> cpu_feature_names(std::span<const kvm_cpuid_entry2> cpuid);

// The CPU every one of `hosts` (their supported CPUID tables) can give a guest, so that a
// guest started with it can move to any of them:
//  - only leaves all of them have, up to the smallest maximum leaf;
//  - feature flags and XSAVE components that all of them have;
//  - the narrowest physical and linear address widths;
//  - every other field (family and model, caches, topology, brand) as the first has it:
//    list the oldest host first.
// Throws std::invalid_argument when they differ in vendor: no guest CPU moves between an
// Intel and an AMD host.
std::vector<kvm_cpuid_entry2> common_cpuid(std::span<const std::vector<kvm_cpuid_entry2>> hosts);

// How a guest whose TSC ticks at `guest_khz` runs on a host whose TSC ticks at `host_khz`.
// A guest calibrated its clocks against its TSC once, at boot, so the rate must not change
// under it:
//  - within kTscToleranceppm (KVM's own tsc_tolerance_ppm) the rates count as equal: KVM
//    would not scale either, and NTP absorbs the drift;
//  - otherwise a host with hardware TSC scaling (KVM_CAP_TSC_CONTROL) is told the guest's
//    rate with KVM_SET_TSC_KHZ;
//  - otherwise the guest is refused, before any page is sent.
inline constexpr std::uint32_t kTscTolerancePpm = 250;
enum class TscPlan { same_rate, scale, refuse };
struct TscDecision {
  TscPlan plan;
  std::string reason;  // for refuse: one line naming both rates
};
TscDecision plan_tsc(std::uint32_t guest_khz, std::uint32_t host_khz, bool host_can_scale);

}  // namespace mig::kvm
