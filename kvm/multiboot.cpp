#include "kvm/multiboot.h"

#include <elf.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

namespace mig::kvm {

namespace {

constexpr std::uint32_t kHeaderMagic = 0x1badb002;
constexpr std::uint32_t kAoutKludge = 1u << 16;
constexpr std::size_t kHeaderSearchBytes = 8192;
constexpr std::size_t kMaxImageBytes = 256u << 20;

// Where the information structure, memory map and command line go: a page the image may not
// use. QEMU's loader places them elsewhere; a well-formed image cannot tell the difference.
constexpr std::uint32_t kInfoAddr = 0x9000;
constexpr std::uint32_t kMmapAddr = kInfoAddr + 0x100;
constexpr std::uint32_t kLoaderNameAddr = kInfoAddr + 0x200;
constexpr std::uint32_t kCmdlineAddr = kInfoAddr + 0x400;
constexpr std::uint32_t kInfoEnd = kInfoAddr + 0x1000;

template <typename T>
T read_at(std::span<const std::byte> file, std::size_t offset, const char* what) {
  if (offset > file.size() || sizeof(T) > file.size() - offset)
    throw ImageError(std::string("image is truncated: ") + what + " lies beyond the end of the file");
  T value;
  std::memcpy(&value, file.data() + offset, sizeof(T));
  return value;
}

std::span<const std::byte> file_range(std::span<const std::byte> file, std::uint64_t offset, std::uint64_t size,
                                      const char* what) {
  if (offset > file.size() || size > file.size() - offset)
    throw ImageError(std::string("image is truncated: ") + what + " lies beyond the end of the file");
  return file.subspan(offset, size);
}

struct MultibootHeader {
  std::uint32_t magic, flags, checksum;
  std::uint32_t header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr;
};

MultibootImage load_aout_kludge(std::span<const std::byte> file, std::size_t header_offset, const MultibootHeader& h) {
  if (h.load_addr > h.header_addr || h.header_addr - h.load_addr > header_offset)
    throw ImageError("multiboot header's load_addr and header_addr are inconsistent with its position in the file");
  const std::uint64_t file_offset = header_offset - (h.header_addr - h.load_addr);
  const std::uint64_t load_size = h.load_end_addr ? std::uint64_t{h.load_end_addr} - h.load_addr
                                                  : file.size() - file_offset;
  if (h.load_end_addr && h.load_end_addr < h.load_addr) throw ImageError("multiboot header's load_end_addr < load_addr");
  const std::uint64_t mem_size = h.bss_end_addr ? std::uint64_t{h.bss_end_addr} - h.load_addr : load_size;
  if (mem_size < load_size) throw ImageError("multiboot header's bss_end_addr lies before load_end_addr");
  auto bytes = file_range(file, file_offset, load_size, "the a.out kludge load range");
  MultibootImage image;
  image.segments.push_back({h.load_addr, {bytes.begin(), bytes.end()}, static_cast<std::uint32_t>(mem_size)});
  image.entry = h.entry_addr;
  return image;
}

MultibootImage load_elf32(std::span<const std::byte> file) {
  const auto ehdr = read_at<Elf32_Ehdr>(file, 0, "the ELF header");
  if (std::memcmp(ehdr.e_ident, ELFMAG, SELFMAG) != 0)
    throw ImageError("not an ELF file and no a.out kludge in its multiboot header: nothing to load");
  if (ehdr.e_ident[EI_CLASS] != ELFCLASS32)
    throw ImageError("64-bit ELF: multiboot v1 loads ELF32 only (link 64-bit code, then objcopy -O elf32-i386)");
  if (ehdr.e_ident[EI_DATA] != ELFDATA2LSB || ehdr.e_machine != EM_386)
    throw ImageError("ELF is not for i386 little-endian");
  if (ehdr.e_phentsize != sizeof(Elf32_Phdr) || ehdr.e_phnum == 0)
    throw ImageError("ELF has no usable program headers");
  MultibootImage image;
  image.entry = ehdr.e_entry;
  for (unsigned i = 0; i < ehdr.e_phnum; ++i) {
    const auto ph = read_at<Elf32_Phdr>(file, ehdr.e_phoff + std::size_t{i} * sizeof(Elf32_Phdr), "a program header");
    if (ph.p_type != PT_LOAD || ph.p_memsz == 0) continue;
    if (ph.p_filesz > ph.p_memsz) throw ImageError("ELF segment has p_filesz > p_memsz");
    auto bytes = file_range(file, ph.p_offset, ph.p_filesz, "an ELF segment");
    image.segments.push_back({ph.p_paddr, {bytes.begin(), bytes.end()}, ph.p_memsz});
    // Like QEMU, load at physical addresses and translate a virtual entry point.
    if (ehdr.e_entry >= ph.p_vaddr && ehdr.e_entry - ph.p_vaddr < ph.p_memsz)
      image.entry = ehdr.e_entry - ph.p_vaddr + ph.p_paddr;
  }
  if (image.segments.empty()) throw ImageError("ELF has no loadable segments");
  return image;
}

template <typename T>
void put(const GuestMemory& memory, std::uint64_t guest_addr, const T& value) {
  std::memcpy(memory.translate(guest_addr, sizeof(T)), &value, sizeof(T));
}

}  // namespace

MultibootImage parse_multiboot(std::span<const std::byte> file) {
  if (file.size() > kMaxImageBytes) throw ImageError("image is larger than 256 MiB");
  const std::size_t search = std::min(file.size(), kHeaderSearchBytes);
  for (std::size_t offset = 0; offset + sizeof(MultibootHeader) <= search; offset += 4) {
    const auto magic = read_at<std::uint32_t>(file, offset, "the multiboot header");
    if (magic != kHeaderMagic) continue;
    const auto h = read_at<MultibootHeader>(file, offset, "the multiboot header");
    if (h.magic + h.flags + h.checksum != 0) throw ImageError("multiboot header checksum is wrong");
    return (h.flags & kAoutKludge) ? load_aout_kludge(file, offset, h) : load_elf32(file);
  }
  throw ImageError("no multiboot v1 header in the first 8 KiB: not a multiboot kernel");
}

MultibootImage read_multiboot_file(const std::string& path) {
  // A kernel is a regular file of bounded size: /dev/zero or a FIFO would be read forever.
  std::error_code error;
  const auto status = std::filesystem::status(path, error);
  if (!error && !std::filesystem::is_regular_file(status)) throw ImageError(path + " is not a regular file");
  if (!error && std::filesystem::file_size(path, error) > kMaxImageBytes)
    throw ImageError(path + " is larger than " + std::to_string(kMaxImageBytes >> 20) + " MiB, too large for a kernel image");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ImageError("cannot open kernel image " + path + ": " + std::strerror(errno));
  std::vector<char> raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  try {
    return parse_multiboot(std::as_bytes(std::span(raw)));
  } catch (const ImageError& e) {
    throw ImageError(path + ": " + e.what());
  }
}

BootInfo load_multiboot(const MultibootImage& image, const GuestMemory& memory, const std::string& cmdline) {
  for (const auto& seg : image.segments) {
    std::byte* host = memory.translate(seg.guest_addr, seg.mem_size);
    if (!host) throw ImageError("image segment at " + std::to_string(seg.guest_addr) + " (" + std::to_string(seg.mem_size) +
                                " bytes) does not fit in guest RAM");
    if (seg.guest_addr < kInfoEnd && std::uint64_t{seg.guest_addr} + seg.mem_size > kInfoAddr)
      throw ImageError("image segment overlaps the multiboot information area at 0x9000");
    if (!seg.bytes.empty()) std::memcpy(host, seg.bytes.data(), seg.bytes.size());  // bss has none
    std::memset(host + seg.bytes.size(), 0, seg.mem_size - seg.bytes.size());
  }
  if (cmdline.size() >= kInfoEnd - kCmdlineAddr) throw ImageError("kernel command line is longer than 3 KiB");

  // The memory map: conventional memory, the legacy hole, then each RAM region.
  struct [[gnu::packed]] MmapEntry {
    std::uint32_t size;
    std::uint64_t base, length;
    std::uint32_t type;
  };
  std::vector<MmapEntry> mmap{{20, 0, 0x9fc00, 1}, {20, 0x9fc00, 0x100000 - 0x9fc00, 2}};
  for (const auto& r : memory.regions()) {
    const std::uint64_t base = std::max<std::uint64_t>(r.layout.guest_addr, 0x100000);
    if (r.layout.guest_addr + r.layout.size > base) mmap.push_back({20, base, r.layout.guest_addr + r.layout.size - base, 1});
  }
  for (std::size_t i = 0; i < mmap.size(); ++i) put(memory, kMmapAddr + i * sizeof(MmapEntry), mmap[i]);

  const char loader_name[] = "mig";
  std::memcpy(memory.translate(kLoaderNameAddr, sizeof loader_name), loader_name, sizeof loader_name);
  std::memcpy(memory.translate(kCmdlineAddr, cmdline.size() + 1), cmdline.c_str(), cmdline.size() + 1);

  const std::uint64_t low_ram_end = memory.regions().front().layout.size;
  std::uint32_t info[22] = {};
  info[0] = 0x1 | 0x4 | 0x8 | 0x40 | 0x200;  // MEM, CMDLINE, MODS (none), MMAP, LOADER_NAME
  info[1] = 639;                               // mem_lower, KiB
  info[2] = static_cast<std::uint32_t>((std::min<std::uint64_t>(low_ram_end, 0xffffffff) - 0x100000) / 1024);
  info[4] = kCmdlineAddr;
  info[11] = static_cast<std::uint32_t>(mmap.size() * sizeof(MmapEntry));
  info[12] = kMmapAddr;
  info[16] = kLoaderNameAddr;
  put(memory, kInfoAddr, info);
  return {image.entry, kInfoAddr};
}

}  // namespace mig::kvm
