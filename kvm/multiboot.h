// Multiboot v1 loading, as QEMU's -kernel does it: the header within the first 8 KiB, then
// either the ELF32 program headers or, with flag bit 16, the header's own load addresses.
#pragma once

#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "../kvm/memory.h"

namespace mig::kvm {

// Everything wrong with an image is one of these, with a message that names the problem.
struct ImageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct MultibootImage {
  struct Segment {
    std::uint32_t guest_addr = 0;
    std::vector<std::byte> bytes;  // file contents; the rest up to mem_size is zeroed
    std::uint32_t mem_size = 0;
  };
  std::vector<Segment> segments;
  std::uint32_t entry = 0;
};

MultibootImage parse_multiboot(std::span<const std::byte> file);
MultibootImage read_multiboot_file(const std::string& path);

struct BootInfo {
  std::uint32_t entry = 0;
  std::uint32_t info_addr = 0;  // the multiboot information structure, handed over in EBX
};

// Copies the segments into guest memory and builds the multiboot information (memory size,
// memory map, command line, loader name) below 640 KiB. Throws ImageError if a segment
// falls outside guest RAM or over the information area.
BootInfo load_multiboot(const MultibootImage& image, const GuestMemory& memory, const std::string& cmdline);

}  // namespace mig::kvm
