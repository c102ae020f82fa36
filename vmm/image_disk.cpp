#include "vmm/image_disk.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
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

namespace {

// The image the destination uses for the source's disk `index`, by the rules
// open_incoming_disks() states; refuses a copied disk with no image named, and the source's
// own image as a copy's target.
kvm::DiskConfig incoming_disk_config(const engine::VmShape::Disk& disk, std::size_t index, const std::vector<kvm::DiskConfig>& given) {
  if (disk.copy && index >= given.size())
    throw std::runtime_error("the source copies disk " + std::to_string(index) + " (" + disk.source_path +
                             "): give mig-recv --disk PATH for the image to write it into");
  const kvm::DiskConfig config = index < given.size() ? given[index] : kvm::DiskConfig{disk.source_path};
  struct stat ours {}, theirs {};
  if (disk.copy && ::stat(config.path.c_str(), &ours) == 0 && ::stat(disk.source_path.c_str(), &theirs) == 0 &&
      ours.st_dev == theirs.st_dev && ours.st_ino == theirs.st_ino)
    throw std::runtime_error("disk image " + config.path + " is the source's own image: --copy-storage-all needs another");
  return config;
}

// What a dry run can tell of a copy's target without making it: a raw image there must be
// large enough, and where there is none, its folder must be writable. (A qcow2 image's
// virtual size would need qemu-nbd; the migration itself checks it.)
void check_copy_target(const engine::VmShape::Disk& disk, const kvm::DiskConfig& config) {
  struct stat image {};
  if (::stat(config.path.c_str(), &image) == 0) {
    if (config.format == kvm::ImageFormat::raw && static_cast<std::uint64_t>(image.st_size) < disk.size)
      throw std::runtime_error("disk image " + config.path + " holds " + std::to_string(image.st_size) +
                               " bytes, less than the source's disk (" + std::to_string(disk.size) + ")");
    if (::access(config.path.c_str(), W_OK) != 0) throw std::runtime_error("disk image " + config.path + " is not writable here");
    return;
  }
  const auto folder = std::filesystem::path(config.path).parent_path();
  if (::access(folder.empty() ? "." : folder.c_str(), W_OK) != 0)
    throw std::runtime_error("disk image " + config.path + " cannot be made here: its folder is missing or not writable");
}

void check_disk_count(const std::vector<engine::VmShape::Disk>& disks, const std::vector<kvm::DiskConfig>& given) {
  if (disks.size() < given.size())
    throw std::runtime_error("mig-recv was given " + std::to_string(given.size()) + " disks, the source has " +
                             std::to_string(disks.size()));
}

std::unique_ptr<kvm::DiskImage> open_incoming_disk(const engine::VmShape::Disk& disk, std::size_t index,
                                                   const std::vector<kvm::DiskConfig>& given) {
  const auto config = incoming_disk_config(disk, index, given);
  if (!disk.copy) return kvm::DiskImage::open(config, kvm::DiskImage::Open::existing_unlocked);
  return kvm::DiskImage::open(config, kvm::DiskImage::Open::create, disk.size);
}

}  // namespace

std::vector<std::unique_ptr<kvm::DiskImage>> open_incoming_disks(const std::vector<engine::VmShape::Disk>& disks,
                                                                 const std::vector<kvm::DiskConfig>& given) {
  check_disk_count(disks, given);
  std::vector<std::unique_ptr<kvm::DiskImage>> images;
  for (std::size_t i = 0; i < disks.size(); ++i) images.push_back(open_incoming_disk(disks[i], i, given));
  return images;
}

void check_incoming_disks(const std::vector<engine::VmShape::Disk>& disks, const std::vector<kvm::DiskConfig>& given) {
  check_disk_count(disks, given);
  for (std::size_t i = 0; i < disks.size(); ++i) {
    const auto config = incoming_disk_config(disks[i], i, given);
    if (disks[i].copy) {
      check_copy_target(disks[i], config);
      continue;
    }
    // Shared storage: the image must be there, unlocked as the migration opens it, and the
    // same size.
    const auto image = kvm::DiskImage::open(config, kvm::DiskImage::Open::existing_unlocked);
    if (image->size() != disks[i].size)
      throw std::runtime_error("disk image " + config.path + " here holds " + std::to_string(image->size()) +
                               " bytes, the source's disk " + std::to_string(disks[i].size));
  }
}

}  // namespace mig::vmm
