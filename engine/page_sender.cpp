#include "engine/page_sender.h"

#include <cstring>

#include "engine/pages.h"

namespace mig::engine {

Bitmaps empty_bitmaps(std::span<const MemoryRegion> regions) {
  Bitmaps b;
  for (const auto& r : regions) b.emplace_back(bitmap_words(r.size / kPageSize));
  return b;
}

std::uint64_t count_pages(std::span<const MemoryRegion> regions, const Bitmaps& bitmaps) {
  std::uint64_t n = 0;
  for (std::size_t r = 0; r < regions.size(); ++r) n += count_pages(bitmaps[r], regions[r].size / kPageSize);
  return n;
}

RoundCounts& RoundCounts::operator+=(const RoundCounts& o) {
  pages_sent += o.pages_sent;
  pages_zero += o.pages_zero;
  pages_skipped += o.pages_skipped;
  pages_delta += o.pages_delta;
  bytes += o.bytes;
  return *this;
}

PageSender::PageSender(std::span<const MemoryRegion> regions, transport::Stream& stream, PageHashes& hashes,
                       const PageSenderConfig& config, MigrationControl& control, unsigned channel, unsigned channels)
    : regions_(regions), stream_(stream), hashes_(hashes), control_(control), dedup_(config.dedup),
      skip_zero_(config.skip_zero_pages), dirty_log_(config.dirty_log), channel_(channel), channels_(channels) {
  if (config.compress_level > 0) compressor_.emplace(config.compress_level);
  if (config.delta_cache_pages > 0) {
    // Batches send cached pages straight from their slots: a slot must not be reused while
    // the batch that points at it is being built.
    delta_.emplace(std::max(config.delta_cache_pages, 2 * kBatchPages));
  }
  batch_bytes_.reserve(kBatchPages * kPageSize);  // never reallocates: iovecs point into it
}

void PageSender::begin(std::uint32_t round, bool guest_paused) {
  round_ = round;
  guest_paused_ = guest_paused;
  counts_ = {};
  reported_ = {};
  bytes_before_ = stream_.counters().bytes_sent;
}

RoundCounts PageSender::end() {
  flush();
  report(0);  // pages skipped after the last batch
  counts_.bytes = stream_.counters().bytes_sent - bytes_before_;
  pages_delta_total_ += counts_.pages_delta;
  return counts_;
}

RoundCounts PageSender::send_round(std::uint32_t round, Bitmaps& pending, bool guest_paused,
                                   const std::function<bool()>& stop_early) {
  begin(round, guest_paused);
  bool stopped = false;
  for (std::size_t r = 0; r < regions_.size() && !stopped; ++r) {
    auto add_run = [&](const PageRun& run) {
      for (std::uint64_t page = run.first; page < run.first + run.count && !stopped; ++page) {
        if (descriptors_.empty() && stop_early && stop_early()) {
          stopped = true;
          break;
        }
        add_page(r, page);
        claim_page(pending[r], page);
      }
    };
    // Each channel reads only its own share of the bitmap, a stretch at a time: while the
    // guest runs, a stretch's dirty log is re-armed just before its pages are read, so that a
    // write made before then leaves with its page and one made after is fetched next round.
    auto send_range = [&](std::uint64_t begin, std::uint64_t end) {
      for (std::uint64_t from = begin, to; from < end && !stopped; from = to) {
        to = std::min(end, (from / kRearmPages + 1) * kRearmPages);
        if (dirty_log_ && !guest_paused) rearm_dirty_log(r, pending[r], from, to);
        for_each_run(pending[r], from, to, add_run);
      }
    };
    for_each_channel_range(regions_[r].guest_addr / kPageSize, regions_[r].size / kPageSize, channel_, channels_, send_range);
  }
  return end();
}

// Re-arms the pages pending in [begin, end): each will be read after this, in this round or,
// stopped early, a later one (it stays pending).
void PageSender::rearm_dirty_log(std::size_t region, std::span<const std::uint64_t> pending, std::uint64_t begin,
                                 std::uint64_t end) {
  const std::uint64_t first = begin / 64 * 64;
  rearming_.clear();
  bool any = false;
  for (std::uint64_t word_first = first; word_first < end; word_first += 64) {
    rearming_.push_back(word_within(pending, word_first, begin, end));
    any = any || rearming_.back() != 0;
  }
  if (any) dirty_log_->rearm_dirty_pages(region, first, rearming_);
}

RoundCounts PageSender::send_pages(std::uint32_t round, std::size_t region, std::uint64_t first, std::uint64_t count) {
  begin(round, false);
  for (std::uint64_t page = first; page < first + count; ++page) add_page(region, page);
  return end();
}

void PageSender::add_page(std::size_t region, std::uint64_t page) {
  const std::byte* host = regions_[region].host + page * kPageSize;
  // A resent page under delta encoding goes through a snapshot: the bytes hashed, cached
  // and sent must be one and the same, or a later delta would apply to bytes the receiver
  // never had. Round 0 sends straight from guest memory and caches nothing.
  const bool through_cache = delta_ && round_ > 0;
  if (through_cache) {
    std::memcpy(snapshot_, host, kPageSize);
    host = snapshot_;
  }
  std::uint64_t hash = hash_page(host);
  bool zero = hash == zero_page_hash() && is_zero_page(host);
  bool copied = false;
  // Unchanged since its last send: if that send is certain, the receiver already holds these
  // bytes. Zero pages the receiver never got are such pages too (both tables start at the
  // zero hash).
  if (hash == hashes_.get(region, page) && (zero ? skip_zero_ : dedup_)) {
    if (hashes_.certain(region, page)) {
      ++counts_.pages_skipped;
      return;
    }
    // The last send read running guest memory after hashing it, so the receiver may hold a
    // version in between (page_hashes.h). This send must be of the bytes it hashes.
    if (!guest_paused_ && !through_cache) {
      host = copy_into_batch(host);
      hash = hash_page(host);
      zero = hash == zero_page_hash() && is_zero_page(host);
      copied = true;
    }
  }
  hashes_.set(channel_, region, page, hash, zero || guest_paused_ || through_cache || copied);
  wire::PageDescriptor d;
  d.guest_addr = regions_[region].guest_addr + page * kPageSize;
  d.encoding = zero ? wire::PageEncoding::zero : wire::PageEncoding::raw;
  d.length = zero ? 0 : static_cast<std::uint32_t>(kPageSize);
  if (zero) {
    // The receiver's copy becomes zero; so must the version a later delta starts from.
    if (through_cache)
      if (std::byte* slot = delta_->find(region, page)) std::memset(slot, 0, kPageSize);
    ++counts_.pages_zero;
  } else if (through_cache) {
    add_through_cache(region, page, host, d);
  } else if (copied) {
    pages_.push_back({const_cast<std::byte*>(host), kPageSize});
    memory_ = transport::PageMemory::scratch;
  } else if (!pages_.empty() && static_cast<const std::byte*>(pages_.back().iov_base) + pages_.back().iov_len == host) {
    pages_.back().iov_len += kPageSize;  // adjacent pages: one iovec, fewer and larger copies
  } else {
    pages_.push_back({const_cast<std::byte*>(host), kPageSize});
  }
  descriptors_.push_back(d);
  ++counts_.pages_sent;
  if (descriptors_.size() == kBatchPages) flush();
}

// Each page of a batch adds at most a page to batch_bytes_, which never outgrows what it
// reserved: the iovecs that point into it stay valid until the batch is sent.
const std::byte* PageSender::copy_into_batch(const std::byte* page) {
  const std::size_t at = batch_bytes_.size();
  batch_bytes_.insert(batch_bytes_.end(), page, page + kPageSize);
  return batch_bytes_.data() + at;
}

// `snapshot` is the page as hashed. It goes as a delta against its cached version when that
// is small enough, else whole from its cache slot; either way the slot then holds it.
void PageSender::add_through_cache(std::size_t region, std::uint64_t page, const std::byte* snapshot,
                                   wire::PageDescriptor& d) {
  std::byte* slot = delta_->find(region, page);
  const std::size_t at = batch_bytes_.size();
  if (slot && encode_delta(slot, snapshot, kPageSize / 2, batch_bytes_) > 0) {
    d.encoding = wire::PageEncoding::delta;
    d.length = static_cast<std::uint32_t>(batch_bytes_.size() - at);
    pages_.push_back({batch_bytes_.data() + at, d.length});
    ++counts_.pages_delta;
  } else {
    slot = delta_->slot_for(region, page);
    pages_.push_back({slot, kPageSize});
  }
  std::memcpy(slot, snapshot, kPageSize);
  memory_ = transport::PageMemory::scratch;
}

void PageSender::flush() {
  if (descriptors_.empty()) return;
  if (control_.cancel_requested()) throw MigrationCancelled();
  wire::BatchHeader header{round_, static_cast<std::uint32_t>(descriptors_.size()), 0, 0};
  std::span<const std::byte> compressed;
  if (compressor_ && !pages_.empty()) {
    std::size_t total = 0;
    for (const auto& part : pages_) total += part.iov_len;
    compressed = compressor_->compress(pages_, total);
  }
  if (!compressed.empty()) {
    header.flags = wire::kBatchZstd;
    header.compressed_bytes = static_cast<std::uint32_t>(compressed.size());
    pages_.assign(1, iovec{const_cast<std::byte*>(compressed.data()), compressed.size()});
    memory_ = transport::PageMemory::scratch;
  }
  head_.resize(sizeof header + descriptors_.size() * sizeof(wire::PageDescriptor));
  std::memcpy(head_.data(), &header, sizeof header);
  std::memcpy(head_.data() + sizeof header, descriptors_.data(), descriptors_.size() * sizeof(wire::PageDescriptor));
  // Pre-copy data is paced by the limit of this moment; the paused final round is not.
  stream_.set_rate_limit(guest_paused_ || unpaced_ ? 0 : control_.bandwidth_limit() / channels_);
  const std::uint64_t before = stream_.counters().bytes_sent;
  stream_.send_gathered(wire::MessageType::page_batch, head_, pages_, memory_);
  report(stream_.counters().bytes_sent - before);
  descriptors_.clear();
  pages_.clear();
  batch_bytes_.clear();
  memory_ = transport::PageMemory::guest;
}

void PageSender::report(std::uint64_t bytes) {
  control_.count_batch(bytes, counts_.pages_sent - reported_.pages_sent, counts_.pages_zero - reported_.pages_zero,
                       counts_.pages_skipped - reported_.pages_skipped, guest_paused_);
  reported_ = counts_;
}

}  // namespace mig::engine
