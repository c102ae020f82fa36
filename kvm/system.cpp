#include "kvm/system.h"

#include <fcntl.h>
#include <sys/ioctl.h>

#include <cstring>
#include <stdexcept>

#include "kvm/abi.h"

namespace mig::kvm {

namespace {

CpuidEntries read_supported_cpuid(int kvm_fd) {
  // KVM answers E2BIG while the buffer is too small; grow until it fits.
  for (std::uint32_t capacity = 64;; capacity *= 2) {
    std::vector<std::byte> buffer(sizeof(abi::Cpuid2Header) + capacity * sizeof(kvm_cpuid_entry2));
    auto* header = reinterpret_cast<abi::Cpuid2Header*>(buffer.data());
    header->nent = capacity;
    if (::ioctl(kvm_fd, abi::kGetSupportedCpuid, header) == 0) {
      CpuidEntries entries(header->nent);
      std::memcpy(entries.data(), header + 1, header->nent * sizeof(kvm_cpuid_entry2));
      return entries;
    }
    if (errno != E2BIG || capacity > 4096) throw_errno("KVM_GET_SUPPORTED_CPUID");
  }
}

std::vector<std::uint32_t> read_msr_index_list(int kvm_fd) {
  abi::MsrListHeader probe{};
  // The first call fails with E2BIG and tells the count.
  if (::ioctl(kvm_fd, abi::kGetMsrIndexList, &probe) == -1 && errno != E2BIG) throw_errno("KVM_GET_MSR_INDEX_LIST");
  std::vector<std::uint32_t> buffer(1 + probe.nmsrs);
  buffer[0] = probe.nmsrs;
  check_syscall("KVM_GET_MSR_INDEX_LIST", [&] { return ::ioctl(kvm_fd, abi::kGetMsrIndexList, buffer.data()); });
  return {buffer.begin() + 1, buffer.begin() + 1 + buffer[0]};
}

}  // namespace

KvmSystem KvmSystem::open(const std::string& path) {
  KvmSystem sys;
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    std::string cause = std::error_code(err, std::generic_category()).message();
    if (err == ENOENT)
      throw std::runtime_error(path + " does not exist: load the kvm module (kvm_intel or kvm_amd) or run on a host with virtualization enabled");
    if (err == EACCES || err == EPERM)
      throw std::runtime_error(path + ": permission denied: run as root or add your user to the 'kvm' group");
    throw std::runtime_error(path + ": " + cause);
  }
  sys.fd_ = UniqueFd(fd);
  const int api = ::ioctl(fd, KVM_GET_API_VERSION, 0);
  if (api != KVM_API_VERSION)
    throw std::runtime_error(path + " speaks KVM API " + std::to_string(api) + ", mig needs " +
                             std::to_string(KVM_API_VERSION));
  for (long cap : {KVM_CAP_IRQCHIP, KVM_CAP_PIT2, KVM_CAP_USER_MEMORY, KVM_CAP_XSAVE, KVM_CAP_XCRS,
                   KVM_CAP_VCPU_EVENTS, KVM_CAP_DEBUGREGS, KVM_CAP_MP_STATE, KVM_CAP_ADJUST_CLOCK,
                   KVM_CAP_IMMEDIATE_EXIT}) {
    if (sys.check_extension(cap) <= 0)
      throw std::runtime_error(path + " lacks KVM capability " + std::to_string(cap) +
                               ", which mig needs to save and restore complete VM state");
  }
  sys.vcpu_mmap_size_ = static_cast<std::size_t>(
      check_syscall("KVM_GET_VCPU_MMAP_SIZE", [&] { return ::ioctl(fd, KVM_GET_VCPU_MMAP_SIZE, 0); }));
  const int xsave2 = sys.check_extension(KVM_CAP_XSAVE2);
  if (xsave2 > 0) {
    sys.has_xsave2_ = true;
    sys.xsave_size_ = std::max<std::size_t>(static_cast<std::size_t>(xsave2), sizeof(abi::Xsave));
  }
  sys.manual_dirty_protect_ = sys.check_extension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
  sys.supported_cpuid_ = read_supported_cpuid(fd);
  sys.msr_index_list_ = read_msr_index_list(fd);
  return sys;
}

int KvmSystem::check_extension(long cap) const {
  const int r = ::ioctl(fd_.get(), KVM_CHECK_EXTENSION, cap);
  return r < 0 ? 0 : r;
}

std::uint32_t KvmSystem::tsc_khz() const {
  const UniqueFd vm(check_syscall("KVM_CREATE_VM", [&] { return ::ioctl(fd_.get(), KVM_CREATE_VM, 0); }));
  const UniqueFd vcpu(check_syscall("KVM_CREATE_VCPU", [&] { return ::ioctl(vm.get(), KVM_CREATE_VCPU, 0); }));
  return static_cast<std::uint32_t>(check_syscall("KVM_GET_TSC_KHZ", [&] { return ::ioctl(vcpu.get(), KVM_GET_TSC_KHZ, 0); }));
}

}  // namespace mig::kvm
