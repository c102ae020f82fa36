// CPU models: the CPUID table a guest is given, as a text file an operator can read, diff and
// keep. `mig-vm --print-cpu` writes a host's; `mig-vm --common-cpu` intersects several hosts'
// (common_cpuid); `--cpu FILE` starts a guest with one, so that it can move to every host
// the model was made from.
//
// The file, one item per line; blank lines and `#` comments are skipped:
//   mig-cpu-model 1
//   name NAME
//   leaf FUNCTION INDEX EAX EBX ECX EDX      (numbers in C notation: 0x1f or 31)
// The KVM flags of each leaf (whether its index matters) are not part of the model: they are
// the host's business, and taken from its KVM when the model is applied.
#pragma once

#include <linux/kvm.h>

#include <iosfwd>
#include <span>
#include <string>
#include <vector>

namespace mig::kvm {

struct CpuModel {
  std::string name;                     // "host-a", or "common(host-a,host-b)"
  std::vector<kvm_cpuid_entry2> cpuid;  // flags zero; see above
};

inline constexpr std::size_t kMaxCpuModelLeaves = 256;

// Throws std::invalid_argument with one line that names `source`, the line and the fault.
CpuModel parse_cpu_model(std::istream& in, const std::string& source);
CpuModel read_cpu_model(const std::string& path);
// The file as parse_cpu_model reads it, with the well-known flags listed in a comment.
void write_cpu_model(std::ostream& out, const CpuModel& model);

// The model of a host's supported CPUID table (KVM_GET_SUPPORTED_CPUID).
CpuModel host_cpu_model(std::string name, std::span<const kvm_cpuid_entry2> supported);
// The model every one of `hosts` can give a guest (see common_cpuid).
CpuModel common_cpu_model(std::span<const CpuModel> hosts);

// The table to give each vCPU for `model` on a host with `supported`: the model's leaves with
// this host's KVM flags. Throws std::invalid_argument naming what the host lacks.
std::vector<kvm_cpuid_entry2> apply_cpu_model(const CpuModel& model, std::span<const kvm_cpuid_entry2> supported);

}  // namespace mig::kvm
