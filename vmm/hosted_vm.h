// A guest this process runs, in kvm::GuestMemory: its memory as the engine sees it, and what
// the tools need beyond what the engine needs, the heartbeats its vCPUs send through mig's
// probe and its failure. mig has two: a KVM machine (KvmVm) and, for hosts without KVM, a
// synthetic guest (SyntheticVm).
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
  virtual const kvm::GuestMemory& guest_memory() const = 0;
  virtual const kvm::Probe& probe() const = 0;
  // Why the guest stopped running for good (a triple fault, say), or nothing while it runs.
  virtual std::optional<std::string> failure() const = 0;
  // The destination's measure of the switchover: the first heartbeat of any vCPU after the restore.
  std::optional<engine::GuestHandover> wait_guest_handover(std::chrono::milliseconds timeout) override;

  std::vector<engine::MemoryRegion> memory_regions() const override;
  std::vector<int> shareable_memory_fds() const override;
  void populated_pages(std::size_t region, std::span<std::uint64_t> bitmap) override {
    guest_memory().populated_pages(region, bitmap);
  }
  void prepare_pages(std::size_t region, std::uint64_t first_page, std::uint64_t count) override {
    guest_memory().populate(region, first_page, count);
  }
  void discard_pages(std::size_t region, std::uint64_t first_page, std::uint64_t count) override {
    guest_memory().discard(region, first_page, count);
  }
};

// The probe's heartbeat history as a state section's data, and back (at most kvm::kMaxVcpus).
std::vector<std::byte> encode_heartbeats(const std::vector<kvm::HeartbeatState>& heartbeats);
std::vector<kvm::HeartbeatState> decode_heartbeats(std::span<const std::byte> data);

// For a receiver's factory: refuses a guest larger than the memory this host has available,
// which would be filled by the stream and then killed by the OOM killer (or take the host down
// with it), before any of its memory exists.
void require_host_memory(const engine::VmShape& shape);

}  // namespace mig::vmm
