#include "kvm/cpu_features.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <stdexcept>

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
    {7, 1, eax}, {0xd, 1, eax}, {0x80000001, 0, ecx}, {0x80000001, 0, edx}, {0x40000001, 0, eax} /* KVM's paravirt features */,
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

// The register of a leaf, to read (const entry) or to narrow.
template <typename Entry>
auto& reg_of(Entry& e, Reg reg) {
  switch (reg) {
    case eax: return e.eax;
    case ebx: return e.ebx;
    case ecx: return e.ecx;
    case edx: break;
  }
  return e.edx;
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

unsigned physical_address_bits(const kvm_cpuid_entry2& leaf_80000008) { return leaf_80000008.eax & 0xffu; }

void require_one_vendor(std::span<const std::vector<kvm_cpuid_entry2>> hosts) {
  std::string first;
  for (const auto& host : hosts) {
    const auto leaf0 = find(host, 0, 0);
    if (!leaf0) throw std::invalid_argument("a CPU description has no leaf 0, so no vendor");
    if (first.empty()) first = vendor(*leaf0);
    else if (vendor(*leaf0) != first)
      throw std::invalid_argument("the CPUs differ in vendor (" + first + ", " + vendor(*leaf0) +
                                  "): no guest CPU moves between them");
  }
}

// Narrows `mine` to what `theirs` also offers: flags and XSAVE components by AND, maximum leaf
// and sub-leaf numbers and address widths by minimum. Other fields (family, model, caches,
// topology, the brand string) stay as the first description has them.
void intersect_leaf(kvm_cpuid_entry2& mine, const kvm_cpuid_entry2& theirs) {
  for (const auto& r : kFlagRegisters)
    if (r.function == mine.function && r.index == mine.index) reg_of(mine, r.reg) &= reg_of(theirs, r.reg);
  const auto f = mine.function;
  if (f == 0 || f == 0x80000000 || f == 0x40000000 || (f == 7 && mine.index == 0)) mine.eax = std::min(mine.eax, theirs.eax);
  if (f == 0xd && mine.index == 0) {  // XCR0's supported components
    mine.eax &= theirs.eax;
    mine.edx &= theirs.edx;
  }
  if (f == 0xd && mine.index == 1) {  // IA32_XSS's supported components
    mine.ecx &= theirs.ecx;
    mine.edx &= theirs.edx;
  }
  if (f == 0x80000008) {  // physical and linear address widths
    const auto narrower = [&](unsigned shift) { return std::min((mine.eax >> shift) & 0xffu, (theirs.eax >> shift) & 0xffu) << shift; };
    mine.eax = (mine.eax & ~0xffffu) | narrower(0) | narrower(8);
  }
}

// Leaves past the maxima that leaf 0, 0x80000000 and 7.0 now report would describe
// features only some of the CPUs have.
void drop_leaves_beyond_maxima(std::vector<kvm_cpuid_entry2>& cpuid) {
  const auto max_of = [&](std::uint32_t function, std::uint32_t fallback) {
    const auto leaf = find(cpuid, function, 0);
    return leaf ? leaf->eax : fallback;
  };
  const auto basic = max_of(0, 0), extended = max_of(0x80000000, 0x80000000), leaf7 = max_of(7, 0);
  std::erase_if(cpuid, [&](const kvm_cpuid_entry2& e) {
    if (e.function < 0x40000000u) return e.function > basic || (e.function == 7 && e.index > leaf7);
    if (e.function >= 0x80000000u) return e.function > extended;
    return false;
  });
}

// XSAVE sub-leaves of components no longer offered go, and the area's size (0xD.0 ECX) is
// recomputed for the components that stay: the legacy area and header (576 bytes) plus every
// user component up to its end.
void keep_common_xsave_components(std::vector<kvm_cpuid_entry2>& cpuid) {
  const auto xcr0 = find(cpuid, 0xd, 0), xss = find(cpuid, 0xd, 1);
  if (!xcr0) return;
  const std::uint64_t user = (std::uint64_t{xcr0->edx} << 32) | xcr0->eax;
  const std::uint64_t supervisor = xss ? (std::uint64_t{xss->edx} << 32) | xss->ecx : 0;
  std::erase_if(cpuid, [&](const kvm_cpuid_entry2& e) {
    return e.function == 0xd && e.index >= 2 && (e.index >= 64 || !((user | supervisor) >> e.index & 1u));
  });
  std::uint32_t size = 576;
  for (const auto& e : cpuid)
    if (e.function == 0xd && e.index >= 2 && (user >> e.index & 1u)) size = std::max(size, e.ebx + e.eax);
  for (auto& e : cpuid)
    if (e.function == 0xd && e.index == 0) e.ebx = e.ecx = size;  // KVM recomputes EBX for the guest's XCR0
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
  // A guest told of wider physical addresses than the host has may place memory where the
  // host cannot map it.
  if (const auto wanted = find(guest, 0x80000008, 0)) {
    const auto had = find(host, 0x80000008, 0);
    const auto guest_bits = physical_address_bits(*wanted), host_bits = had ? physical_address_bits(*had) : 0u;
    if (had && guest_bits > host_bits)
      missing.push_back(std::to_string(guest_bits) + "-bit physical addresses (this CPU has " + std::to_string(host_bits) + ")");
  }
  return missing;
}

std::vector<std::string> cpu_feature_names(std::span<const kvm_cpuid_entry2> cpuid) {
  std::vector<std::string> names;
  for (const auto& n : kNames)
    if (const auto leaf = find(cpuid, n.function, n.index); leaf && (reg_of(*leaf, n.reg) >> n.bit & 1u)) names.push_back(n.name);
  return names;
}

TscDecision plan_tsc(std::uint32_t guest_khz, std::uint32_t host_khz, bool host_can_scale) {
  const std::uint64_t difference = guest_khz > host_khz ? guest_khz - host_khz : host_khz - guest_khz;
  if (difference * 1'000'000 <= std::uint64_t{host_khz} * kTscTolerancePpm) return {TscPlan::same_rate, {}};
  if (host_can_scale) return {TscPlan::scale, {}};
  return {TscPlan::refuse, "the guest's TSC runs at " + std::to_string(guest_khz) + " kHz, this host's at " +
                               std::to_string(host_khz) + " kHz, and this host cannot scale it (no KVM_CAP_TSC_CONTROL)"};
}

std::vector<kvm_cpuid_entry2> common_cpuid(std::span<const std::vector<kvm_cpuid_entry2>> hosts) {
  if (hosts.empty()) throw std::invalid_argument("no CPU descriptions to intersect");
  require_one_vendor(hosts);
  std::vector<kvm_cpuid_entry2> common;
  for (const auto& leaf : hosts[0]) {
    auto merged = leaf;
    bool everywhere = true;
    for (const auto& other : hosts.subspan(1)) {
      const auto theirs = find(other, leaf.function, leaf.index);
      if (!theirs) everywhere = false;
      else intersect_leaf(merged, *theirs);
    }
    if (everywhere) common.push_back(merged);
  }
  drop_leaves_beyond_maxima(common);
  keep_common_xsave_components(common);
  return common;
}

}  // namespace mig::kvm
