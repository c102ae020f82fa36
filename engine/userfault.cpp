#include "engine/userfault.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <array>
#include <utility>

namespace mig::engine {

Userfault::Userfault() {
  // Not UFFD_USER_MODE_ONLY: the faults that matter are KVM's, taken in kernel mode on the
  // vCPU's behalf.
  const long fd = ::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) throw_errno("userfaultfd (post-copy needs it: run as root or set vm.unprivileged_userfaultfd=1)");
  fd_.reset(static_cast<int>(fd));
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = UFFD_FEATURE_THREAD_ID;
  check_syscall("UFFDIO_API", [&] { return ::ioctl(fd_.get(), UFFDIO_API, &api); });
}

void Userfault::register_range(std::byte* host, std::uint64_t bytes) {
  uffdio_register reg{};
  reg.range = {reinterpret_cast<std::uint64_t>(host), bytes};
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  check_syscall("UFFDIO_REGISTER of guest memory", [&] { return ::ioctl(fd_.get(), UFFDIO_REGISTER, &reg); });
  const std::uint64_t needed = (1ull << _UFFDIO_COPY) | (1ull << _UFFDIO_ZEROPAGE);
  if ((reg.ioctls & needed) != needed)
    throw std::runtime_error("userfaultfd cannot install pages into this guest memory (no UFFDIO_COPY/ZEROPAGE for it)");
}

void Userfault::unregister_range(std::byte* host, std::uint64_t bytes) {
  uffdio_range range{reinterpret_cast<std::uint64_t>(host), bytes};
  check_syscall("UFFDIO_UNREGISTER", [&] { return ::ioctl(fd_.get(), UFFDIO_UNREGISTER, &range); });
}

namespace {

// Runs an installing ioctl until the whole range is done: the kernel may stop part way
// (EAGAIN while the mapping changes) and says how far it got. `attempt(offset)` issues it for
// the rest of the range and returns its result and progress. EEXIST: a page was present.
template <typename Attempt>
bool install_all(std::uint64_t bytes, const char* what, Attempt attempt) {
  for (std::uint64_t finished = 0; finished < bytes;) {
    const auto [rc, progressed] = attempt(finished);
    if (rc == 0) return true;
    if (errno == EEXIST) return false;
    if (errno != EAGAIN && errno != EINTR) throw_errno(what);
    if (progressed > 0) finished += static_cast<std::uint64_t>(progressed);
  }
  return true;
}

}  // namespace

bool Userfault::copy(std::byte* host, const std::byte* source, std::uint64_t bytes) {
  return install_all(bytes, "UFFDIO_COPY", [&](std::uint64_t offset) {
    uffdio_copy c{};
    c.dst = reinterpret_cast<std::uint64_t>(host) + offset;
    c.src = reinterpret_cast<std::uint64_t>(source) + offset;
    c.len = bytes - offset;
    const int rc = ::ioctl(fd_.get(), UFFDIO_COPY, &c);
    return std::pair{rc, c.copy};
  });
}

bool Userfault::zero(std::byte* host, std::uint64_t bytes) {
  return install_all(bytes, "UFFDIO_ZEROPAGE", [&](std::uint64_t offset) {
    uffdio_zeropage z{};
    z.range = {reinterpret_cast<std::uint64_t>(host) + offset, bytes - offset};
    const int rc = ::ioctl(fd_.get(), UFFDIO_ZEROPAGE, &z);
    return std::pair{rc, z.zeropage};
  });
}

std::vector<Fault> Userfault::wait_faults(int timeout_ms) {
  pollfd p{fd_.get(), POLLIN, 0};
  if (::poll(&p, 1, timeout_ms) <= 0) return {};
  std::array<uffd_msg, 64> messages;
  const ssize_t n = ::read(fd_.get(), messages.data(), sizeof messages);
  if (n < 0) {
    if (errno == EAGAIN || errno == EINTR) return {};
    throw_errno("read userfaultfd");
  }
  std::vector<Fault> faults;
  for (std::size_t i = 0; i < static_cast<std::size_t>(n) / sizeof(uffd_msg); ++i) {
    if (messages[i].event != UFFD_EVENT_PAGEFAULT) continue;
    faults.push_back({messages[i].arg.pagefault.address & ~std::uint64_t{4095},
                      static_cast<pid_t>(messages[i].arg.pagefault.feat.ptid)});
  }
  return faults;
}

}  // namespace mig::engine
