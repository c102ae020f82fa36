// Guest memory without a VM: which pages count as populated, and populating ahead.
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <cerrno>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "kvm/memory.h"
#include "tests/huge_pages.h"

using namespace mig;
using namespace mig::test;
using Catch::Matchers::Contains;

namespace {
constexpr std::uint64_t kPages = 16384;  // 64 MiB

std::vector<std::uint64_t> populated(const kvm::GuestMemory& memory, kvm::GuestMemory::PageScan scan) {
  std::vector<std::uint64_t> bitmap(kPages / 64, ~std::uint64_t{0});  // stale bits must be cleared
  memory.populated_pages(0, bitmap, scan);
  return bitmap;
}
// The VmFlags line of /proc/self/smaps for the mapping that starts at `start`: "hg" is
// MADV_HUGEPAGE, "nh" MADV_NOHUGEPAGE.
std::string vm_flags(const std::byte* start) {
  std::ifstream smaps("/proc/self/smaps");
  std::ostringstream wanted;
  wanted << std::hex << reinterpret_cast<std::uintptr_t>(start) << "-";
  bool inside = false;
  for (std::string line; std::getline(smaps, line);) {
    if (line.rfind(wanted.str(), 0) == 0) inside = true;
    if (inside && line.rfind("VmFlags:", 0) == 0) return line + " ";
  }
  return "";
}

// A hugetlbfs mount of our own, so what it holds does not depend on the host's mounts; gone
// afterwards whatever the checks do. Mounting needs root.
struct HugetlbfsMount {
  std::filesystem::path dir = std::filesystem::temp_directory_path() / ("mig-hugetlbfs-" + std::to_string(::getpid()));
  int error = 0;  // mount(2)'s errno; 0: mounted
  HugetlbfsMount() {
    std::filesystem::create_directory(dir);
    if (::mount("none", dir.c_str(), "hugetlbfs", 0, "pagesize=2M") != 0) error = errno;
  }
  // The test goes on only with the mount; without the right to mount (not root), it is
  // skipped. Any other error is a finding.
  void require() const {
    if (error == 0) return;
    REQUIRE(error == EPERM);
    skip_test("no right to mount a hugetlbfs of our own (not root)");
  }
  ~HugetlbfsMount() {
    ::umount(dir.c_str());
    std::filesystem::remove(dir);
  }
};

}  // namespace

TEST_CASE("populated pages are exactly the touched ones - by either kernel interface and either backing") {
  for (auto backing : {kvm::MemoryBacking::anonymous, kvm::MemoryBacking::memfd}) {
    INFO("memfd backing: " << (backing == kvm::MemoryBacking::memfd));
    const std::vector<kvm::RegionLayout> layout = {{0, kPages * kvm::kPageSize}};
    // 4 KiB pages: with huge pages, touching one page populates its whole 2 MiB.
    auto memory = kvm::GuestMemory::create(layout, {.backing = backing, .transparent_huge_pages = false, .hugetlbfs_dir = {}});
    std::byte* host = memory.regions()[0].host();
    std::vector<std::uint64_t> expected(kPages / 64, 0);
    // Irregular runs, first and last page included, so runs and word edges both matter.
    for (std::uint64_t page = 0; page < kPages; page += 1 + page % 7 + (page / 1000) * 13) {
      host[page * kvm::kPageSize + 5] = std::byte{1};
      expected[page / 64] |= std::uint64_t{1} << (page % 64);
    }
    host[(kPages - 1) * kvm::kPageSize] = std::byte{1};
    expected.back() |= std::uint64_t{1} << 63;

    CHECK(populated(memory, kvm::GuestMemory::PageScan::best) == expected);
    CHECK(populated(memory, kvm::GuestMemory::PageScan::pagemap_entries) == expected);

    memory.populate();
    CHECK(populated(memory, kvm::GuestMemory::PageScan::best) == std::vector<std::uint64_t>(kPages / 64, ~std::uint64_t{0}));
  }
}

// Memory handed over: the source wrote pages this process has never mapped. In a memfd the
// page cache shows them; in a hugetlbfs file only the file does, and a page missed here would
// never be sent onward, leaving the next destination a zero page where the guest had data.
namespace {
constexpr std::uint64_t kHandedOverBytes = 64ull << 20;
constexpr std::uint64_t kWritten = 3 * 512 + 7;  // the page the source writes, in the fourth 2 MiB page

// What the adopted memory counts as populated, the written page checked.
std::vector<std::uint64_t> populated_after_handover(const kvm::MemoryOptions& options) {
  const std::vector<kvm::RegionLayout> layout = {{0, kHandedOverBytes}};
  auto source = kvm::GuestMemory::create(layout, options);
  source.regions()[0].host()[kWritten * kvm::kPageSize] = std::byte{1};
  auto adopted = kvm::GuestMemory::adopt(layout, std::vector<int>{source.regions()[0].memfd.get()});
  CHECK(adopted.backing() == options.backing);  // huge pages stay huge pages: no 4 KiB drops, no post-copy
  auto bitmap = populated(adopted, kvm::GuestMemory::PageScan::best);
  CHECK((bitmap[kWritten / 64] >> (kWritten % 64) & 1) == 1);
  return bitmap;
}
}  // namespace

