#include "kvm/disk_image.h"

#include <fcntl.h>
#include <libnbd.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>
#include <stdexcept>

#include "common/fd.h"

extern char** environ;

namespace mig::kvm {

namespace {

std::runtime_error image_error(const std::string& path, const std::string& what) {
  return std::runtime_error("disk image " + path + ": " + what);
}

// An OFD lock on the whole file: held per open file description, so it is independent of
// other fds in this process, and it goes away with the last fd, even on a crash.
bool set_write_lock(int fd, bool locked) {
  struct flock lock {};
  lock.l_type = locked ? F_WRLCK : F_UNLCK;
  lock.l_whence = SEEK_SET;
  if (::fcntl(fd, F_OFD_SETLK, &lock) == 0) return true;
  if (errno == EAGAIN || errno == EACCES) return false;
  throw_errno("fcntl(F_OFD_SETLK)");
}

bool on_path(const std::string& program) {
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/bin:/bin";
  for (std::size_t start = 0; start <= dirs.size();) {
    const std::size_t end = std::min(dirs.find(':', start), dirs.size());
    if (::access((dirs.substr(start, end - start) + "/" + program).c_str(), X_OK) == 0) return true;
    start = end + 1;
  }
  return false;
}

// Runs a program to its end; throws with its name when it fails.
void run_program(std::vector<std::string> args) {
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  if (const int err = ::posix_spawnp(&pid, argv[0], nullptr, nullptr, argv.data(), environ); err != 0)
    throw_errno(std::string("cannot run ") + argv[0], err);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) throw_errno("waitpid");
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) throw std::runtime_error(args[0] + " " + args[1] + " failed");
}

class RawImage final : public DiskImage {
 public:
  RawImage(DiskConfig config, UniqueFd fd, std::uint64_t size, bool locked)
      : DiskImage(std::move(config), size), fd_(std::move(fd)), locked_(locked) {}

  int fd() const override { return fd_.get(); }
  std::size_t direct_io_alignment() const override { return config_.cache == CacheMode::none ? 512 : 1; }

