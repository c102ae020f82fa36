// What the tools need from a guest this process runs, beyond what the engine needs: the
// heartbeats its vCPUs send through mig's probe, and its failure. mig has two: a KVM machine
// (KvmVm) and, for hosts without KVM, a synthetic guest (SyntheticVm).
#pragma once

#include <chrono>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "../engine/vm.h"
#include "../kvm/devices.h"
#include "../kvm/memory.h"

namespace mig::vmm {

class HostedVm : public engine::MigratableVm {
 public:
  virtual const kvm::Probe& probe() const = 0;
  // Why the guest stopped running for good (a triple fault, say), or nothing while it runs.
  virtual std::optional<std::string> failure() const = 0;
  // The destination's measure of the switchover: vCPU 0's first heartbeat after the restore.
  std::optional<engine::GuestHandover> wait_guest_handover(std::chrono::milliseconds timeout) override;
};

// The probe's heartbeat history as a state section's data, and back (at most kvm::kMaxVcpus).
std::vector<std::byte> encode_heartbeats(const std::vector<kvm::HeartbeatState>& heartbeats);
std::vector<kvm::HeartbeatState> decode_heartbeats(std::span<const std::byte> data);

// Guest memory as the engine sees it, and its shareable fds (none unless memfd or hugetlbfs).
std::vector<engine::MemoryRegion> engine_regions(const kvm::GuestMemory& memory);
std::vector<int> shareable_fds(const kvm::GuestMemory& memory);

// For a receiver's factory: refuses a guest larger than the memory this host has available,
// which would be filled by the stream and then killed by the OOM killer (or take the host down
// with it), before any of its memory exists.
void require_host_memory(const engine::VmShape& shape);

}  // namespace mig::vmm
