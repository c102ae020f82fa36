#include "engine/disk_migration.h"

#include <xxh_x86dispatch.h>
#include <xxhash.h>

#include <algorithm>
#include <chrono>
#include <thread>
#include <stdexcept>

#include "engine/page_hashes.h"

namespace mig::engine {

namespace {

std::uint64_t chunk_count(const MigratableDisk& disk) { return (disk.size() + disk.chunk_bytes() - 1) / disk.chunk_bytes(); }

bool test_bit(const std::vector<std::uint64_t>& bitmap, std::uint64_t i) { return bitmap[i / 64] >> (i % 64) & 1; }

bool is_zero(std::span<const std::byte> data) {
  std::size_t at = 0;
  for (; at + kPageSize <= data.size(); at += kPageSize)
    if (!is_zero_page(data.data() + at)) return false;
  return std::all_of(data.begin() + static_cast<std::ptrdiff_t>(at), data.end(), [](std::byte b) { return b == std::byte{0}; });
}

std::uint64_t zero_hash(std::uint64_t length) {
  static const std::vector<std::byte> zeros(wire::kMaxDiskChunk);
  return XXH3_64bits_dispatch(zeros.data(), length);
}

}  // namespace

DiskHashes::DiskHashes(std::span<MigratableDisk* const> disks) {
  for (const auto* disk : disks) tables_.emplace_back(chunk_count(*disk), 0);
}

void DiskHashes::set_data(std::size_t disk, std::uint64_t chunk, std::span<const std::byte> data) {
  tables_.at(disk).at(chunk) = XXH3_64bits_dispatch(data.data(), data.size());
}

void DiskHashes::set_zero(std::size_t disk, std::uint64_t chunk, std::uint64_t length) {
  tables_.at(disk).at(chunk) = zero_hash(length);
}

// Tables are small (a 4 GiB disk has 65,536 chunks of 64 KiB), so the digest is computed
// when asked, in a fraction of a millisecond.
std::uint64_t DiskHashes::digest() const {
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  for (const auto& table : tables_) XXH3_64bits_update(state, table.data(), table.size() * sizeof(std::uint64_t));
  const std::uint64_t digest = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  return digest;
}

DiskSender::DiskSender(std::vector<MigratableDisk*> disks, bool copy)
    : disks_(std::move(disks)), copy_(copy), hashes_(disks_) {
  for (const auto* disk : disks_) {
    pending_.emplace_back((chunk_count(*disk) + 63) / 64, 0);
    stats_.size_bytes += disk->size();
  }
  scratch_ = pending_;
  stats_.disks = static_cast<unsigned>(disks_.size());
  stats_.copied = copying();
}

std::vector<wire::Disk> describe_disks(const std::vector<MigratableDisk*>& disks, bool copy) {
  std::vector<wire::Disk> out;
  for (const auto* disk : disks)
    out.push_back({disk->size(), static_cast<std::uint32_t>(disk->chunk_bytes()), copy ? wire::kDiskCopy : 0u, disk->path()});
  return out;
}

std::vector<wire::Disk> DiskSender::describe() const { return describe_disks(disks_, copy_); }

void DiskSender::start_tracking() {
  if (!copying()) return;
  for (auto* disk : disks_) disk->track_writes(true);
  tracking_ = true;
}

void DiskSender::stop_tracking() noexcept {
  if (!tracking_) return;
  tracking_ = false;
  for (auto* disk : disks_) {
    try {
      disk->track_writes(false);
    } catch (...) {
    }
  }
}

// Extents are rounded out to whole chunks: a chunk partly allocated goes whole.
void DiskSender::plan_round_zero() {
  if (!copying()) return;
  for (std::size_t d = 0; d < disks_.size(); ++d) {
    const std::uint64_t chunk = disks_[d]->chunk_bytes();
    for (const auto& extent : disks_[d]->data_extents()) {
      if (extent.length == 0 || extent.offset >= disks_[d]->size()) continue;
      const std::uint64_t end = std::min(extent.offset + extent.length, disks_[d]->size());
      for (std::uint64_t c = extent.offset / chunk; c <= (end - 1) / chunk; ++c) pending_[d][c / 64] |= 1ull << (c % 64);
    }
  }
  stats_.total_bytes = stats_.round0_bytes = pending_bytes();
}

std::uint64_t DiskSender::chunk_length(std::size_t disk, std::uint64_t chunk) const {
  const std::uint64_t size = disks_[disk]->chunk_bytes();
  return std::min(size, disks_[disk]->size() - chunk * size);
}

std::uint64_t DiskSender::pending_bytes() const {
  std::uint64_t total = 0;
  for (std::size_t d = 0; d < disks_.size(); ++d)
    for (std::uint64_t c = 0; c < chunk_count(*disks_[d]); ++c)
      if (test_bit(pending_[d], c)) total += chunk_length(d, c);
  return total;
}

void DiskSender::fetch_written() {
  if (!copying()) return;
  const std::uint64_t before = pending_bytes();
  for (std::size_t d = 0; d < disks_.size(); ++d) {
    std::fill(scratch_[d].begin(), scratch_[d].end(), 0);
    disks_[d]->fetch_written(scratch_[d]);
    for (std::size_t w = 0; w < pending_[d].size(); ++w) pending_[d][w] |= scratch_[d][w];
  }
  // Every rewritten chunk is more to move; one that was still pending counts once.
  stats_.total_bytes += pending_bytes() - before;
}

void DiskSender::send_pending(transport::Stream& stream, MigrationControl& control, bool guest_paused) {
  if (!copying()) return;
  for (std::size_t d = 0; d < disks_.size(); ++d) {
    const std::uint64_t chunks = chunk_count(*disks_[d]);
    const std::uint64_t per_send = std::max<std::uint64_t>(1, wire::kMaxDiskData / disks_[d]->chunk_bytes());
    for (std::uint64_t c = 0; c < chunks;) {
      if (!test_bit(pending_[d], c)) {
        ++c;
        continue;
      }
      std::uint64_t count = 1;
      while (count < per_send && c + count < chunks && test_bit(pending_[d], c + count)) ++count;
      if (control.cancel_requested()) throw MigrationCancelled();
      stream.set_rate_limit(guest_paused ? 0 : control.bandwidth_limit());
      const std::uint64_t before = stream.counters().bytes_sent;
      send_run(stream, d, c, count);
      const std::uint64_t sent = stream.counters().bytes_sent - before;
      stats_.wire_bytes += sent;
      control.count_batch(sent, 0, 0, 0, guest_paused);
      c += count;
    }
  }
}

// One read for the whole run, then a frame per stretch of data chunks or of zero chunks.
// Bits are cleared before the read: a write that lands after it marks its chunk again.
void DiskSender::send_run(transport::Stream& stream, std::size_t d, std::uint64_t first, std::uint64_t count) {
  const std::uint64_t chunk = disks_[d]->chunk_bytes();
  for (std::uint64_t c = first; c < first + count; ++c) pending_[d][c / 64] &= ~(1ull << (c % 64));
  const std::uint64_t offset = first * chunk;
  const std::uint64_t length = std::min(count * chunk, disks_[d]->size() - offset);
  buffer_.resize(length);
  disks_[d]->read(offset, buffer_);
  for (std::uint64_t c = 0; c < count;) {
    auto piece = [&](std::uint64_t i) {
      return std::span<const std::byte>(buffer_).subspan(i * chunk, std::min(chunk, length - i * chunk));
    };
    const bool zero = is_zero(piece(c));
    std::uint64_t n = 1;
    while (c + n < count && is_zero(piece(c + n)) == zero) ++n;
    const std::uint64_t at = c * chunk, bytes = std::min(n * chunk, length - at);
    for (std::uint64_t i = c; i < c + n; ++i) {
      if (zero) hashes_.set_zero(d, first + i, piece(i).size());
      else hashes_.set_data(d, first + i, piece(i));
    }
    const auto disk = static_cast<std::uint32_t>(d);
    if (zero) {
      stream.send(wire::DiskZero{disk, offset + at, bytes});
      stats_.zero_bytes += bytes;
    } else {
      stream.send(wire::DiskData{disk, offset + at, {buffer_.begin() + static_cast<std::ptrdiff_t>(at),
                                                     buffer_.begin() + static_cast<std::ptrdiff_t>(at + bytes)}});
    }
    stats_.processed_bytes += bytes;
    c += n;
  }
}

void DiskSender::release_all() {
  if (copy_) return;  // copied disks stay this side's: the destination writes its own images
  for (auto* disk : disks_) {
    disk->release();
    released_ = true;
  }
}

// Another host's lock goes when that host lets the image go (or dies): try for a while.
void DiskSender::reacquire_all() noexcept {
  if (!released_) return;
  for (auto* disk : disks_) {
    for (int attempt = 0; attempt < 100; ++attempt) {
      try {
        disk->reacquire();
        break;
      } catch (...) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
    }
  }
  released_ = false;
}

DiskStats DiskSender::stats(double elapsed_s) const {
  DiskStats s = stats_;
  s.remaining_bytes = pending_bytes();
  s.bps = elapsed_s > 0 ? static_cast<double>(s.processed_bytes) / elapsed_s : 0;
  return s;
}

DiskReceiver::DiskReceiver(std::vector<MigratableDisk*> disks, std::vector<wire::Disk> announced)
    : disks_(std::move(disks)), announced_(std::move(announced)), hashes_(disks_) {
  if (disks_.size() != announced_.size())
    throw std::runtime_error("the source has " + std::to_string(announced_.size()) + " disks, the VM here " +
                             std::to_string(disks_.size()));
  for (std::size_t d = 0; d < disks_.size(); ++d) {
    if (disks_[d]->size() != announced_[d].size || disks_[d]->chunk_bytes() != announced_[d].chunk_bytes)
      throw std::runtime_error("disk " + std::to_string(d) + " here (" + disks_[d]->path() + ", " +
                               std::to_string(disks_[d]->size()) + " bytes) does not match the source's (" +
                               std::to_string(announced_[d].size) + " bytes)");
  }
}

MigratableDisk& DiskReceiver::checked(std::uint32_t disk, std::uint64_t offset, std::uint64_t length, const char* what) const {
  if (disk >= disks_.size()) throw wire::ProtocolError(std::string(what) + " for disk " + std::to_string(disk) + ", which does not exist");
  if (!(announced_[disk].flags & wire::kDiskCopy)) throw wire::ProtocolError(std::string(what) + " for a shared disk");
  MigratableDisk& d = *disks_[disk];
  const std::uint64_t chunk = d.chunk_bytes();
  if (offset % chunk != 0 || offset >= d.size() || length > d.size() - offset ||
      (length % chunk != 0 && offset + length != d.size()))
    throw wire::ProtocolError(std::string(what) + " outside disk " + std::to_string(disk) + " or not in whole chunks");
  return d;
}

bool DiskReceiver::handle(transport::Stream& stream, const wire::FrameHeader& frame) {
  using wire::MessageType;
  if (frame.type == static_cast<std::uint16_t>(MessageType::disk_data)) {
    const auto m = wire::decode<wire::DiskData>(stream.read_payload(frame));
    MigratableDisk& disk = checked(m.disk, m.offset, m.data.size(), "DiskData");
    disk.write(m.offset, m.data);
    const std::uint64_t chunk = disk.chunk_bytes();
    for (std::uint64_t at = 0; at < m.data.size(); at += chunk)
      hashes_.set_data(m.disk, (m.offset + at) / chunk, std::span(m.data).subspan(at, std::min<std::uint64_t>(chunk, m.data.size() - at)));
    bytes_written_ += m.data.size();
    return true;
  }
  if (frame.type == static_cast<std::uint16_t>(MessageType::disk_zero)) {
    const auto m = wire::decode<wire::DiskZero>(stream.read_payload(frame));
    MigratableDisk& disk = checked(m.disk, m.offset, m.length, "DiskZero");
    disk.write_zeroes(m.offset, m.length);
    const std::uint64_t chunk = disk.chunk_bytes();
    for (std::uint64_t at = 0; at < m.length; at += chunk)
      hashes_.set_zero(m.disk, (m.offset + at) / chunk, std::min(chunk, m.length - at));
    bytes_zeroed_ += m.length;
    return true;
  }
  return false;
}

void DiskReceiver::take_over_shared() {
  for (std::size_t d = 0; d < disks_.size(); ++d)
    if (!(announced_[d].flags & wire::kDiskCopy)) disks_[d]->reacquire();
}

DiskStats DiskReceiver::stats() const {
  DiskStats s;
  s.disks = static_cast<unsigned>(disks_.size());
  s.copied = std::any_of(announced_.begin(), announced_.end(), [](const auto& d) { return d.flags & wire::kDiskCopy; });
  for (const auto* disk : disks_) s.size_bytes += disk->size();
  s.processed_bytes = s.total_bytes = bytes_written_ + bytes_zeroed_;
  s.zero_bytes = bytes_zeroed_;
  return s;
}

}  // namespace mig::engine