  // Direct I/O wants aligned buffers, offsets and lengths; these synchronous paths (the
  // migration's, and odd guest requests) bounce through one where the caller's are not.
  void read(std::uint64_t offset, std::span<std::byte> out) override {
    if (aligned(offset, out.data(), out.size())) return transfer(false, out.data(), out.size(), offset);
    std::lock_guard lock(bounce_mutex_);
    const std::uint64_t at = bounce(offset, out.size(), false).first;
    std::memcpy(out.data(), bounce_.data() + (offset - at), out.size());
  }
  void write(std::uint64_t offset, std::span<const std::byte> data) override {
    if (aligned(offset, data.data(), data.size()))
      return transfer(true, const_cast<std::byte*>(data.data()), data.size(), offset);
    std::lock_guard lock(bounce_mutex_);
    const auto [at, length] = bounce(offset, data.size(), true);
    std::memcpy(bounce_.data() + (offset - at), data.data(), data.size());
    transfer(true, bounce_.data(), length, at);
  }
  void write_zeroes(std::uint64_t offset, std::uint64_t length) override {
    check_syscall("fallocate(PUNCH_HOLE)", [&] {
      return ::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                         static_cast<off_t>(length));
    });
  }
  void flush() override { check_syscall("fdatasync", [&] { return ::fdatasync(fd_.get()); }); }

  std::vector<Extent> data_extents() override {
    std::vector<Extent> extents;
    off_t at = 0;
    const auto end = static_cast<off_t>(size_);
    while (at < end) {
      const off_t data = ::lseek(fd_.get(), at, SEEK_DATA);
      if (data < 0) {
        if (errno == ENXIO) break;  // no data after `at`
        throw_errno("lseek(SEEK_DATA)");
      }
      off_t hole = ::lseek(fd_.get(), data, SEEK_HOLE);
      if (hole < 0) throw_errno("lseek(SEEK_HOLE)");
      hole = std::min(hole, end);
      if (hole > data) extents.push_back({static_cast<std::uint64_t>(data), static_cast<std::uint64_t>(hole - data)});
      at = hole;
    }
    return extents;
  }

  void release() override {
    if (!locked_) return;
    flush();
    set_write_lock(fd_.get(), false);
    locked_ = false;
  }
  void reacquire() override {
    if (locked_) return;
    if (!set_write_lock(fd_.get(), true)) throw image_error(config_.path, "locked by another process");
    locked_ = true;
    // With the page cache in between, what this host cached of the image before another host
    // wrote it is stale: drop it, the way NFS revalidates a file on open.
    if (config_.cache == CacheMode::writeback) ::posix_fadvise(fd_.get(), 0, 0, POSIX_FADV_DONTNEED);
  }

 private:
  bool aligned(std::uint64_t offset, const std::byte* buffer, std::size_t length) const {
    const std::size_t align = direct_io_alignment();
    return offset % align == 0 && length % align == 0 && reinterpret_cast<std::uintptr_t>(buffer) % align == 0;
  }
  // Reads the aligned span around [offset, offset + length) into the bounce buffer (for a
  // write, only where the span reaches past the data); returns where it starts and its length.
  std::pair<std::uint64_t, std::size_t> bounce(std::uint64_t offset, std::size_t length, bool for_write) {
    const std::uint64_t align = direct_io_alignment();
    const std::uint64_t at = offset / align * align;
    const auto span_length = static_cast<std::size_t>((offset + length + align - 1) / align * align - at);
    if (bounce_.size() < span_length)
      bounce_ = Mapping::map(span_length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0, "disk bounce buffer");
    if (!for_write || at != offset || span_length != length) transfer(false, bounce_.data(), span_length, at);
    return {at, span_length};
  }
  void transfer(bool is_write, std::byte* buffer, std::size_t length, std::uint64_t offset) {
    std::size_t done = 0;
    while (done < length) {
      const auto at = static_cast<off_t>(offset + done);
      const ssize_t n = is_write ? ::pwrite(fd_.get(), buffer + done, length - done, at)
                                 : ::pread(fd_.get(), buffer + done, length - done, at);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) throw_errno(is_write ? "pwrite(disk image)" : "pread(disk image)");
      if (n == 0) {  // past the end of the file: reads as zero
        std::memset(buffer + done, 0, length - done);
        break;
      }
      done += static_cast<std::size_t>(n);
    }
  }

  UniqueFd fd_;
  bool locked_;
  std::mutex bounce_mutex_;  // the device's I/O thread and the migration may both bounce
  Mapping bounce_;
};

std::unique_ptr<DiskImage> open_raw(const DiskConfig& config, DiskImage::Open mode, std::uint64_t create_size) {
  int flags = O_RDWR | O_CLOEXEC | (config.cache == CacheMode::none ? O_DIRECT : 0);
  if (mode == DiskImage::Open::create) flags |= O_CREAT;
  const int fd = ::open(config.path.c_str(), flags, 0644);
  if (fd < 0) {
    if (errno == EINVAL && (flags & O_DIRECT))
      throw image_error(config.path, "its file system cannot do direct I/O (cache=none); use cache=writeback");
    throw image_error(config.path, std::strerror(errno));
  }
  UniqueFd image(fd);
  struct stat st {};
  if (::fstat(image.get(), &st) != 0) throw_errno("fstat(disk image)");
  if (!S_ISREG(st.st_mode)) throw image_error(config.path, "not a regular file");
  auto size = static_cast<std::uint64_t>(st.st_size);
  if (mode == DiskImage::Open::create) {
    if (size == 0) {
      check_syscall("ftruncate(disk image)", [&] { return ::ftruncate(image.get(), static_cast<off_t>(create_size)); });
      size = create_size;
    } else if (size < create_size) {
      throw image_error(config.path, "holds " + std::to_string(size) + " bytes, the disk needs " + std::to_string(create_size));
    }
  }
  if (size == 0 || size % 512 != 0) throw image_error(config.path, "size must be a non-zero multiple of 512 bytes");
  const bool lock = mode != DiskImage::Open::existing_unlocked;
  if (lock && !set_write_lock(image.get(), true)) throw image_error(config.path, "locked by another process");
  return std::make_unique<RawImage>(config, std::move(image), size, lock);
}

