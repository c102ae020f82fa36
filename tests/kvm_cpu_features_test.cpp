// The pre-flight CPU check as a table (a guest's CPUID against a host's, and what is
// missing), the CPU several hosts have in common, CPU model files and the TSC rate plan.
// Pure functions: no /dev/kvm needed.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstring>

#include <sstream>

#include "kvm/cpu_features.h"
#include "kvm/cpu_model.h"

using namespace mig::kvm;
using Catch::Matchers::Contains;

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

const std::uint32_t kAvx512f = 1u << 16, kAvx2 = 1u << 5, kAvx = 1u << 28, kSse42 = 1u << 20, kNx = 1u << 20;

// Two hosts a cluster might hold (tests/data/cpu). The newer has AVX-512 (and its XSAVE
// components), leaf 0x1f, 7.1 and 48-bit physical addresses; the older has none of them, and
// says so with lower maxima.
std::vector<kvm_cpuid_entry2> fixture(const std::string& name) {
  return read_cpu_model(std::string(MIG_SOURCE_DIR) + "/tests/data/cpu/" + name + ".cpu").cpuid;
}
std::vector<kvm_cpuid_entry2> newer_host() { return fixture("newer-host"); }
std::vector<kvm_cpuid_entry2> older_host() { return fixture("older-host"); }

bool has_leaf(const std::vector<kvm_cpuid_entry2>& table, std::uint32_t function, std::uint32_t index) {
  return std::any_of(table.begin(), table.end(), [&](const auto& e) { return e.function == function && e.index == index; });
}
const kvm_cpuid_entry2& leaf_of(const std::vector<kvm_cpuid_entry2>& table, std::uint32_t function, std::uint32_t index) {
  for (const auto& e : table)
    if (e.function == function && e.index == index) return e;
  throw std::out_of_range("no such leaf");
}

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

TEST_CASE("the wider physical addresses a guest was told of are refused on a narrower host") {
  CHECK(missing_cpu_features(newer_host(), older_host()) ==
        std::vector<std::string>{"AVX-512F", "XSAVEC", "CPUID.(0xd,1).EAX[2]", "XSAVES",
                                 "XSAVE state AVX-512 opmask", "XSAVE state AVX-512 ZMM_Hi256", "XSAVE state AVX-512 Hi16_ZMM",
                                 "48-bit physical addresses (this CPU has 46)"});
}

TEST_CASE("the common CPU of several hosts is one each of them can give, and no more") {
  const std::vector<std::vector<kvm_cpuid_entry2>> hosts = {older_host(), newer_host()};
  const auto common = common_cpuid(hosts);
  // The property that matters: a guest given the common CPU passes every host's pre-flight.
  for (const auto& host : hosts) CHECK(missing_cpu_features(common, host).empty());
  // And it is the largest such CPU: what both have stays.
  CHECK(leaf_of(common, 1, 0).ecx == (kAvx | kSse42));
  CHECK(leaf_of(common, 7, 0).ebx == kAvx2);
  CHECK(leaf_of(common, 0x80000001, 0).edx == kNx);
  CHECK(leaf_of(common, 0, 0).eax == 0xd);                    // the older host's maximum leaf
  CHECK(!has_leaf(common, 0x1f, 0));                          // beyond it
  CHECK(!has_leaf(common, 7, 1));                             // a sub-leaf only the newer has
  CHECK(leaf_of(common, 0xd, 0).eax == 0x7);                  // x87, SSE, AVX
  CHECK(!has_leaf(common, 0xd, 5));                           // AVX-512's components go
  CHECK(leaf_of(common, 0xd, 0).ecx == 832);                  // and the area shrinks to AVX's end
  CHECK((leaf_of(common, 0x80000008, 0).eax & 0xff) == 46);  // the narrower address width
  CHECK(leaf_of(common, 1, 0).eax == 0x000306f2);            // family and model: the first host's
  // Order does not change what the guest may use.
  const std::vector<std::vector<kvm_cpuid_entry2>> reversed = {newer_host(), older_host()};
  CHECK(cpu_feature_names(common_cpuid(reversed)) == cpu_feature_names(common));
  // The common CPU of one host is that host, less nothing it offers.
  CHECK(missing_cpu_features(newer_host(), common_cpuid(std::vector<std::vector<kvm_cpuid_entry2>>{newer_host()})).empty());

  std::vector<std::vector<kvm_cpuid_entry2>> mixed = {older_host(), older_host()};
  mixed[1][0] = vendor_amd();
  CHECK_THROWS_WITH(common_cpuid(mixed), Contains("differ in vendor (GenuineIntel, AuthenticAMD)"));
  CHECK_THROWS_WITH(common_cpuid({}), Contains("no CPU descriptions"));
}

