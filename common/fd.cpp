#include "common/fd.h"

#include <fcntl.h>
#include <poll.h>
#include <algorithm>
#include <cstdint>
#include <sys/mman.h>
#include <unistd.h>

namespace mig {

void throw_errno(const std::string& what, int err) {
  throw std::system_error(err, std::generic_category(), what);
}

bool wait_for_fd(int fd, short events, std::chrono::milliseconds timeout) {
  pollfd p{fd, events, 0};
  const int ms = timeout.count() > 0 ? static_cast<int>(std::min<std::int64_t>(timeout.count(), INT32_MAX)) : -1;
  for (;;) {
    const int n = ::poll(&p, 1, ms);
    if (n >= 0 || errno != EINTR) return n > 0;
  }
}

UniqueFd UniqueFd::open(const std::string& path, int flags, unsigned mode) {
  const std::string what = "open " + path;
  return UniqueFd(check_syscall(what.c_str(), [&] { return ::open(path.c_str(), flags | O_CLOEXEC, mode); }));
}

void UniqueFd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

Mapping& Mapping::operator=(Mapping&& other) noexcept {
  if (this != &other) {
    if (addr_) ::munmap(addr_, size_);
    addr_ = std::exchange(other.addr_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

Mapping::~Mapping() {
  if (addr_) ::munmap(addr_, size_);
}

Mapping Mapping::map(std::size_t size, int prot, int flags, int fd, long offset, const char* what) {
  void* addr = ::mmap(nullptr, size, prot, flags, fd, offset);
  if (addr == MAP_FAILED) throw_errno(what);
  Mapping m;
  m.addr_ = addr;
  m.size_ = size;
  return m;
}

Mapping Mapping::map_aligned(std::size_t size, std::size_t alignment, int prot, int flags, int fd, const char* what) {
  // Reserve room for any alignment, place the mapping inside it, and give back the rest.
  Mapping reserved = map(size + alignment, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0, what);
  const auto start = reinterpret_cast<std::uintptr_t>(reserved.data());
  const std::uintptr_t aligned = (start + alignment - 1) & ~(alignment - 1);
  void* addr = ::mmap(reinterpret_cast<void*>(aligned), size, prot, flags | MAP_FIXED, fd, 0);
  if (addr == MAP_FAILED) throw_errno(what);
  reserved.addr_ = nullptr;  // from here on the pieces are released one by one
  if (aligned > start) ::munmap(reinterpret_cast<void*>(start), aligned - start);
  if (const std::uintptr_t end = start + size + alignment; end > aligned + size)
    ::munmap(reinterpret_cast<void*>(aligned + size), end - aligned - size);
  Mapping m;
  m.addr_ = addr;
  m.size_ = size;
  return m;
}

}  // namespace mig
