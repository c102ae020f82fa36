// Huge pages for tests of hugetlbfs memory (--mem-path, --hugetlb): the host's free count,
// and a reservation made for one test and put back after it (which needs root).
#pragma once

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <string>

#include "common/fd.h"

namespace mig::test {

// Ends the test process as skipped (MIG_SKIP_CODE, as a test without KVM is), never passed.
[[noreturn]] inline void skip_test(const std::string& why) {
  std::printf("SKIPPED: %s\n", why.c_str());
  std::exit(MIG_SKIP_CODE);
}

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
  UniqueFd file = open_shared("/tmp/mig-tests-huge-pages.lock");

 private:
  // Whoever runs first makes the file, and every user must be able to open it after: read
  // only (flock needs no more), and without O_CREAT when it exists, which the kernel's
  // protected_regular refuses in /tmp for a file another user owns.
  static UniqueFd open_shared(const char* path) {
    for (;;) {
      if (::access(path, F_OK) == 0) return UniqueFd::open(path, O_RDONLY | O_CLOEXEC);
      const int made = ::open(path, O_RDONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
      if (made >= 0) return UniqueFd(made);
      if (errno != EEXIST) throw std::runtime_error(std::string("cannot make ") + path);
    }
  }
};

// At least `wanted` free 2 MiB pages for the test, the host's count put back afterwards.
struct HugePagesForTest {
  explicit HugePagesForTest(unsigned wanted) : before(read_number(kNrHugePages)), wanted_(wanted) {
    if (free_huge_pages() < wanted) std::ofstream(kNrHugePages) << before + wanted - free_huge_pages();
  }
  ~HugePagesForTest() { std::ofstream(kNrHugePages) << before; }
  // The test goes on only with its huge pages. Not root, none can be reserved: the test is
  // skipped. As root, pages the kernel would not give are a failure.
  void require() const {
    if (free_huge_pages() >= wanted_) return;
    if (::geteuid() != 0) skip_test("not root, so no huge pages can be reserved");
    throw std::runtime_error("the kernel gave " + std::to_string(free_huge_pages()) + " free huge pages of the " +
                             std::to_string(wanted_) + " asked for in " + kNrHugePages);
  }
  HugePagesLock lock;
  const unsigned before;

 private:
  unsigned wanted_;
};

}  // namespace mig::test
