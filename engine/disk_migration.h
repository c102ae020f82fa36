// The disk half of a migration.
//
// Shared storage (the default): no data moves. At the switchover the source, paused and
// drained, flushes each image and gives its write lock up; the destination takes the lock
// before it says Ready, so a failure up to the commit leaves the source to take it back and
// run on, and two hosts never hold it at once.
//
// --copy-storage-all: disks travel like memory, in chunks (MigratableDisk::chunk_bytes).
// Round 0 sends the chunks that may hold data (SEEK_DATA or NBD block status), each later
// round the chunks the guest wrote meanwhile, the stop-and-copy the last ones; the
// convergence check counts the disk bytes left with the pages. A chunk that reads as zero
// goes as DiskZero and becomes a hole. Verification is memory's: both sides keep a hash per
// chunk of what last crossed the wire, and Complete carries the digest.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/control.h"
#include "engine/stats.h"
#include "engine/vm.h"
#include "transport/stream.h"

namespace mig::engine {

// An XXH3 per chunk sent, per disk; equal digests mean equal contents of every chunk sent.
class DiskHashes {
 public:
  explicit DiskHashes(std::span<MigratableDisk* const> disks);
  void set_data(std::size_t disk, std::uint64_t chunk, std::span<const std::byte> data);
  void set_zero(std::size_t disk, std::uint64_t chunk, std::uint64_t length);
  std::uint64_t digest() const;

 private:
  std::vector<std::vector<std::uint64_t>> tables_;
};

// The disks as Hello announces them; `copy`: with --copy-storage-all.
std::vector<wire::Disk> describe_disks(const std::vector<MigratableDisk*>& disks, bool copy);

class DiskSender {
 public:
  DiskSender(std::vector<MigratableDisk*> disks, bool copy);
  // The disks as Hello announces them.
  std::vector<wire::Disk> describe() const;
  bool has_disks() const { return !disks_.empty(); }
  bool copying() const { return copy_ && has_disks(); }

  void start_tracking();
  void stop_tracking() noexcept;
  // Round 0's work: every chunk that may hold data.
  void plan_round_zero();
  // Sends every pending chunk, clearing each; checks for a cancel between sends. The
  // bandwidth limit applies while the guest runs.
  void send_pending(transport::Stream& stream, MigrationControl& control, bool guest_paused);
  // Adds the chunks written since the last fetch to the pending ones.
  void fetch_written();
  std::uint64_t pending_bytes() const;
  // Bytes this sender put on the wire so far.
  std::uint64_t wire_bytes() const { return stats_.wire_bytes; }
  std::uint64_t digest() const { return hashes_.digest(); }

  // Shared storage: flush and unlock every image (source paused), or lock them again.
  void release_all();
  void reacquire_all() noexcept;
  bool released() const { return released_; }

  DiskStats stats(double elapsed_s) const;

 private:
  std::uint64_t chunk_length(std::size_t disk, std::uint64_t chunk) const;
  void send_run(transport::Stream& stream, std::size_t disk, std::uint64_t first, std::uint64_t count);

  std::vector<MigratableDisk*> disks_;
  bool copy_;
  std::vector<std::vector<std::uint64_t>> pending_, scratch_;
  DiskHashes hashes_;
  DiskStats stats_;
  std::vector<std::byte> buffer_;
  bool tracking_ = false, released_ = false;
};

class DiskReceiver {
 public:
  // Checks the VM's disks against the source's announcement.
  DiskReceiver(std::vector<MigratableDisk*> disks, std::vector<wire::Disk> announced);
  // DiskData and DiskZero; false for any other frame.
  bool handle(transport::Stream& stream, const wire::FrameHeader& frame);
  std::uint64_t digest() const { return hashes_.digest(); }
  // Shared storage: takes every shared image's lock, before the guest may run here.
  void take_over_shared();
  DiskStats stats() const;

 private:
  MigratableDisk& checked(std::uint32_t disk, std::uint64_t offset, std::uint64_t length, const char* what) const;

  std::vector<MigratableDisk*> disks_;
  std::vector<wire::Disk> announced_;
  DiskHashes hashes_;
  std::uint64_t bytes_written_ = 0, bytes_zeroed_ = 0;
};

}  // namespace mig::engine