TEST_CASE("a CPU model file reads back as written, and a bad one is refused with its line") {
  const auto model = host_cpu_model("host-a", newer_host());
  std::stringstream file;
  write_cpu_model(file, model);
  CHECK_THAT(file.str(), Contains("# Well-known flags: SSE4.2 AVX AVX2 AVX-512F XSAVEOPT XSAVEC XSAVES LZCNT NX"));
  const auto read = parse_cpu_model(file, "a.cpu");
  CHECK(read.name == "host-a");
  CHECK(cpu_feature_names(read.cpuid) == cpu_feature_names(newer_host()));
  REQUIRE(read.cpuid.size() == newer_host().size());
  for (std::size_t i = 0; i < read.cpuid.size(); ++i) CHECK(std::memcmp(&read.cpuid[i], &model.cpuid[i], sizeof(kvm_cpuid_entry2)) == 0);

  const std::vector<std::pair<std::string, std::string>> bad = {
      {"", "CPU model m.cpu: is empty"},
      {"cpu 1\n", "line 1: does not start with 'mig-cpu-model 1'"},
      {"mig-cpu-model 2\n", "line 1: is format version 2"},
      {"mig-cpu-model 1\nname x\n", "CPU model m.cpu: has no leaf 0"},
      {"mig-cpu-model 1\nleaf 0 0 1 2 3\n", "line 2: the leaf lacks its EDX"},
      {"mig-cpu-model 1\nleaf 0 0 1 2 3 4 5\n", "line 2: the leaf has more than six numbers ('5')"},
      {"mig-cpu-model 1\n# c\nleaf 0 0 1 2 3 0x1ffffffff\n", "line 3: EDX '0x1ffffffff' is not a 32-bit number"},
      {"mig-cpu-model 1\nleaf 0 0 1 2 3 -4\n", "line 2: EDX '-4' is not a 32-bit number"},
      {"mig-cpu-model 1\nleaf 0 0 1 2 3 four\n", "line 2: EDX 'four' is not a 32-bit number"},
      {"mig-cpu-model 1\nleaf 7 0 0 0 0 0\nleaf 0x7 0 1 1 1 1\n", "line 3: leaf 0x7 index 0 appears twice"},
      {"mig-cpu-model 1\nflags 1\n", "line 2: 'flags' is not name or leaf"},
  };
  for (const auto& [text, expected] : bad) {
    INFO(text);
    std::istringstream in(text);
    CHECK_THROWS_WITH(parse_cpu_model(in, "m.cpu"), Contains(expected));
  }
  std::string many = "mig-cpu-model 1\n";
  for (unsigned i = 0; i <= kMaxCpuModelLeaves; ++i) many += "leaf 0 " + std::to_string(i) + " 0 0 0 0\n";
  std::istringstream in(many);
  CHECK_THROWS_WITH(parse_cpu_model(in, "m.cpu"), Contains("more than 256 leaves"));
  CHECK_THROWS_WITH(read_cpu_model("/nonexistent.cpu"), Contains("cannot read the CPU model /nonexistent.cpu"));
  CHECK_THROWS_WITH(read_cpu_model("/dev/zero"), Contains("not a regular file"));
  CHECK_THROWS_WITH(read_cpu_model("/proc/self/exe"), Contains("is over 64 KiB"));
}

TEST_CASE("a CPU model is applied with this host's KVM flags, and refused where the host lacks part of it") {
  auto supported = newer_host();
  for (auto& e : supported)
    if (e.function == 7 || e.function == 0xd) e.flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
  const std::vector<CpuModel> hosts = {host_cpu_model("old", older_host()), host_cpu_model("new", newer_host())};
  const auto common = common_cpu_model(hosts);
  CHECK(common.name == "common(old,new)");
  const auto applied = apply_cpu_model(common, supported);
  CHECK(leaf_of(applied, 7, 0).flags == KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
  CHECK(leaf_of(applied, 1, 0).flags == 0);
  CHECK(leaf_of(applied, 7, 0).ebx == kAvx2);
  CHECK_THROWS_WITH(apply_cpu_model(hosts[1], older_host()),
                    Contains("this host cannot give the guest the CPU model new: it lacks AVX-512F"));
}

TEST_CASE("the TSC rate: equal within KVM's tolerance, else scaled where the host can, else refused") {
  struct Case {
    std::uint32_t guest, host;
    bool can_scale;
    TscPlan plan;
  };
  const Case cases[] = {
      {2'100'000, 2'100'000, false, TscPlan::same_rate},  {2'100'000, 2'100'525, false, TscPlan::same_rate},  // 250 ppm
      {2'100'000, 2'099'476, false, TscPlan::same_rate},  {2'100'000, 2'100'526, false, TscPlan::refuse},
      {2'100'000, 2'100'526, true, TscPlan::scale},       {3'000'000, 2'100'000, true, TscPlan::scale},
      {1'000'000, 2'100'000, false, TscPlan::refuse},
  };
  for (const auto& c : cases) {
    INFO(c.guest << " kHz on " << c.host << " kHz, scaling " << c.can_scale);
    const auto decision = plan_tsc(c.guest, c.host, c.can_scale);
    CHECK(decision.plan == c.plan);
    CHECK(decision.reason.empty() == (c.plan != TscPlan::refuse));
  }
  CHECK(plan_tsc(1'000'000, 2'100'000, false).reason ==
        "the guest's TSC runs at 1000000 kHz, this host's at 2100000 kHz, and this host cannot scale it (no KVM_CAP_TSC_CONTROL)");
}