TEST_CASE("handed-over memory counts the pages its source wrote as populated - memfd: the written page, and only it") {
  std::vector<std::uint64_t> expected(kHandedOverBytes / kvm::kPageSize / 64, 0);
  expected[kWritten / 64] = std::uint64_t{1} << (kWritten % 64);
  CHECK(populated_after_handover({.backing = kvm::MemoryBacking::memfd, .transparent_huge_pages = false, .hugetlbfs_dir = {}}) ==
        expected);
}

TEST_CASE("handed-over memory counts the pages its source wrote as populated - hugetlbfs: the file says it holds data") {
  HugetlbfsMount mount;
  mount.require();
  HugePagesForTest huge_pages(64);  // the source's 32, and room to spare
  huge_pages.require();
  populated_after_handover({.backing = kvm::MemoryBacking::hugetlbfs, .transparent_huge_pages = false, .hugetlbfs_dir = mount.dir.string()});
}

TEST_CASE("handed-over memory counts the pages its source wrote as populated - a memfd of huge pages (--hugetlb)") {
  HugePagesForTest huge_pages(64);
  huge_pages.require();
  populated_after_handover({.backing = kvm::MemoryBacking::hugetlbfs, .transparent_huge_pages = false, .hugetlbfs_dir = {}});
}

TEST_CASE("guest memory asks for huge pages by default, on 2 MiB boundaries, and not when told not to") {
  const std::vector<kvm::RegionLayout> layout = {{0, 64ull << 20}};
  for (auto backing : {kvm::MemoryBacking::anonymous, kvm::MemoryBacking::memfd}) {
    kvm::MemoryOptions options;
    options.backing = backing;
    auto memory = kvm::GuestMemory::create(layout, options);
    const std::byte* host = memory.regions()[0].host();
    CHECK(reinterpret_cast<std::uintptr_t>(host) % (2 << 20) == 0);
    CHECK_THAT(vm_flags(host), Contains(" hg "));

    options.transparent_huge_pages = false;
    CHECK_THAT(vm_flags(kvm::GuestMemory::create(layout, options).regions()[0].host()), Contains(" nh "));
  }
}

TEST_CASE("a receiver's memory can fill in small pages first and ask for huge pages once its guest runs") {
  kvm::MemoryOptions options;
  options.huge_pages_after_fill = true;
  auto memory = kvm::GuestMemory::create({{{0, 64ull << 20}}}, options);
  const std::byte* host = memory.regions()[0].host();
  CHECK_THAT(vm_flags(host), Contains(" nh "));
  memory.advise_huge_pages();
  CHECK_THAT(vm_flags(host), Contains(" hg "));
}

TEST_CASE("hugetlbfs backing refuses a directory that is not a hugetlbfs mount, clearly") {
  kvm::MemoryOptions options;
  options.backing = kvm::MemoryBacking::hugetlbfs;
  options.hugetlbfs_dir = "/tmp";
  CHECK_THROWS_WITH(kvm::GuestMemory::create({{{0, 64ull << 20}}}, options), Contains("/tmp is not a hugetlbfs mount"));
}

TEST_CASE("hugetlbfs backing refuses a mount without enough huge pages, clearly, and shares one with them") {
  HugetlbfsMount mount;
  mount.require();
  kvm::MemoryOptions options;
  options.backing = kvm::MemoryBacking::hugetlbfs;
  options.hugetlbfs_dir = mount.dir.string();
  const std::vector<kvm::RegionLayout> layout = {{0, 64ull << 20}};
  HugePagesLock lock;
  if (free_huge_pages() < 32) {
    CHECK_THROWS_WITH(kvm::GuestMemory::create(layout, options),
                      Contains("32 huge pages of 2048 KiB needed") && Contains("/proc/sys/vm/nr_hugepages"));
  } else {
    auto memory = kvm::GuestMemory::create(layout, options);
    memory.regions()[0].host()[0] = std::byte{1};
    CHECK(memory.shareable());
  }
  CHECK_THROWS_WITH(kvm::GuestMemory::create({{{0, 3ull << 20}}}, options), Contains("not a multiple of"));
}

