// Move-only owners of OS resources, and the one helper every syscall goes through.
#pragma once

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <string>
#include <system_error>
#include <utility>

namespace mig {

// Throws std::system_error naming what failed ("KVM_SET_SREGS: Invalid argument").
[[noreturn]] void throw_errno(const std::string& what, int err = errno);

// Runs a syscall-like callable, retrying on EINTR, and throws with `what` on -1.
template <typename Fn>
auto check_syscall(const char* what, Fn&& fn) {
  for (;;) {
    auto result = fn();
    if (result != -1) return result;
    if (errno != EINTR) throw_errno(what);
  }
}

// Waits until `fd` is ready for `events` (POLLIN, POLLOUT); false when `timeout` passed first.
// A zero timeout waits for ever, as SO_RCVTIMEO's does.
bool wait_for_fd(int fd, short events, std::chrono::milliseconds timeout);

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) reset(std::exchange(other.fd_, -1));
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  // Opens `path`, throwing "open PATH: cause" on failure.
  static UniqueFd open(const std::string& path, int flags, unsigned mode = 0);

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() { return std::exchange(fd_, -1); }
  void reset(int fd = -1);
  explicit operator bool() const = delete;

 private:
  int fd_ = -1;
};

// An mmap'ed range, unmapped on destruction.
class Mapping {
 public:
  Mapping() = default;
  Mapping(Mapping&& other) noexcept
      : addr_(std::exchange(other.addr_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  Mapping& operator=(Mapping&& other) noexcept;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping();

  static Mapping map(std::size_t size, int prot, int flags, int fd, long offset, const char* what);
  // The same at an address that is a multiple of `alignment` (a power of two), which mmap
  // does not promise: huge pages need it to back a mapping from its first byte.
  static Mapping map_aligned(std::size_t size, std::size_t alignment, int prot, int flags, int fd, const char* what);

  std::byte* data() const { return static_cast<std::byte*>(addr_); }
  std::size_t size() const { return size_; }

 private:
  void* addr_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace mig