// qcow2 through qemu-nbd, started by libnbd with systemd socket activation: it lives exactly
// as long as the handle, and takes QEMU's own image locks.
class NbdImage final : public DiskImage {
 public:
  NbdImage(DiskConfig config, nbd_handle* handle, std::uint64_t size) : DiskImage(std::move(config), size), nbd_(handle) {}
  ~NbdImage() override { ::nbd_close(nbd_); }
  NbdImage(const NbdImage&) = delete;
  NbdImage& operator=(const NbdImage&) = delete;

  void read(std::uint64_t offset, std::span<std::byte> out) override {
    check(::nbd_pread(nbd_, out.data(), out.size(), offset, 0), "read");
  }
  void write(std::uint64_t offset, std::span<const std::byte> data) override {
    check(::nbd_pwrite(nbd_, data.data(), data.size(), offset, 0), "write");
  }
  // Without LIBNBD_CMD_FLAG_NO_HOLE, qemu-nbd (run with --discard=unmap) deallocates.
  void write_zeroes(std::uint64_t offset, std::uint64_t length) override {
    check(::nbd_zero(nbd_, length, offset, 0), "write zeroes");
  }
  void flush() override { check(::nbd_flush(nbd_, 0), "flush"); }

  std::vector<Extent> data_extents() override {
    std::vector<Extent> extents;
    for (std::uint64_t at = 0; at < size_;) {
      std::uint64_t reached = at;
      Collector collector{&extents, &reached};
      nbd_extent_callback callback{&Collector::call, &collector, nullptr};
      // The server answers for as much of the range as it likes; ask again from where it stopped.
      check(::nbd_block_status(nbd_, std::min<std::uint64_t>(size_ - at, 1ull << 30), at, callback, 0), "block status");
      if (reached <= at) throw image_error(config_.path, "qemu-nbd answered block status with no extents");
      at = reached;
    }
    return extents;
  }

  // Shared storage is refused for qcow2 at open (existing_unlocked), so these never run for
  // a migration; qemu-nbd would have to be restarted to hand QEMU's locks over.
  void release() override { throw image_error(config_.path, "shared storage needs a raw image"); }
  void reacquire() override { throw image_error(config_.path, "shared storage needs a raw image"); }

 private:
  struct Collector {
    std::vector<Extent>* extents;
    std::uint64_t* reached;
    static int call(void* self, const char* context, std::uint64_t offset, std::uint32_t* entries, std::size_t count,
                    int*) {
      auto& c = *static_cast<Collector*>(self);
      if (std::strcmp(context, "base:allocation") != 0) return 0;
      for (std::size_t i = 0; i + 1 < count; i += 2) {
        const std::uint64_t length = entries[i];
        // A zero-reading range (hole or known zeroes) carries no data.
        if (!(entries[i + 1] & (LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO))) {
          if (!c.extents->empty() && c.extents->back().offset + c.extents->back().length == offset)
            c.extents->back().length += length;
          else
            c.extents->push_back({offset, length});
        }
        offset += length;
      }
      *c.reached = offset;
      return 0;
    }
  };
  void check(int result, const char* what) const {
    if (result < 0) throw image_error(config_.path, std::string(what) + ": " + ::nbd_get_error());
  }
  nbd_handle* nbd_;
};