// QEMU's memory-backend-memfd with hugetlb=on: huge pages with no mount, and, unlike a file in
// a mount, sealed, so a receiver need not take them on trust.
TEST_CASE("memory from --hugetlb is a memfd of huge pages sealed at its size - and too few huge pages are refused clearly") {
  HugePagesForTest huge_pages(8);
  huge_pages.require();
  kvm::MemoryOptions options;
  options.backing = kvm::MemoryBacking::hugetlbfs;
  const std::vector<kvm::RegionLayout> layout = {{0, 8ull << 20}};
  auto memory = kvm::GuestMemory::create(layout, options);
  const int fd = memory.regions()[0].memfd.get();
  CHECK((::fcntl(fd, F_GET_SEALS) & (F_SEAL_SHRINK | F_SEAL_GROW)) == (F_SEAL_SHRINK | F_SEAL_GROW));
  CHECK(::ftruncate(fd, 2 << 20) == -1);
  CHECK(errno == EPERM);
  CHECK_THAT(kvm::describe_page_size(options), Contains("sealed memfd"));
  auto adopted = kvm::GuestMemory::adopt(layout, std::vector<int>{fd});
  CHECK(adopted.backing() == kvm::MemoryBacking::hugetlbfs);
  CHECK_THROWS_WITH(adopted.discard(0, 0, 1), Contains("cannot be dropped"));

  const std::uint64_t more_than_the_host_has = read_number(kNrHugePages) + 1;
  CHECK_THROWS_WITH(kvm::GuestMemory::create({{{0, more_than_the_host_has << 21}}}, options),
                    Contains("--hugetlb: " + std::to_string(more_than_the_host_has) + " huge pages of 2048 KiB needed"));
  CHECK_THROWS_WITH(kvm::GuestMemory::create({{{0, 3ull << 20}}}, options), Contains("not a multiple of --hugetlb's 2048 KiB pages"));
}

TEST_CASE("memfd guest memory is sealed at its size - and adopting a memfd that could shrink is refused") {
  const std::vector<kvm::RegionLayout> layout = {{0, 4ull << 20}};
  kvm::MemoryOptions options;
  options.backing = kvm::MemoryBacking::memfd;
  auto memory = kvm::GuestMemory::create(layout, options);
  const int fd = memory.regions()[0].memfd.get();
  CHECK(::ftruncate(fd, 4096) == -1);
  CHECK(errno == EPERM);
  CHECK_NOTHROW(kvm::GuestMemory::adopt(layout, std::vector<int>{fd}));

  UniqueFd unsealed(::memfd_create("unsealed", MFD_CLOEXEC));
  REQUIRE(::ftruncate(unsealed.get(), 4ull << 20) == 0);
  CHECK_THROWS_WITH(kvm::GuestMemory::adopt(layout, std::vector<int>{unsealed.get()}), Contains("not sealed against shrinking"));
}

TEST_CASE("the VMM-write log gives each region the pages the VMM wrote there, once") {
  const std::vector<kvm::RegionLayout> layout = {{0, 64 * kvm::kPageSize}, {1ull << 30, 128 * kvm::kPageSize}};
  auto memory = kvm::GuestMemory::create(layout, {.backing = kvm::MemoryBacking::anonymous, .transparent_huge_pages = false, .hugetlbfs_dir = {}});
  const auto take = [&](std::size_t region) {
    std::vector<std::uint64_t> bitmap(2, 0);
    memory.take_vmm_writes(region, bitmap);
    return bitmap;
  };
  CHECK(take(0) == std::vector<std::uint64_t>{0, 0});
  memory.note_vmm_write((1ull << 30) + 63 * kvm::kPageSize + 100, kvm::kPageSize);  // pages 63 and 64 of region 1
  memory.note_vmm_write(1ull << 40, 8);  // outside the guest: ignored
  CHECK(take(0) == std::vector<std::uint64_t>{0, 0});
  CHECK(take(1) == std::vector<std::uint64_t>{1ull << 63, 1});
  CHECK(take(1) == std::vector<std::uint64_t>{0, 0});  // taken
  memory.note_vmm_write(5 * kvm::kPageSize, 1);
  memory.note_vmm_write(6 * kvm::kPageSize, 1);
  CHECK(take(0) == std::vector<std::uint64_t>{0b1100000, 0});
  memory.note_vmm_write(5 * kvm::kPageSize, 1);  // again after a take: there again
  CHECK(take(0) == std::vector<std::uint64_t>{0b100000, 0});
  CHECK_THROWS(take(2));
}
