#include "engine/page_receiver.h"

#include <sys/socket.h>

#include <cstring>

#include "common/thread_name.h"
#include "engine/delta.h"
#include "engine/pages.h"

namespace mig::engine {

PageReceiver::PageReceiver(std::vector<MemoryRegion> regions, transport::Stream& stream, PageHashes& hashes,
                           unsigned channel, unsigned channels)
    : regions_(std::move(regions)), stream_(stream), hashes_(hashes), channel_(channel), channels_(channels) {}

bool PageReceiver::handle(const wire::FrameHeader& frame) {
  if (frame.type == static_cast<std::uint16_t>(wire::MessageType::page_batch)) {
    apply(frame);
    return true;
  }
  if (frame.type == static_cast<std::uint16_t>(wire::MessageType::round_end)) {
    stream_.send(wire::RoundAck{wire::decode<wire::RoundEnd>(stream_.read_payload(frame)).round});
    return true;
  }
  return false;
}

void PageReceiver::apply(const wire::FrameHeader& frame) {
  wire::BatchHeader header;
  if (frame.length < sizeof header) throw wire::ProtocolError("page batch shorter than its header");
  stream_.read_exact(std::as_writable_bytes(std::span(&header, 1)));
  if (header.count == 0 || header.count > wire::kMaxBatchPages)
    throw wire::ProtocolError("page batch claims " + std::to_string(header.count) + " pages");
  if (header.flags & ~wire::kBatchZstd) throw wire::ProtocolError("page batch has unknown flags");
  const bool compressed = header.flags & wire::kBatchZstd;
  // The ordering invariant (protocol.h): a round's pages never arrive after a later round's.
  if (header.round < last_round_)
    throw wire::ProtocolError("page batch of round " + std::to_string(header.round) + " after round " +
                              std::to_string(last_round_));
  last_round_ = header.round;
  const std::uint64_t head_bytes = sizeof header + std::uint64_t{header.count} * sizeof(wire::PageDescriptor);
  if (frame.length < head_bytes) throw wire::ProtocolError("page batch shorter than its descriptors");
  descriptors_.resize(header.count);
  stream_.read_exact(std::as_writable_bytes(std::span(descriptors_)));
  const std::uint64_t data_bytes = locate_all();
  if (frame.length != head_bytes + (compressed ? header.compressed_bytes : data_bytes))
    throw wire::ProtocolError("page batch length " + std::to_string(frame.length) + " disagrees with its descriptors");
  if (compressed)
    read_compressed(header.compressed_bytes, data_bytes);
  else
    stream_.read_scatter(iovecs_);
  settle_pages();
  pages_ += descriptors_.size();
}

std::uint64_t PageReceiver::locate_all() {
  targets_.clear();
  iovecs_.clear();
  std::uint64_t data_bytes = 0, delta_bytes = 0;
  for (const auto& d : descriptors_) {
    wire::validate(d);
    if (d.encoding == wire::PageEncoding::delta) delta_bytes += d.length;
  }
  if (installer_ && delta_bytes) throw wire::ProtocolError("a delta-encoded page after the post-copy switchover");
  deltas_.resize(delta_bytes);  // sized once per batch: the iovecs below point into it
  delta_bytes = 0;
  if (installer_) landing_.resize(descriptors_.size() * kPageSize);
  for (const auto& d : descriptors_) {
    auto target = locate(d.guest_addr);
    if (installer_) target.host = landing_.data() + targets_.size() * kPageSize;
    targets_.push_back(target);
    data_bytes += d.length;
    if (d.encoding == wire::PageEncoding::raw) iovecs_.push_back({target.host, kPageSize});
    if (d.encoding == wire::PageEncoding::delta) {
      // A delta is applied to the page as it stands, so it lands beside it first.
      iovecs_.push_back({deltas_.data() + delta_bytes, d.length});
      delta_bytes += d.length;
    }
  }
  return data_bytes;
}

// The one place pages take a bounce copy: they arrive as a single zstd frame.
void PageReceiver::read_compressed(std::uint32_t compressed_bytes, std::uint64_t data_bytes) {
  blob_.resize(compressed_bytes);
  stream_.read_exact(blob_);
  staging_.resize(data_bytes);
  decompressor_.decompress(blob_, staging_);
  std::size_t offset = 0;
  for (const auto& part : iovecs_) {
    std::memcpy(part.iov_base, staging_.data() + offset, part.iov_len);
    offset += part.iov_len;
  }
}

// The pages have their bytes: record their hashes, apply deltas and zero pages - or, past the
// post-copy switchover, hand each to the installer.
void PageReceiver::settle_pages() {
  if (installer_) {
    for (std::size_t i = 0; i < descriptors_.size(); ++i) {
      const bool raw = descriptors_[i].encoding == wire::PageEncoding::raw;
      installer_->install(channel_, targets_[i].region, targets_[i].page, raw ? targets_[i].host : nullptr);
    }
    return;
  }
  std::uint64_t delta_bytes = 0;
  for (std::size_t i = 0; i < descriptors_.size(); ++i) {
    const auto& t = targets_[i];
    if (descriptors_[i].encoding == wire::PageEncoding::delta) {
      apply_delta(t.host, std::span(deltas_).subspan(delta_bytes, descriptors_[i].length));
      delta_bytes += descriptors_[i].length;
      hashes_.set(channel_, t.region, t.page, hash_page(t.host));
    } else if (descriptors_[i].encoding == wire::PageEncoding::raw) {
      hashes_.set(channel_, t.region, t.page, hash_page(t.host));
    } else if (hashes_.get(t.region, t.page) != zero_page_hash()) {
      // Non-zero here before and zero now. A page that never held data is left alone:
      // writing it would only fault in memory that already reads as zero.
      std::memset(t.host, 0, kPageSize);
      hashes_.set(channel_, t.region, t.page, zero_page_hash());
    }
  }
}

PageReceiver::Target PageReceiver::locate(std::uint64_t guest_addr) const {
  const auto at = find_page(regions_, guest_addr);
  if (!at) throw wire::ProtocolError("page at guest address " + std::to_string(guest_addr) + " lies outside guest memory");
  if (channels_ > 1 && wire::channel_of(guest_addr / kPageSize, channels_) != channel_)
    throw wire::ProtocolError("page at guest address " + std::to_string(guest_addr) + " arrived on the wrong channel");
  return {at->region, at->page, regions_[at->region].host + at->page * kPageSize};
}

std::vector<std::jthread> start_preparing(MigratableVm& vm, const std::vector<MemoryRegion>& regions,
                                          wire::PagePlan plan, unsigned channels, CpuTime& cpu) {
  if (plan.bitmaps.size() != regions.size()) throw wire::ProtocolError("PagePlan does not match the memory layout");
  for (std::size_t r = 0; r < regions.size(); ++r)
    if (plan.bitmaps[r].size() != bitmap_words(regions[r].size / kPageSize))
      throw wire::ProtocolError("PagePlan bitmap does not match its region");
  auto shared_plan = std::make_shared<const wire::PagePlan>(std::move(plan));
  std::vector<std::jthread> helpers;
  for (unsigned channel = 0; channel < channels; ++channel) {
    helpers.emplace_back([&vm, plan = shared_plan, regions, channel, channels, &cpu](std::stop_token stop) {
      name_this_thread("mig-prep-ch" + std::to_string(channel));
      CpuTime::Scope counted(cpu);
      constexpr std::uint64_t kChunkPages = 512;  // 2 MiB
      // Once stopped, what is left of the walk goes by without reading the plan or preparing.
      auto prepare = [&](std::size_t r, const PageRun& run) {
        for (std::uint64_t first = run.first; first < run.first + run.count && !stop.stop_requested(); first += kChunkPages)
          vm.prepare_pages(r, first, std::min(kChunkPages, run.first + run.count - first));
      };
      try {
        for (std::size_t r = 0; r < regions.size(); ++r)
          for_each_channel_range(regions[r].guest_addr / kPageSize, regions[r].size / kPageSize, channel, channels,
                                 [&](std::uint64_t begin, std::uint64_t end) {
                                   if (stop.stop_requested()) return;
                                   for_each_run(plan->bitmaps[r], begin, end, [&](const PageRun& run) { prepare(r, run); });
                                 });
      } catch (const std::exception&) {
        // Preparing is only a head start: the receiving thread faults the pages in itself, and
        // meets whatever went wrong with this memory there, where it can be reported.
      }
    });
  }
  return helpers;
}

void ExtraChannels::start(std::vector<transport::Stream> streams, const std::vector<MemoryRegion>& regions,
                          PageHashes& hashes, transport::Stream& main, CpuTime& cpu) {
  streams_ = std::move(streams);
  const auto channels = static_cast<unsigned>(streams_.size() + 1);
  // Every receiver before any thread: a thread reading receivers_ while a later push_back
  // moved its elements would read freed memory.
  for (unsigned i = 0; i < streams_.size(); ++i)
    receivers_.push_back(std::make_unique<PageReceiver>(regions, streams_[i], hashes, i + 1, channels));
  for (unsigned i = 0; i < streams_.size(); ++i) {
    threads_.emplace_back([this, i, &main, &cpu, &receiver = *receivers_[i], &stream = streams_[i]] {
      name_this_thread("mig-recv-ch" + std::to_string(i + 1));
      CpuTime::Scope counted(cpu);
      try {
        for (;;) {
          const auto header = stream.read_header();
          if (!receiver.handle(header))
            throw wire::ProtocolError(std::string("unexpected ") + wire::to_string(static_cast<wire::MessageType>(header.type)) +
                                      " on a page channel");
        }
      } catch (const transport::PeerError&) {
        // Closed: the sender is done with this channel (or gone, which channel 0 notices).
      } catch (const std::exception& e) {
        std::lock_guard lock(mutex_);
        if (!error_) error_ = std::string("channel ") + std::to_string(i + 1) + ": " + e.what();
        ::shutdown(main.fd(), SHUT_RDWR);
      }
    });
  }
}

std::optional<std::string> ExtraChannels::stop() {
  for (auto& s : streams_) ::shutdown(s.fd(), SHUT_RDWR);
  for (auto& t : threads_) t.join();
  threads_.clear();
  std::lock_guard lock(mutex_);
  return error_;
}

std::uint64_t ExtraChannels::pages() const {
  std::uint64_t n = 0;
  for (const auto& r : receivers_) n += r->pages();
  return n;
}

std::uint64_t ExtraChannels::bytes() const {
  std::uint64_t n = 0;
  for (const auto& s : streams_) n += s.counters().bytes_received;
  return n;
}

}  // namespace mig::engine