std::unique_ptr<DiskImage> open_qcow2(const DiskConfig& config, DiskImage::Open mode, std::uint64_t create_size) {
  if (mode == DiskImage::Open::existing_unlocked)
    throw image_error(config.path, "shared storage needs a raw image; migrate qcow2 with --copy-storage-all");
  if (!on_path("qemu-nbd")) throw image_error(config.path, "qcow2 needs qemu-nbd (Debian's qemu-utils), not found on PATH");
  struct stat st {};
  const bool exists = ::stat(config.path.c_str(), &st) == 0;
  if (!exists && mode != DiskImage::Open::create) throw image_error(config.path, std::strerror(errno));
  if (!exists) run_program({"qemu-img", "create", "-q", "-f", "qcow2", config.path, std::to_string(create_size)});
  else if (::access(config.path.c_str(), R_OK | W_OK) != 0) throw image_error(config.path, std::strerror(errno));

  nbd_handle* nbd = ::nbd_create();
  if (!nbd) throw image_error(config.path, ::nbd_get_error());
  std::unique_ptr<nbd_handle, void (*)(nbd_handle*)> owned(nbd, ::nbd_close);
  const std::string cache = "--cache=" + to_string(config.cache);
  const char* argv[] = {"qemu-nbd", "-f", "qcow2", cache.c_str(), "--discard=unmap", "--aio=threads",
                        config.path.c_str(), nullptr};
  if (::nbd_add_meta_context(nbd, "base:allocation") < 0 ||
      ::nbd_connect_systemd_socket_activation(nbd, const_cast<char**>(argv)) < 0) {
    std::string why = ::nbd_get_error();
    if (why.find("lock") != std::string::npos || why.find("closed") != std::string::npos || why.find("reset") != std::string::npos)
      why = "qemu-nbd could not open it (not qcow2, or locked by another process): " + why;
    throw image_error(config.path, why);
  }
  if (::nbd_is_read_only(nbd) == 1) throw image_error(config.path, "read-only");
  const std::int64_t size = ::nbd_get_size(nbd);
  if (size <= 0) throw image_error(config.path, std::string("size: ") + ::nbd_get_error());
  if (mode == DiskImage::Open::create && static_cast<std::uint64_t>(size) < create_size)
    throw image_error(config.path, "holds " + std::to_string(size) + " bytes, the disk needs " + std::to_string(create_size));
  return std::make_unique<NbdImage>(config, owned.release(), static_cast<std::uint64_t>(size));
}

}  // namespace

DiskConfig parse_disk_config(const std::string& text) {
  DiskConfig config;
  std::size_t start = 0;
  for (bool first = true; start <= text.size(); first = false) {
    const std::size_t end = std::min(text.find(',', start), text.size());
    const std::string item = text.substr(start, end - start);
    start = end + 1;
    if (first) {
      config.path = item;
      continue;
    }
    const auto eq = item.find('=');
    const std::string key = item.substr(0, eq), value = eq == std::string::npos ? "" : item.substr(eq + 1);
    if (key == "format" && (value == "raw" || value == "qcow2"))
      config.format = value == "raw" ? ImageFormat::raw : ImageFormat::qcow2;
    else if (key == "cache" && (value == "none" || value == "writeback"))
      config.cache = value == "none" ? CacheMode::none : CacheMode::writeback;
    else
      throw std::invalid_argument("disk option '" + item + "': expected format=raw|qcow2 or cache=none|writeback");
  }
  if (config.path.empty()) throw std::invalid_argument("disk: an image path is needed");
  return config;
}

std::string to_string(ImageFormat format) { return format == ImageFormat::raw ? "raw" : "qcow2"; }
std::string to_string(CacheMode cache) { return cache == CacheMode::none ? "none" : "writeback"; }

std::unique_ptr<DiskImage> DiskImage::open(const DiskConfig& config, Open mode, std::uint64_t create_size) {
  return config.format == ImageFormat::raw ? open_raw(config, mode, create_size) : open_qcow2(config, mode, create_size);
}

std::uint64_t DiskImage::allocated_bytes() const {
  struct stat st {};
  if (::stat(config_.path.c_str(), &st) != 0) throw_errno("stat(disk image)");
  return static_cast<std::uint64_t>(st.st_blocks) * 512;
}

bool DiskImage::locked_elsewhere(const std::string& path) {
  UniqueFd fd = UniqueFd::open(path, O_RDONLY | O_CLOEXEC);
  struct flock lock {};
  lock.l_type = F_WRLCK;
  lock.l_whence = SEEK_SET;
  if (::fcntl(fd.get(), F_OFD_GETLK, &lock) != 0) throw_errno("fcntl(F_OFD_GETLK)");
  return lock.l_type != F_UNLCK;
}

}  // namespace mig::kvm
