// /dev/kvm itself: the API check, capabilities, and the per-host tables every VM needs
// (supported CPUID, the MSRs that can be saved and restored, the XSAVE area size).
#pragma once

#include <linux/kvm.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../common/fd.h"

namespace mig::kvm {

// The supported-CPUID table as plain entries; turned into struct kvm_cpuid2 on use.
using CpuidEntries = std::vector<kvm_cpuid_entry2>;

class KvmSystem {
 public:
  // Opens `path` (normally /dev/kvm). Throws a std::runtime_error whose message says what
  // to do when the device is missing, not accessible, or speaks the wrong API.
  static KvmSystem open(const std::string& path = "/dev/kvm");

  int fd() const { return fd_.get(); }
  int check_extension(long cap) const;
  std::size_t vcpu_mmap_size() const { return vcpu_mmap_size_; }
  // Size of the XSAVE area in bytes (KVM_CAP_XSAVE2 reports it; 4096 without the cap).
  std::size_t xsave_size() const { return xsave_size_; }
  bool has_xsave2() const { return has_xsave2_; }
  bool has_manual_dirty_protect() const { return manual_dirty_protect_ != 0; }
  const CpuidEntries& supported_cpuid() const { return supported_cpuid_; }
  // The rate a new vCPU's TSC ticks at here (a scratch VM and vCPU are made to ask).
  std::uint32_t tsc_khz() const;
  // Whether a vCPU's TSC can be set to another rate (KVM_CAP_TSC_CONTROL: hardware scaling).
  bool can_scale_tsc() const { return check_extension(KVM_CAP_TSC_CONTROL) > 0; }
  // All MSR indices KVM reports; filtered per VM to those that round-trip (see Vcpu).
  const std::vector<std::uint32_t>& msr_index_list() const { return msr_index_list_; }

 private:
  UniqueFd fd_;
  std::size_t vcpu_mmap_size_ = 0;
  std::size_t xsave_size_ = 4096;
  bool has_xsave2_ = false;
  int manual_dirty_protect_ = 0;
  CpuidEntries supported_cpuid_;
  std::vector<std::uint32_t> msr_index_list_;
};

}  // namespace mig::kvm
