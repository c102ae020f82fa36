// A guest disk that the VMM writes itself, straight into its image, tracking what it wrote:
// the synthetic guest's disk, and tests'. (A KVM guest's disk is a virtio-blk device:
// vmm/kvm_vm.h's KvmDisk.)
#pragma once

#include <memory>
#include <mutex>
#include <vector>

#include "../engine/vm.h"
#include "../kvm/disk_image.h"

namespace mig::vmm {

class ImageDisk final : public engine::MigratableDisk {
 public:
  static constexpr std::uint64_t kChunk = 64 * 1024;
  explicit ImageDisk(std::unique_ptr<kvm::DiskImage> image);

  kvm::DiskImage& image() { return *image_; }
  // A write by the guest: tracked once tracking is on.
  void guest_write(std::uint64_t offset, std::span<const std::byte> data);

  std::uint64_t size() const override { return image_->size(); }
  std::string path() const override { return image_->config().path; }
  std::uint64_t chunk_bytes() const override { return kChunk; }
  std::vector<engine::DiskExtent> data_extents() override;
  void track_writes(bool on) override;
  void fetch_written(std::span<std::uint64_t> bitmap) override;
  void read(std::uint64_t offset, std::span<std::byte> out) override { image_->read(offset, out); }
  void write(std::uint64_t offset, std::span<const std::byte> data) override { image_->write(offset, data); }
  void write_zeroes(std::uint64_t offset, std::uint64_t length) override { image_->write_zeroes(offset, length); }
  void release() override { image_->release(); }
  void reacquire() override { image_->reacquire(); }

 private:
  std::unique_ptr<kvm::DiskImage> image_;
  std::mutex mutex_;
  bool tracking_ = false;
  std::vector<std::uint64_t> written_;  // a bit per chunk
};

// The destination's images for the source's disks (VmShape::disks), the i-th from
// `given[i]`: with --copy-storage-all one made there (an existing one, large enough, is
// written over; the source's own image is refused); for shared storage the image named, by
// default the source's own path, opened without its lock, which the switchover takes. More
// images given than the source has disks is refused.
std::vector<std::unique_ptr<kvm::DiskImage>> open_incoming_disks(const std::vector<engine::VmShape::Disk>& disks,
                                                                 const std::vector<kvm::DiskConfig>& given);
// A dry run's check of the same, making and locking nothing: throws what the migration would
// refuse (an image missing, too small, not writable, or the source's own).
void check_incoming_disks(const std::vector<engine::VmShape::Disk>& disks, const std::vector<kvm::DiskConfig>& given);

}  // namespace mig::vmm
