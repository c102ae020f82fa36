// Image loading and bad input. No /dev/kvm needed except where stated.
#include <elf.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <vector>

#include "kvm/machine.h"
#include "kvm/multiboot.h"
#include "tests/support.h"

using namespace mig;
using Catch::Matchers::Contains;

namespace {

std::string parse_error(std::span<const std::byte> bytes) {
  try {
    kvm::parse_multiboot(bytes);
  } catch (const kvm::ImageError& e) {
    return e.what();
  }
  return "";
}

// A minimal a.out-kludge image: the header at offset 0 says to load the whole file at 1 MiB.
std::vector<std::byte> aout_kludge_image() {
  std::uint32_t header[8] = {0x1badb002, 0x00010000, 0, 0x100000, 0x100000, 0, 0x101000, 0x100020};
  header[2] = static_cast<std::uint32_t>(-(header[0] + header[1]));
  std::vector<std::byte> image(64, std::byte{0x90});
  std::memcpy(image.data(), header, sizeof header);
  return image;
}

}  // namespace

TEST_CASE("the workload guest parses as a multiboot ELF32 loaded at 1 MiB") {
  auto image = kvm::read_multiboot_file(test::kGuestImage);
  REQUIRE(!image.segments.empty());
  CHECK(image.entry >= 0x100000);
  for (const auto& seg : image.segments) CHECK(seg.guest_addr >= 0x100000);
}

TEST_CASE("an a.out-kludge image loads at its header's addresses") {
  auto image = kvm::parse_multiboot(aout_kludge_image());
  REQUIRE(image.segments.size() == 1);
  CHECK(image.segments[0].guest_addr == 0x100000);
  CHECK(image.segments[0].bytes.size() == 64);
  CHECK(image.segments[0].mem_size == 0x1000);
  CHECK(image.entry == 0x100020);
}

TEST_CASE("bad images are rejected with a reason") {
  const auto good = test::file_contents(test::kGuestImage);
  SECTION("missing file") {
    CHECK_THROWS_WITH(kvm::read_multiboot_file("/nonexistent/kernel"), Contains("cannot open kernel image"));
  }
  SECTION("empty file") { CHECK_THAT(parse_error({}), Contains("no multiboot v1 header")); }
  SECTION("not multiboot: a plain ELF") {
    auto elf = good;
    const std::uint32_t magic = 0x1badb002;
    bool erased = false;
    for (std::size_t off = 0; off + 4 <= 8192; off += 4) {
      if (std::memcmp(elf.data() + off, &magic, 4) != 0) continue;
      std::memset(elf.data() + off, 0, 4);
      erased = true;
    }
    REQUIRE(erased);
    CHECK_THAT(parse_error(elf), Contains("no multiboot v1 header"));
  }
  SECTION("bad checksum") {
    auto image = aout_kludge_image();
    image[8] = std::byte{0};
    CHECK_THAT(parse_error(image), Contains("checksum"));
  }
  SECTION("truncated program headers") {
    auto elf = good;
    elf.resize(0x1100);  // keeps the multiboot header, cuts the segments
    CHECK_THAT(parse_error(elf), Contains("truncated"));
  }
  SECTION("corrupt program header offset") {
    auto elf = good;
    Elf32_Ehdr ehdr;
    std::memcpy(&ehdr, elf.data(), sizeof ehdr);
    ehdr.e_phoff = 0xfffffff0;
    std::memcpy(elf.data(), &ehdr, sizeof ehdr);
    CHECK_THAT(parse_error(elf), Contains("truncated"));
  }
  SECTION("64-bit ELF") {
    auto elf = good;
    elf[EI_CLASS] = std::byte{ELFCLASS64};
    CHECK_THAT(parse_error(elf), Contains("64-bit ELF"));
  }
}

TEST_CASE("an image that does not fit in guest RAM is refused") {
  auto image = kvm::parse_multiboot(aout_kludge_image());
  image.segments[0].guest_addr = 0xfff00000;
  auto memory = kvm::GuestMemory::create(kvm::pc_memory_layout(8 << 20));
  CHECK_THROWS_WITH(kvm::load_multiboot(image, memory, ""), Contains("does not fit in guest RAM"));
}

TEST_CASE("absurd memory sizes and vCPU counts are refused") {
  CHECK_THROWS_WITH(kvm::GuestMemory::create(kvm::pc_memory_layout(0)),
                    Contains("empty or not page-aligned"));
  CHECK_THROWS_WITH(kvm::GuestMemory::create(kvm::pc_memory_layout(1ull << 50)),
                    Contains("exceeds this host"));
  auto config = test::small_config();
  config.vcpus = 0;
  CHECK_THROWS_WITH(kvm::Machine::create(config), Contains("vCPU count"));
}

TEST_CASE("a missing /dev/kvm gets one line that says what to do") {
  auto config = test::small_config();
  config.kvm_path = "/nonexistent/kvm";
  CHECK_THROWS_WITH(kvm::Machine::create(config), Contains("does not exist: load the kvm module"));
}

TEST_CASE("guest addresses are translated only inside a region") {
  auto memory = kvm::GuestMemory::create(kvm::pc_memory_layout(8 << 20));
  CHECK(memory.translate(0, 8 << 20) != nullptr);
  CHECK(memory.translate((8 << 20) - 4096, 4096) != nullptr);
  CHECK(memory.translate((8 << 20) - 4096, 4097) == nullptr);
  CHECK(memory.translate(~0ull - 10, 4096) == nullptr);
  CHECK(memory.translate(4096, ~0ull) == nullptr);
}
