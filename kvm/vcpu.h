// One KVM vCPU: its fd, its run area, and its complete state.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "../common/fd.h"
#include "../kvm/dirty_ring.h"
#include "../kvm/state.h"
#include "../kvm/system.h"
#include "../kvm/vm.h"

namespace mig::kvm {

class Vcpu {
 public:
  // Creates vCPU `index` with `cpuid` (the host's supported table, or a CPU model's), its
  // APIC ID set to `index`.
  static Vcpu create(const KvmSystem& sys, const Vm& vm, unsigned index, const std::vector<kvm_cpuid_entry2>& cpuid);
  // The rate its TSC ticks at (KVM_GET_TSC_KHZ). Not while the vCPU runs: it would wait for it.
  std::uint32_t tsc_khz() const;

  unsigned index() const { return index_; }
  int fd() const { return fd_.get(); }
  kvm_run* run() const { return reinterpret_cast<kvm_run*>(run_area_.data()); }
  // Its dirty ring, where the VM has them (Vm::dirty_ring_entries); empty otherwise.
  std::span<DirtyGfn> dirty_ring() const {
    return {reinterpret_cast<DirtyGfn*>(dirty_ring_area_.data()), dirty_ring_area_.size() / sizeof(DirtyGfn)};
  }

  // Enters the guest once. Returns false when interrupted (EINTR: a kick or immediate_exit),
  // true when run()->exit_reason holds a real exit.
  bool enter();

  // Keeps from `candidates` only the MSRs this vCPU can both read and write back unchanged;
  // some listed MSRs are read-only or depend on features the guest CPUID lacks.
  std::vector<std::uint32_t> restorable_msrs(const std::vector<std::uint32_t>& candidates) const;
  void set_saved_msrs(std::vector<std::uint32_t> msrs) { saved_msrs_ = std::move(msrs); }

  // Puts the vCPU in the state a multiboot v1 loader hands over: 32-bit protected mode,
  // flat segments, paging off, EAX = magic, EBX = the multiboot information address.
  void set_multiboot_entry(std::uint32_t entry, std::uint32_t info_addr);

  VcpuState save_state() const;
  void restore_state(const VcpuState& state);

 private:
  void set_cpuid(std::vector<kvm_cpuid_entry2> cpuid);

  const KvmSystem* sys_ = nullptr;
  unsigned index_ = 0;
  UniqueFd fd_;
  Mapping run_area_;
  Mapping dirty_ring_area_;
  std::vector<std::uint32_t> saved_msrs_;
  // What KVM_SET_CPUID2 was given: the guest's CPU, which its saved state carries.
  std::vector<kvm_cpuid_entry2> cpuid_;
};

}  // namespace mig::kvm
