#include "common/fd.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

namespace mig {

void throw_errno(const std::string& what, int err) {
  throw std::system_error(err, std::generic_category(), what);
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

}  // namespace mig
