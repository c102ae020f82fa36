// What a guest's CPU needs that a host's KVM cannot give: the pre-flight check a receiver
// makes at Hello, before any page is sent. A pure function of two CPUID tables.
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
std::vector<std::string> missing_cpu_features(std::span<const kvm_cpuid_entry2> guest, std::span<const kvm_cpuid_entry2> host);

}  // namespace mig::kvm
