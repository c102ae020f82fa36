// userfaultfd in missing mode, as post-copy needs it: ranges of guest memory whose absent
// pages trap instead of reading as zero, and the two atomic ways to fill such a page. A
// vCPU (through KVM) or any thread touching a trapped, absent page sleeps in the kernel until
// the page is installed; the installing ioctl wakes it.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "common/fd.h"

namespace mig::engine {

struct Fault {
  std::uint64_t address = 0;  // host virtual address, rounded down to its page
  pid_t thread = 0;           // the faulting thread (0 where the kernel does not say)
};

class Userfault {
 public:
  // Throws with the reason when the kernel refuses (no permission, no userfaultfd).
  Userfault();

  // Traps absent pages of [host, host + bytes). Throws naming the memory when the kernel
  // cannot register it (a mapping kind without missing-mode support, such as some hugetlbfs
  // set-ups).
  void register_range(std::byte* host, std::uint64_t bytes);
  void unregister_range(std::byte* host, std::uint64_t bytes);

  // Installs `bytes` (whole pages) from `source` at `host` and wakes whoever waits there.
  // False when a page of the range was present already (nothing of it is changed then).
  bool copy(std::byte* host, const std::byte* source, std::uint64_t bytes);
  // Installs zero pages; false when present already.
  bool zero(std::byte* host, std::uint64_t bytes);

  // Waits up to `timeout_ms` (-1: forever) for faults and returns those pending, or none.
  std::vector<Fault> wait_faults(int timeout_ms);
  int fd() const { return fd_.get(); }

 private:
  UniqueFd fd_;
};

}  // namespace mig::engine
