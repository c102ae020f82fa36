// The pre-flight CPU check as a table: a guest's CPUID against a host's, and what is missing.
// A pure function: no /dev/kvm needed.
#include <catch2/catch.hpp>

#include "kvm/cpu_features.h"

using mig::kvm::missing_cpu_features;

namespace {

kvm_cpuid_entry2 leaf(std::uint32_t function, std::uint32_t index, std::uint32_t eax, std::uint32_t ebx, std::uint32_t ecx,
                      std::uint32_t edx) {
  kvm_cpuid_entry2 e{};
  e.function = function;
  e.index = index;
  e.eax = eax;
  e.ebx = ebx;
  e.ecx = ecx;
  e.edx = edx;
  return e;
}

// "GenuineIntel" / "AuthenticAMD" in leaf 0's EBX, EDX, ECX.
kvm_cpuid_entry2 vendor_intel() { return leaf(0, 0, 0xd, 0x756e6547, 0x6c65746e, 0x49656e69); }
kvm_cpuid_entry2 vendor_amd() { return leaf(0, 0, 0xd, 0x68747541, 0x444d4163, 0x69746e65); }

}  // namespace

TEST_CASE("the CPU check names what a host lacks - and nothing when it has all the guest was given") {
  const std::uint32_t avx512f = 1u << 16, avx2 = 1u << 5, avx = 1u << 28, osxsave = 1u << 27, nx = 1u << 20;
  const std::vector<kvm_cpuid_entry2> guest = {vendor_intel(), leaf(1, 0, 0, 0x01000800, avx | osxsave, 0),
                                               leaf(7, 0, 0, avx512f | avx2, 0, 0), leaf(0xd, 0, 0xe7, 0, 0, 0),
                                               leaf(0x80000001, 0, 0, 0, 0, nx)};
  struct Case {
    const char* what;
    std::vector<kvm_cpuid_entry2> host;
    std::vector<std::string> missing;
  };
  const std::vector<Case> cases = {
      {"the same CPU (other APIC ID, OSXSAVE off)", {vendor_intel(), leaf(1, 0, 0, 0x05000800, avx, 0), leaf(7, 0, 0, avx512f | avx2, 0, 0),
                                                   leaf(0xd, 0, 0xe7, 0, 0, 0), leaf(0x80000001, 0, 0, 0, 0, nx)}, {}},
      {"a superset", {vendor_intel(), leaf(1, 0, 0, 0, avx | 1u, 0), leaf(7, 0, 0, 0xffffffff, 0xff, 0), leaf(0xd, 0, 0x2ff, 0, 0, 0),
                      leaf(0x80000001, 0, 0, 0, 0, 0xffffffff)}, {}},
      {"no AVX-512", {vendor_intel(), leaf(1, 0, 0, 0, avx, 0), leaf(7, 0, 0, avx2, 0, 0), leaf(0xd, 0, 0x7, 0, 0, 0),
                      leaf(0x80000001, 0, 0, 0, 0, nx)},
       {"AVX-512F", "XSAVE state AVX-512 opmask", "XSAVE state AVX-512 ZMM_Hi256", "XSAVE state AVX-512 Hi16_ZMM"}},
      {"no leaf 7 at all, no NX", {vendor_intel(), leaf(1, 0, 0, 0, avx, 0), leaf(0xd, 0, 0xe7, 0, 0, 0)},
       {"AVX2", "AVX-512F", "NX"}},
      {"another vendor", {vendor_amd(), leaf(1, 0, 0, 0, avx, 0), leaf(7, 0, 0, avx512f | avx2, 0, 0), leaf(0xd, 0, 0xe7, 0, 0, 0),
                          leaf(0x80000001, 0, 0, 0, 0, nx)},
       {"the GenuineIntel vendor (this CPU is AuthenticAMD)"}},
  };
  for (const auto& c : cases) {
    INFO(c.what);
    CHECK(missing_cpu_features(guest, c.host) == c.missing);
  }
  // A flag without a name here is still named, by its place.
  const std::vector<kvm_cpuid_entry2> odd = {leaf(7, 0, 0, 1u << 2, 0, 0)};
  CHECK(missing_cpu_features(odd, std::vector<kvm_cpuid_entry2>{leaf(7, 0, 0, 0, 0, 0)}) ==
        std::vector<std::string>{"CPUID.(0x7,0).EBX[2]"});
}
