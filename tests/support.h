// What the tests share: the guest image, a KVM check that skips rather than passes, and a file reader.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "kvm/machine.h"

namespace mig::test {

inline const std::string kGuestImage = MIG_GUEST_IMAGE;

// Exits the test process with MIG_SKIP_CODE (reported by CTest as skipped) when /dev/kvm
// cannot be used here.
void require_kvm();

// A whole file, read in one go: tests compare disk images of hundreds of MiB, which a
// byte-at-a-time stream iterator takes minutes to read under ASan.
std::vector<std::byte> file_contents(const std::string& path);

inline kvm::MachineConfig small_config(std::uint64_t mem_bytes = 64ull << 20, unsigned vcpus = 1) {
  kvm::MachineConfig config;
  config.layout = kvm::pc_memory_layout(mem_bytes);
  config.vcpus = vcpus;
  return config;
}

// Boots the workload guest with `cmdline` and waits until every vCPU reports ready.
inline std::unique_ptr<kvm::Machine> boot_guest(const std::string& cmdline, const kvm::MachineConfig& config) {
  auto machine = kvm::Machine::create(config);
  machine->boot(kvm::read_multiboot_file(kGuestImage), cmdline);
  machine->start();
  if (!machine->probe().wait_ready(std::chrono::seconds(30)))
    throw std::runtime_error("guest did not become ready: " + machine->failure().value_or("no failure recorded"));
  return machine;
}

}  // namespace mig::test
