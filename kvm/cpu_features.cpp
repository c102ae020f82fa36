#include "kvm/cpu_features.h"

#include <cstring>
#include <optional>

namespace mig::kvm {

namespace {

enum Reg { eax, ebx, ecx, edx };

// The registers of the leaves that hold feature flags.
struct FlagRegister {
  std::uint32_t function, index;
  Reg reg;
  std::uint32_t dynamic = 0;  // bits that follow the guest's own settings, not the CPU's
};
constexpr FlagRegister kFlagRegisters[] = {
    {1, 0, ecx, 1u << 27 /* OSXSAVE */}, {1, 0, edx}, {7, 0, ebx}, {7, 0, ecx, 1u << 4 /* OSPKE */}, {7, 0, edx},
    {7, 1, eax}, {0xd, 1, eax}, {0x80000001, 0, ecx}, {0x80000001, 0, edx},
};

struct FlagName {
  std::uint32_t function, index;
  Reg reg;
  unsigned bit;
  const char* name;
};
// The flags an operator is likeliest to meet when moving guests between unlike hosts.
constexpr FlagName kNames[] = {
    {1, 0, ecx, 0, "SSE3"},        {1, 0, ecx, 1, "PCLMULQDQ"},  {1, 0, ecx, 9, "SSSE3"},     {1, 0, ecx, 12, "FMA"},
    {1, 0, ecx, 13, "CX16"},       {1, 0, ecx, 19, "SSE4.1"},    {1, 0, ecx, 20, "SSE4.2"},   {1, 0, ecx, 21, "x2APIC"},
    {1, 0, ecx, 22, "MOVBE"},      {1, 0, ecx, 23, "POPCNT"},    {1, 0, ecx, 24, "TSC-deadline"}, {1, 0, ecx, 25, "AES"},
    {1, 0, ecx, 26, "XSAVE"},      {1, 0, ecx, 28, "AVX"},       {1, 0, ecx, 29, "F16C"},     {1, 0, ecx, 30, "RDRAND"},
    {1, 0, edx, 25, "SSE"},        {1, 0, edx, 26, "SSE2"},      {7, 0, ebx, 0, "FSGSBASE"},  {7, 0, ebx, 3, "BMI1"},
    {7, 0, ebx, 5, "AVX2"},        {7, 0, ebx, 8, "BMI2"},       {7, 0, ebx, 9, "ERMS"},      {7, 0, ebx, 11, "RTM"},
    {7, 0, ebx, 16, "AVX-512F"},   {7, 0, ebx, 17, "AVX-512DQ"}, {7, 0, ebx, 18, "RDSEED"},   {7, 0, ebx, 19, "ADX"},
    {7, 0, ebx, 20, "SMAP"},       {7, 0, ebx, 28, "AVX-512CD"}, {7, 0, ebx, 29, "SHA"},      {7, 0, ebx, 30, "AVX-512BW"},
    {7, 0, ebx, 31, "AVX-512VL"},  {7, 0, ecx, 1, "AVX-512VBMI"}, {7, 0, ecx, 3, "PKU"},      {7, 0, ecx, 9, "VAES"},
    {7, 0, ecx, 10, "VPCLMULQDQ"}, {7, 0, ecx, 11, "AVX-512VNNI"}, {7, 0, edx, 4, "FSRM"},    {7, 0, edx, 24, "AMX-TILE"},
    {7, 1, eax, 4, "AVX-VNNI"},    {7, 1, eax, 5, "AVX-512BF16"}, {0xd, 1, eax, 0, "XSAVEOPT"}, {0xd, 1, eax, 1, "XSAVEC"},
    {0xd, 1, eax, 3, "XSAVES"},    {0x80000001, 0, ecx, 5, "LZCNT"}, {0x80000001, 0, edx, 20, "NX"},
    {0x80000001, 0, edx, 27, "RDTSCP"}, {0x80000001, 0, edx, 29, "LM"},
};
const char* const kRegNames[] = {"EAX", "EBX", "ECX", "EDX"};
const char* const kXsaveComponents[] = {"x87", "SSE", "AVX", "MPX BNDREGS", "MPX BNDCSR", "AVX-512 opmask",
                                        "AVX-512 ZMM_Hi256", "AVX-512 Hi16_ZMM", "PT", "PKRU"};

std::uint32_t reg_of(const kvm_cpuid_entry2& e, Reg reg) {
  switch (reg) {
    case eax: return e.eax;
    case ebx: return e.ebx;
    case ecx: return e.ecx;
    case edx: return e.edx;
  }
  return 0;
}

std::optional<kvm_cpuid_entry2> find(std::span<const kvm_cpuid_entry2> table, std::uint32_t function, std::uint32_t index) {
  for (const auto& e : table)
    if (e.function == function && e.index == index) return e;
  return std::nullopt;
}

std::string vendor(const kvm_cpuid_entry2& leaf0) {
  char text[13] = {};
  std::memcpy(text, &leaf0.ebx, 4);
  std::memcpy(text + 4, &leaf0.edx, 4);
  std::memcpy(text + 8, &leaf0.ecx, 4);
  return text;
}

std::string flag_name(const FlagRegister& r, unsigned bit) {
  for (const auto& n : kNames)
    if (n.function == r.function && n.index == r.index && n.reg == r.reg && n.bit == bit) return n.name;
  char text[64];
  std::snprintf(text, sizeof text, "CPUID.(0x%x,%u).%s[%u]", r.function, r.index, kRegNames[r.reg], bit);
  return text;
}

}  // namespace

std::vector<std::string> missing_cpu_features(std::span<const kvm_cpuid_entry2> guest, std::span<const kvm_cpuid_entry2> host) {
  std::vector<std::string> missing;
  const auto guest_vendor = find(guest, 0, 0), host_vendor = find(host, 0, 0);
  if (guest_vendor && host_vendor && vendor(*guest_vendor) != vendor(*host_vendor))
    missing.push_back("the " + vendor(*guest_vendor) + " vendor (this CPU is " + vendor(*host_vendor) + ")");
  for (const auto& r : kFlagRegisters) {
    const auto wanted = find(guest, r.function, r.index);
    if (!wanted) continue;
    const auto had = find(host, r.function, r.index);
    const std::uint32_t lacking = reg_of(*wanted, r.reg) & ~(had ? reg_of(*had, r.reg) : 0) & ~r.dynamic;
    for (unsigned bit = 0; bit < 32; ++bit)
      if (lacking & (1u << bit)) missing.push_back(flag_name(r, bit));
  }
  // The XSAVE components the guest may enable (XCR0's supported bits, leaf 0xD.0 EDX:EAX).
  if (const auto wanted = find(guest, 0xd, 0)) {
    const auto had = find(host, 0xd, 0);
    const std::uint64_t lacking = ((std::uint64_t{wanted->edx} << 32) | wanted->eax) &
                                  ~(had ? (std::uint64_t{had->edx} << 32) | had->eax : 0);
    for (unsigned bit = 0; bit < 64; ++bit)
      if (lacking & (std::uint64_t{1} << bit))
        missing.push_back(std::string("XSAVE state ") +
                          (bit < std::size(kXsaveComponents) ? std::string(kXsaveComponents[bit]) : "component " + std::to_string(bit)));
  }
  return missing;
}

}  // namespace mig::kvm
