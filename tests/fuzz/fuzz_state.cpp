// libFuzzer target: restoring state sections into machine state (what the receiver does
// before any KVM ioctl). The input is a sequence of sections: a name byte (one of the names
// a state holds, or another), a version byte, a 16-bit length, then the section's bytes.
#include <cstring>

#include "transport/bytes.h"
#include "vmm/kvm_vm.h"

using namespace mig;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const char* const kNames[] = {"vm", "serial", "probe", "vcpu.0", "vcpu.1", "virtio-blk.0", "virtio-blk.1", "bogus"};
  std::vector<engine::StateSection> sections;
  while (size >= 4) {
    const std::size_t length = std::min<std::size_t>(size - 4, data[2] | (std::size_t{data[3]} << 8));
    engine::StateSection s;
    s.name = kNames[data[0] % std::size(kNames)];
    s.version = data[1] % 4;  // now and then the version this build restores (1)
    s.data.assign(reinterpret_cast<const std::byte*>(data) + 4, reinterpret_cast<const std::byte*>(data) + 4 + length);
    sections.push_back(std::move(s));
    data += 4 + length;
    size -= 4 + length;
  }
  try {
    const auto state = vmm::decode_state(sections);
    // What restores must save to sections that restore to the same thing.
    if (vmm::encode_state(vmm::decode_state(vmm::encode_state(state))).size() != vmm::encode_state(state).size()) __builtin_trap();
  } catch (const wire::ProtocolError&) {
  }
  return 0;
}
