#include "vmm/image_disk.h"

#include <sys/stat.h>

#include <algorithm>
#include <utility>

namespace mig::vmm {

ImageDisk::ImageDisk(std::unique_ptr<kvm::DiskImage> image)
    : image_(std::move(image)), written_((image_->size() / kChunk + 64) / 64) {}

void ImageDisk::guest_write(std::uint64_t offset, std::span<const std::byte> data) {
  std::lock_guard lock(mutex_);
  image_->write(offset, data);
  if (!tracking_ || data.empty()) return;
  for (std::uint64_t c = offset / kChunk; c <= (offset + data.size() - 1) / kChunk; ++c) written_[c / 64] |= 1ull << (c % 64);
}

std::vector<engine::DiskExtent> ImageDisk::data_extents() {
  std::vector<engine::DiskExtent> out;
  for (const auto& e : image_->data_extents()) out.push_back({e.offset, e.length});
  return out;
}

void ImageDisk::track_writes(bool on) {
  std::lock_guard lock(mutex_);
  tracking_ = on;
}

void ImageDisk::fetch_written(std::span<std::uint64_t> bitmap) {
  std::lock_guard lock(mutex_);
  for (std::size_t i = 0; i < std::min(bitmap.size(), written_.size()); ++i) bitmap[i] |= std::exchange(written_[i], 0);
}

std::unique_ptr<kvm::DiskImage> open_incoming_disk(const engine::VmShape::Disk& disk, std::size_t index,
                                                   const std::vector<kvm::DiskConfig>& given) {
  if (disk.copy && index >= given.size())
    throw std::runtime_error("the source copies disk " + std::to_string(index) + " (" + disk.source_path +
                             "): give mig-recv --disk PATH for the image to write it into");
  const kvm::DiskConfig config = index < given.size() ? given[index] : kvm::DiskConfig{disk.source_path};
  if (!disk.copy) return kvm::DiskImage::open(config, kvm::DiskImage::Open::existing_unlocked);
  struct stat ours {}, theirs {};
  if (::stat(config.path.c_str(), &ours) == 0 && ::stat(disk.source_path.c_str(), &theirs) == 0 &&
      ours.st_dev == theirs.st_dev && ours.st_ino == theirs.st_ino)
    throw std::runtime_error("disk image " + config.path + " is the source's own image: --copy-storage-all needs another");
  return kvm::DiskImage::open(config, kvm::DiskImage::Open::create, disk.size);
}

}  // namespace mig::vmm
