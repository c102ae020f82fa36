#include "vmm/hosted_vm.h"

#include <cstring>
#include <fstream>

#include "kvm/machine.h"
#include "kvm/memory.h"
#include "transport/bytes.h"

namespace mig::vmm {

std::optional<engine::GuestHandover> HostedVm::wait_guest_handover(std::chrono::milliseconds timeout) {
  if (!probe().wait_handover(timeout)) return std::nullopt;
  const auto h = *probe().handover();
  return engine::GuestHandover{static_cast<double>(h.gap_ns) / 1e6, h.sequence_continued, h.last_source_seq,
                               h.first_destination_seq};
}

std::vector<std::byte> encode_heartbeats(const std::vector<kvm::HeartbeatState>& heartbeats) {
  wire::ByteWriter w;
  w.put_vector(heartbeats);
  return w.take();
}

std::vector<kvm::HeartbeatState> decode_heartbeats(std::span<const std::byte> data) {
  wire::ByteReader r(data);
  auto heartbeats = r.get_vector<kvm::HeartbeatState>(kvm::kMaxVcpus, "probe section");
  r.expect_end("probe section");
  // The flag's byte came from the peer: anything but 0 or 1 would make reading the bool undefined.
  for (auto& hb : heartbeats) {
    std::uint8_t ready = 0;
    std::memcpy(&ready, &hb.ready, 1);
    hb.ready = ready != 0;
  }
  return heartbeats;
}

std::vector<engine::MemoryRegion> HostedVm::memory_regions() const {
  std::vector<engine::MemoryRegion> out;
  for (const auto& r : guest_memory().regions()) out.push_back({r.layout.guest_addr, r.layout.size, r.host()});
  return out;
}

std::vector<int> HostedVm::shareable_memory_fds() const {
  std::vector<int> fds;
  if (!guest_memory().shareable()) return fds;
  for (const auto& r : guest_memory().regions()) fds.push_back(r.memfd.get());
  return fds;
}

void require_host_memory(const engine::VmShape& shape) {
  std::uint64_t guest = 0;
  for (const auto& r : shape.regions) guest += r.size;
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  std::uint64_t kib = 0;
  while (meminfo >> key >> kib && key != "MemAvailable:") meminfo.ignore(64, '\n');
  if (key != "MemAvailable:") return;  // no figure to go by
  const std::uint64_t available = kib * 1024;
  if (guest > available)
    throw std::runtime_error("the guest has " + std::to_string(guest >> 20) + " MiB of memory, and this host has only " +
                             std::to_string(available >> 20) + " MiB available");
}

}  // namespace mig::vmm
