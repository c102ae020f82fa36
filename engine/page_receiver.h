// The destination's page path: page batches applied straight into guest memory, one channel
// each, plus the helper that backs planned pages with memory ahead of the stream.
#pragma once

#include <sys/uio.h>

#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "engine/compression.h"
#include "engine/cpu_time.h"
#include "engine/page_hashes.h"
#include "engine/vm.h"
#include "transport/stream.h"

namespace mig::engine {

// Post-copy: once absent pages trap, a page cannot simply be written into guest memory (the
// write would trap too). It lands beside it, and install() puts it in place atomically,
// waking whatever waits on it.
class PageInstaller {
 public:
  virtual ~PageInstaller() = default;
  // `data` is one page, or null for a zero page. `hash_slot` is the caller's PageHashes
  // channel. Throws ProtocolError for a page that was not expected, or not expected again.
  virtual void install(unsigned hash_slot, std::size_t region, std::uint64_t page, const std::byte* data) = 0;
};

// Applies the page batches of one channel to guest memory. Everything in a batch is checked
// before a single byte of page data is read into guest memory, including that each page
// belongs to this channel: the round-ordering invariant rests on it.
class PageReceiver {
 public:
  PageReceiver(std::vector<MemoryRegion> regions, transport::Stream& stream, PageHashes& hashes, unsigned channel,
               unsigned channels);

  // Handles the frames every channel carries: page batches, and round ends (acknowledged once
  // the round's batches before them are applied). Returns false for any other frame.
  bool handle(const wire::FrameHeader& frame);

  // From now on pages go through `installer` (post-copy), on whichever channel they come.
  void install_through(PageInstaller& installer) {
    installer_ = &installer;
    channels_ = 1;
  }

  std::uint64_t pages() const { return pages_; }
  std::uint32_t rounds() const { return last_round_ + 1; }

 private:
  struct Target {
    std::size_t region;
    std::uint64_t page;
    std::byte* host;
  };
  void apply(const wire::FrameHeader& frame);
  std::uint64_t locate_all();  // fills targets_ and iovecs_; returns the page bytes the batch carries
  void read_compressed(std::uint32_t compressed_bytes, std::uint64_t data_bytes);
  void settle_pages();
  Target locate(std::uint64_t guest_addr) const;

  std::vector<MemoryRegion> regions_;
  transport::Stream& stream_;
  PageHashes& hashes_;  // shared by all channels; each writes only its own pages' entries
  unsigned channel_, channels_;
  std::uint32_t last_round_ = 0;
  std::uint64_t pages_ = 0;
  std::vector<wire::PageDescriptor> descriptors_;
  std::vector<Target> targets_;
  std::vector<iovec> iovecs_;
  BatchDecompressor decompressor_;
  std::vector<std::byte> blob_, staging_, deltas_;
  PageInstaller* installer_ = nullptr;
  std::vector<std::byte> landing_;  // with an installer: where raw pages land first
};

// Backs the pages of a PagePlan with memory on helper threads, one per channel, each in its
// channel's stream order and in chunks, so the receiving threads find them ready instead of
// faulting on each, and no one helper paces them all. They stop early when asked (round 0 is
// over: whatever is left has arrived already). Throws ProtocolError for a plan that does not
// fit the memory layout.
std::vector<std::jthread> start_preparing(MigratableVm& vm, const std::vector<MemoryRegion>& regions,
                                          wire::PagePlan plan, unsigned channels, CpuTime& cpu);

// Channels 1..n-1: a thread each, applying its batches and acknowledging its rounds. The
// sender closes them after the final round; a failure shuts channel 0 down too, so the main
// loop stops instead of waiting for frames that will not come.
class ExtraChannels {
 public:
  ~ExtraChannels() { stop(); }

  void start(std::vector<transport::Stream> streams, const std::vector<MemoryRegion>& regions, PageHashes& hashes,
             transport::Stream& main, CpuTime& cpu);
  // Stops and joins every channel thread; returns the first channel's error, if any.
  std::optional<std::string> stop();
  std::uint64_t pages() const;
  std::uint64_t bytes() const;

 private:
  std::vector<transport::Stream> streams_;
  std::vector<std::unique_ptr<PageReceiver>> receivers_;
  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::optional<std::string> error_;
};

}  // namespace mig::engine
