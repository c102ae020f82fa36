// The KVM structures whose C++ view of <linux/kvm.h> is wrong, and the ioctl numbers derived
// from them.
//
// Debian 12's headers declare trailing arrays with __DECLARE_FLEX_ARRAY, which in C++ adds an
// empty struct member: sizeof(kvm_cpuid2) becomes 12 instead of 8, the entries move, and
// every _IOWR() computed from those sizes names an ioctl the kernel does not know (EINVAL).
// These are the kernel's layouts; the variable-length tails follow each header in memory.
#pragma once

#include <linux/kvm.h>
#include <sys/ioctl.h>

#include <cstdint>

namespace mig::kvm::abi {

struct Cpuid2Header {
  std::uint32_t nent;
  std::uint32_t padding;  // followed by kvm_cpuid_entry2[nent]
};
struct MsrsHeader {
  std::uint32_t nmsrs;
  std::uint32_t pad;  // followed by kvm_msr_entry[nmsrs]
};
struct MsrListHeader {
  std::uint32_t nmsrs;  // followed by std::uint32_t[nmsrs]
};
struct Xsave {
  std::uint32_t region[1024];  // KVM_GET_XSAVE2 may write more: size the buffer from the cap
};
static_assert(sizeof(Cpuid2Header) == 8 && sizeof(MsrsHeader) == 8 && sizeof(MsrListHeader) == 4);
static_assert(sizeof(Xsave) == 4096 && sizeof(kvm_cpuid_entry2) == 40 && sizeof(kvm_msr_entry) == 16);

inline constexpr unsigned long kGetMsrIndexList = _IOWR(KVMIO, 0x02, MsrListHeader);
inline constexpr unsigned long kGetSupportedCpuid = _IOWR(KVMIO, 0x05, Cpuid2Header);
inline constexpr unsigned long kGetMsrs = _IOWR(KVMIO, 0x88, MsrsHeader);
inline constexpr unsigned long kSetMsrs = _IOW(KVMIO, 0x89, MsrsHeader);
inline constexpr unsigned long kSetCpuid2 = _IOW(KVMIO, 0x90, Cpuid2Header);
inline constexpr unsigned long kGetXsave = _IOR(KVMIO, 0xa4, Xsave);
inline constexpr unsigned long kSetXsave = _IOW(KVMIO, 0xa5, Xsave);
inline constexpr unsigned long kGetXsave2 = _IOR(KVMIO, 0xcf, Xsave);

}  // namespace mig::kvm::abi
