// Huge pages for tests of hugetlbfs memory (--mem-path, --hugetlb): the host's free count,
// and a reservation made for one test and put back after it (which needs root).
#pragma once

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <string>

#include "common/fd.h"

namespace mig::test {

inline unsigned read_number(const char* path) {
  unsigned value = 0;
  std::ifstream(path) >> value;
  return value;
}
inline constexpr const char* kNrHugePages = "/proc/sys/vm/nr_hugepages";
inline unsigned free_huge_pages() { return read_number("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages"); }

// Held by a test while it counts on the host's free huge pages or changes them: ctest runs
// test cases as processes side by side.
struct HugePagesLock {
  HugePagesLock() {
    if (::flock(file.get(), LOCK_EX) != 0) throw std::runtime_error("flock of the huge pages lock failed");
  }
  UniqueFd file = UniqueFd::open("/tmp/mig-tests-huge-pages.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0600);
};

// At least `wanted` free 2 MiB pages for the test, the host's count put back afterwards.
struct HugePagesForTest {
  explicit HugePagesForTest(unsigned wanted) : before(read_number(kNrHugePages)), wanted_(wanted) {
    if (free_huge_pages() < wanted) std::ofstream(kNrHugePages) << before + wanted - free_huge_pages();
  }
  ~HugePagesForTest() { std::ofstream(kNrHugePages) << before; }
  // The test goes on only with its huge pages. Not root, none can be reserved: the test is
  // skipped (MIG_SKIP_CODE, as one without KVM is), never passed. As root, pages the kernel
  // would not give are a failure.
  void require() const {
    if (free_huge_pages() >= wanted_) return;
    if (::geteuid() != 0) {
      std::printf("SKIPPED: not root, so no huge pages can be reserved\n");
      std::exit(MIG_SKIP_CODE);
    }
    throw std::runtime_error("the kernel gave " + std::to_string(free_huge_pages()) + " free huge pages of the " +
                             std::to_string(wanted_) + " asked for in " + kNrHugePages);
  }
  HugePagesLock lock;
  const unsigned before;

 private:
  unsigned wanted_;
};

}  // namespace mig::test
