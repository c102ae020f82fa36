// The source's page path for one channel: pages set in a bitmap become page-batch frames,
// gathered straight from guest memory.
#pragma once

#include <sys/uio.h>

#include <functional>
#include <optional>
#include <span>
#include <vector>

#include "engine/compression.h"
#include "engine/control.h"
#include "engine/delta.h"
#include "engine/page_hashes.h"
#include "engine/vm.h"
#include "transport/stream.h"

namespace mig::engine {

using Bitmaps = std::vector<std::vector<std::uint64_t>>;
Bitmaps empty_bitmaps(std::span<const MemoryRegion> regions);
// The pages set in `bitmaps`, over every region.
std::uint64_t count_pages(std::span<const MemoryRegion> regions, const Bitmaps& bitmaps);

struct RoundCounts {
  std::uint64_t pages_sent = 0, pages_zero = 0, pages_skipped = 0, pages_delta = 0, bytes = 0;
  RoundCounts& operator+=(const RoundCounts& o);
};

struct PageSenderConfig {
  bool dedup = true;
  bool skip_zero_pages = true;
  int compress_level = 0;
  std::size_t delta_cache_pages = 0;
  // The VM whose dirty log the sender re-arms, stretch by stretch, just before it reads the
  // pages of a live round (MigratableVm::rearm_dirty_pages); none for pages sent otherwise.
  MigratableVm* dirty_log = nullptr;
};

// Hashes each page as it goes, which both feeds verification and finds the pages not worth
// sending. Checks for a cancel before every batch, so a cancel never waits out a round.
class PageSender {
 public:
  static constexpr std::size_t kBatchPages = 256;
  // Pages re-armed at once (a multiple of 64): a write between a stretch's re-arming and a
  // page's turn in it still sends the page again next round, and each re-arming costs an
  // ioctl that write-protects pages; 2 MiB, the channels' chunk (wire::kChannelChunkPages).
  static constexpr std::uint64_t kRearmPages = 512;

  // Channel `channel` of `channels`: it handles only the pages that travel on it.
  PageSender(std::span<const MemoryRegion> regions, transport::Stream& stream, PageHashes& hashes,
             const PageSenderConfig& config, MigrationControl& control, unsigned channel, unsigned channels);

  std::uint64_t batches_compressed() const { return compressor_ ? compressor_->batches_compressed() : 0; }
  std::uint64_t pages_delta() const { return pages_delta_total_; }

  // Sends this channel's pages among those set in `pending`, clearing each one's bit as it
  // goes (other channels clear theirs at the same time, atomically). `guest_paused` lifts
  // the bandwidth limit and sorts the bytes for statistics. Stops at a batch boundary when
  // `stop_early` says so: the pages not sent keep their bits.
  RoundCounts send_round(std::uint32_t round, Bitmaps& pending, bool guest_paused,
                         const std::function<bool()>& stop_early = {});

  // Post-copy: sends pages [first, first + count) of `region` now and flushes. Configure the
  // sender without dedup and zero skipping: the receiver has dropped these pages.
  RoundCounts send_pages(std::uint32_t round, std::size_t region, std::uint64_t first, std::uint64_t count);
  // Pages answering a vCPU that waits go unpaced, whatever the bandwidth limit.
  void set_unpaced() { unpaced_ = true; }

 private:
  void begin(std::uint32_t round, bool guest_paused);
  RoundCounts end();
  void rearm_dirty_log(std::size_t region, std::span<const std::uint64_t> pending, std::uint64_t begin, std::uint64_t end);
  void add_page(std::size_t region, std::uint64_t page);
  const std::byte* copy_into_batch(const std::byte* page);
  void add_through_cache(std::size_t region, std::uint64_t page, const std::byte* snapshot, wire::PageDescriptor& d);
  void flush();
  void report(std::uint64_t bytes);  // tells control_ what this round did since the last report

  std::span<const MemoryRegion> regions_;
  transport::Stream& stream_;
  PageHashes& hashes_;  // shared by all channels; each writes only its own pages' entries
  MigrationControl& control_;
  bool dedup_, skip_zero_;
  MigratableVm* dirty_log_;
  std::vector<std::uint64_t> rearming_;  // the pages of a stretch to re-arm
  unsigned channel_, channels_;
  std::uint32_t round_ = 0;
  bool guest_paused_ = false, unpaced_ = false;
  RoundCounts counts_;    // this round so far
  RoundCounts reported_;  // of counts_, what control_ was told
  std::uint64_t bytes_before_ = 0;  // the stream's count when this round began
  std::uint64_t pages_delta_total_ = 0;
  std::optional<BatchCompressor> compressor_;
  std::optional<DeltaCache> delta_;
  std::vector<std::byte> batch_bytes_;  // what this batch sends from here: deltas, pages resent as copies
  alignas(64) std::byte snapshot_[kPageSize];
  std::vector<wire::PageDescriptor> descriptors_;
  std::vector<iovec> pages_;
  transport::PageMemory memory_ = transport::PageMemory::guest;  // where this batch's pages_ point
  std::vector<std::byte> head_;
};

}  // namespace mig::engine
