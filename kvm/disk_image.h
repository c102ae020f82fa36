// A guest disk's backing image: a raw file, or a qcow2 file reached through qemu-nbd and
// libnbd (QEMU's own qcow2 code, as libvirt uses it for storage migration). Both answer
// which ranges hold data without reading them, and both keep holes holes.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace mig::kvm {

enum class ImageFormat { raw, qcow2 };
enum class CacheMode {
  none,       // O_DIRECT (raw) / qemu-nbd --cache=none: the host page cache holds nothing
  writeback,  // through the host page cache; the guest's flush is an fdatasync
};

struct DiskConfig {
  std::string path;
  ImageFormat format = ImageFormat::raw;
  CacheMode cache = CacheMode::none;
};

// "PATH[,format=raw|qcow2][,cache=none|writeback]", as mig-vm --disk and mig-recv --disk take
// it. Throws std::invalid_argument naming what is wrong.
DiskConfig parse_disk_config(const std::string& text);
std::string to_string(ImageFormat format);
std::string to_string(CacheMode cache);

struct Extent {
  std::uint64_t offset = 0, length = 0;
  friend bool operator==(const Extent&, const Extent&) = default;
};

class DiskImage {
 public:
  enum class Open {
    existing,           // the image must exist; its write lock is taken now
    existing_unlocked,  // shared storage at a destination: the source holds the lock until
                        // the switchover, so reacquire() takes it then (raw images only)
    create,             // an image of create_size is made if there is none; an existing one
                        // must be at least that large
  };
  // Opens (or creates) the image and, for raw images, takes the exclusive write lock (an OFD
  // lock on the whole file; qemu-nbd takes QEMU's own image locks for qcow2). Throws
  // std::runtime_error with a one-line reason: missing, read-only, too small, locked by
  // another process, not qcow2, qemu-nbd missing.
  static std::unique_ptr<DiskImage> open(const DiskConfig& config, Open mode = Open::existing,
                                         std::uint64_t create_size = 0);
  virtual ~DiskImage() = default;

  const DiskConfig& config() const { return config_; }
  std::uint64_t size() const { return size_; }
  // The file descriptor for direct I/O (io_uring), or -1 when I/O must go through read/write.
  virtual int fd() const { return -1; }
  // With cache=none, the alignment buffers, offsets and lengths of fd() I/O need (else 1).
  virtual std::size_t direct_io_alignment() const { return 1; }

  // Synchronous I/O; each throws std::runtime_error on failure.
  virtual void read(std::uint64_t offset, std::span<std::byte> out) = 0;
  virtual void write(std::uint64_t offset, std::span<const std::byte> data) = 0;
  // Makes the range read as zero, leaving a hole where the format can.
  virtual void write_zeroes(std::uint64_t offset, std::uint64_t length) = 0;
  virtual void flush() = 0;
  // The ranges that may hold data, in order; everything else reads as zero.
  virtual std::vector<Extent> data_extents() = 0;
  // Bytes the image occupies on its file system.
  std::uint64_t allocated_bytes() const;

  // Shared storage: gives the write lock up (after a flush) so another host can take the
  // image, and takes it back. Throws when another holder has it.
  virtual void release() = 0;
  virtual void reacquire() = 0;
  // Whether another process holds a write lock on the image (for tests and diagnostics).
  static bool locked_elsewhere(const std::string& path);

 protected:
  DiskImage(DiskConfig config, std::uint64_t size) : config_(std::move(config)), size_(size) {}
  DiskConfig config_;
  std::uint64_t size_ = 0;
};

}  // namespace mig::kvm
