// What the tests share: the guest image, a KVM check that skips rather than passes, and a file reader.
#pragma once

#include <chrono>
#include <functional>
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

// Polls `done` every 5 ms until it holds, for at most `limit`, and says whether it did. Tests
// wait for what they need rather than sleep a fixed time: a busy host, or TCG's nested KVM,
// runs the guest at a fraction of its pace.
bool wait_until(const std::function<bool()>& done, std::chrono::milliseconds limit);

// Waits, for at most 30 s, until `done(vcpu, its state)` holds for every vCPU.
bool wait_for_vcpus(const kvm::Probe& probe, const std::function<bool(std::size_t, const kvm::HeartbeatState&)>& done);

// Until every vCPU has sent more than `beats` heartbeats since `before`, and, given `ticks`,
// its timer more than that many ticks.
inline bool wait_for_progress(const kvm::Probe& probe, const std::vector<kvm::HeartbeatState>& before, std::uint32_t beats,
                              std::uint32_t ticks = 0) {
  return wait_for_vcpus(probe, [&](std::size_t vcpu, const kvm::HeartbeatState& now) {
    return now.last_seq > before.at(vcpu).last_seq + beats && (ticks == 0 || now.ticks > before.at(vcpu).ticks + ticks);
  });
}

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
