#include "engine/receiver.h"

#include <sys/socket.h>

#include <cstring>
#include <mutex>
#include <optional>
#include <thread>

#include "engine/compression.h"
#include "engine/delta.h"
#include "engine/page_hashes.h"
#include "engine/pages.h"

namespace mig::engine {

namespace {

using Clock = std::chrono::steady_clock;

// Applies the page batches of one channel to guest memory. Everything in a batch is checked
// before a single byte of page data is read into guest memory, including that each page
// belongs to this channel: the round-ordering invariant rests on it.
class PageReceiver {
 public:
  PageReceiver(std::vector<MemoryRegion> regions, transport::Stream& stream, PageHashes& hashes, unsigned channel,
               unsigned channels)
      : regions_(std::move(regions)), stream_(stream), hashes_(hashes), channel_(channel), channels_(channels) {}

  // Handles the frames every channel carries: page batches, and round ends (acknowledged once
  // the round's batches before them are applied). Returns false for any other frame.
  bool handle(const wire::FrameHeader& frame) {
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

  std::uint64_t pages() const { return pages_; }
  std::uint32_t rounds() const { return last_round_ + 1; }

 private:
  void apply(const wire::FrameHeader& frame) {
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

    targets_.clear();
    iovecs_.clear();
    std::uint64_t data_bytes = 0, delta_bytes = 0;
    for (const auto& d : descriptors_) {
      wire::validate(d);
      if (d.encoding == wire::PageEncoding::delta) delta_bytes += d.length;
    }
    deltas_.resize(delta_bytes);  // sized once per batch: the iovecs below point into it
    delta_bytes = 0;
    for (const auto& d : descriptors_) {
      const auto target = locate(d.guest_addr);
      targets_.push_back(target);
      data_bytes += d.length;
      if (d.encoding == wire::PageEncoding::raw) iovecs_.push_back({target.host, kPageSize});
      if (d.encoding == wire::PageEncoding::delta) {
        // A delta is applied to the page as it stands, so it lands beside it first.
        iovecs_.push_back({deltas_.data() + delta_bytes, d.length});
        delta_bytes += d.length;
      }
    }
    if (frame.length != head_bytes + (compressed ? header.compressed_bytes : data_bytes))
      throw wire::ProtocolError("page batch length " + std::to_string(frame.length) + " disagrees with its descriptors");
    if (compressed) {
      // The one place pages take a bounce copy: they arrive as a single zstd frame.
      blob_.resize(header.compressed_bytes);
      stream_.read_exact(blob_);
      staging_.resize(data_bytes);
      decompressor_.decompress(blob_, staging_);
      std::size_t offset = 0;
      for (const auto& part : iovecs_) {
        std::memcpy(part.iov_base, staging_.data() + offset, part.iov_len);
        offset += part.iov_len;
      }
    } else {
      stream_.read_scatter(iovecs_);
    }

    delta_bytes = 0;
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
    pages_ += descriptors_.size();
  }

  struct Target {
    std::size_t region;
    std::uint64_t page;
    std::byte* host;
  };

  Target locate(std::uint64_t guest_addr) const {
    for (std::size_t r = 0; r < regions_.size(); ++r) {
      const auto& region = regions_[r];
      if (guest_addr >= region.guest_addr && guest_addr - region.guest_addr < region.size) {
        const std::uint64_t offset = guest_addr - region.guest_addr;
        if (channels_ > 1 && guest_addr / kPageSize / wire::kChannelChunkPages % channels_ != channel_)
          throw wire::ProtocolError("page at guest address " + std::to_string(guest_addr) + " arrived on the wrong channel");
        return {r, offset / kPageSize, region.host + offset};
      }
    }
    throw wire::ProtocolError("page at guest address " + std::to_string(guest_addr) + " lies outside guest memory");
  }

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
};

// Backs the pages of a PagePlan with memory on a helper thread, in stream order and in
// chunks, so the receiving thread finds them ready instead of faulting on each. Stops early
// when asked (round 0 is over: whatever is left has arrived already).
std::jthread start_preparing(MigratableVm& vm, const std::vector<MemoryRegion>& regions, wire::PagePlan plan) {
  if (plan.bitmaps.size() != regions.size()) throw wire::ProtocolError("PagePlan does not match the memory layout");
  for (std::size_t r = 0; r < regions.size(); ++r)
    if (plan.bitmaps[r].size() != bitmap_words(regions[r].size / kPageSize))
      throw wire::ProtocolError("PagePlan bitmap does not match its region");
  return std::jthread([&vm, plan = std::move(plan), regions](std::stop_token stop) {
    constexpr std::uint64_t kChunkPages = 512;  // 2 MiB
    for (std::size_t r = 0; r < regions.size(); ++r) {
      for (const auto& run : runs_of(plan.bitmaps[r], regions[r].size / kPageSize)) {
        for (std::uint64_t first = run.first; first < run.first + run.count; first += kChunkPages) {
          if (stop.stop_requested()) return;
          vm.prepare_pages(r, first, std::min(kChunkPages, run.first + run.count - first));
        }
      }
    }
  });
}

// Channels 1..n-1: a thread each, applying its batches and acknowledging its rounds. The
// sender closes them after the final round; a failure shuts channel 0 down too, so the main
// loop stops instead of waiting for frames that will not come.
class ExtraChannels {
 public:
  ~ExtraChannels() { stop(); }

  void start(std::vector<transport::Stream> streams, const std::vector<MemoryRegion>& regions, PageHashes& hashes,
             transport::Stream& main) {
    streams_ = std::move(streams);
    const auto channels = static_cast<unsigned>(streams_.size() + 1);
    for (unsigned i = 0; i < streams_.size(); ++i) {
      receivers_.push_back(std::make_unique<PageReceiver>(regions, streams_[i], hashes, i + 1, channels));
      threads_.emplace_back([this, i, &main] {
        auto& stream = streams_[i];
        try {
          for (;;) {
            const auto header = stream.read_header();
            if (!receivers_[i]->handle(header))
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

  // Stops and joins every channel thread; returns the first channel's error, if any.
  std::optional<std::string> stop() {
    for (auto& s : streams_) ::shutdown(s.fd(), SHUT_RDWR);
    for (auto& t : threads_) t.join();
    threads_.clear();
    std::lock_guard lock(mutex_);
    return error_;
  }

  std::uint64_t pages() const {
    std::uint64_t n = 0;
    for (const auto& r : receivers_) n += r->pages();
    return n;
  }
  std::uint64_t bytes() const {
    std::uint64_t n = 0;
    for (const auto& s : streams_) n += s.counters().bytes_received;
    return n;
  }

 private:
  std::vector<transport::Stream> streams_;
  std::vector<std::unique_ptr<PageReceiver>> receivers_;
  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::optional<std::string> error_;
};

// Accepts the sender's extra channels, in whatever order they connect.
std::vector<transport::Stream> accept_channels(const ReceiverOptions& options, const wire::Hello& hello, unsigned channels) {
  std::vector<std::optional<transport::Stream>> slots(channels - 1);
  for (unsigned n = 1; n < channels; ++n) {
    auto stream = options.accept_channel();
    stream.set_timeout(options.peer_timeout);
    const auto h = stream.receive<wire::ChannelHello>();
    if (h.session != hello.session) throw wire::ProtocolError("a channel of another migration session connected");
    if (h.index == 0 || h.index >= channels || slots[h.index - 1]) throw wire::ProtocolError("bad or repeated channel index");
    slots[h.index - 1] = std::move(stream);
  }
  std::vector<transport::Stream> out;
  for (auto& s : slots) out.push_back(std::move(*s));
  return out;
}

std::uint64_t ns_since(Clock::time_point t) {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t).count());
}

}  // namespace

ReceiveResult receive(transport::Stream& stream, const VmFactory& make_vm, const ReceiverOptions& options) {
  ReceiveResult result;
  auto& stats = result.stats;
  const auto start = Clock::now();
  std::unique_ptr<MigratableVm> vm;
  try {
    stream.set_timeout(options.peer_timeout);
    const auto hello = stream.receive<wire::Hello>();
    VmShape shape;
    shape.vcpus = hello.vcpus;
    for (const auto& r : hello.regions) shape.regions.push_back({r.guest_addr, r.size});
    const bool shared = (hello.capabilities & wire::kCapSharedMemory) && stream.can_pass_fds();
    std::vector<UniqueFd> memory_fds;
    if (shared) {
      // The VM is built on the source's memory, which arrives only after the acknowledgement.
      stream.send(wire::HelloAck{wire::kCapSharedMemory, transport::host_boot_id()});
      const auto announced = stream.receive<wire::SharedMemory>();
      if (announced.regions != hello.regions.size())
        throw wire::ProtocolError("SharedMemory announces " + std::to_string(announced.regions) + " regions, Hello had " +
                                  std::to_string(hello.regions.size()));
      memory_fds = stream.receive_fds(announced.regions);
      for (const auto& fd : memory_fds) shape.shared_memory_fds.push_back(fd.get());
    }
    vm = make_vm(shape);
    const auto regions = vm->memory_regions();
    if (regions.size() != hello.regions.size()) throw std::runtime_error("the VM built here does not have the sender's memory layout");
    for (std::size_t i = 0; i < regions.size(); ++i) {
      if (regions[i].guest_addr != hello.regions[i].guest_addr || regions[i].size != hello.regions[i].size)
        throw std::runtime_error("the VM built here does not have the sender's memory layout");
      stats.guest_bytes += regions[i].size;
    }
    const unsigned channels = !shared && options.accept_channel ? hello.channels : 1;
    if (!shared) stream.send(wire::HelloAck{hello.capabilities & wire::kCapVerify, transport::host_boot_id(), channels});
    stats.shared_memory = shared;
    stats.channels = channels;

    PageHashes hashes(regions, channels);
    PageReceiver pages(regions, stream, hashes, 0, channels);
    ExtraChannels extra;  // after `vm` and `hashes`: its threads stop before they go
    if (channels > 1) extra.start(accept_channels(options, hello, channels), regions, hashes, stream);
    std::jthread preparing;  // declared after `vm`: stopped and joined before the VM can go
    std::vector<StateSection> sections;
    wire::Complete complete;
    try {
      for (bool done = false; !done;) {
        const auto header = stream.read_header();
        // Round 0 is over at the first round end (or at Complete, offline): whatever pages the
        // plan still lists have arrived already.
        if (header.type == static_cast<std::uint16_t>(wire::MessageType::round_end) ||
            header.type == static_cast<std::uint16_t>(wire::MessageType::complete))
          preparing.request_stop();
        if (pages.handle(header)) continue;
        switch (static_cast<wire::MessageType>(header.type)) {
          case wire::MessageType::page_plan:
            preparing = start_preparing(*vm, regions, wire::decode<wire::PagePlan>(stream.read_payload(header)));
            break;
          case wire::MessageType::state_section: {
            auto s = wire::decode<wire::StateSection>(stream.read_payload(header));
            sections.push_back({std::move(s.name), s.version, std::move(s.data)});
            break;
          }
          case wire::MessageType::complete:
            complete = wire::decode<wire::Complete>(stream.read_payload(header));
            done = true;
            break;
          default:
            throw wire::ProtocolError(std::string("unexpected ") + wire::to_string(static_cast<wire::MessageType>(header.type)) +
                                      " during the page stream");
        }
      }
    } catch (const std::exception&) {
      // A channel's own error says more than the shutdown of channel 0 it caused.
      if (auto error = extra.stop()) throw std::runtime_error(*error);
      throw;
    }
    // The sender sends Complete only after every channel acknowledged the final round.
    if (auto error = extra.stop()) throw std::runtime_error(*error);
    if (hello.capabilities & wire::kCapVerify) {
      if (hashes.digest() != complete.page_digest)
        throw std::runtime_error("verification failed: destination memory differs from the source's");
      stats.verified = true;
    }
    const auto restore_start = Clock::now();
    vm->restore_state(sections);
    const std::uint64_t restore_ns = ns_since(restore_start);
    stream.send(wire::Ready{restore_ns});
    stream.receive<wire::Commit>();

    const auto resume_start = Clock::now();
    vm->resume();
    const auto resumed_at = Clock::now();
    stream.send(wire::Running{std::chrono::duration_cast<std::chrono::nanoseconds>(resumed_at.time_since_epoch()).count(),
                              ns_since(resume_start)});
    stats.status = "completed";
    stats.downtime.restore_ms = static_cast<double>(restore_ns) / 1e6;
    stats.downtime.resume_ms = std::chrono::duration<double, std::milli>(resumed_at - resume_start).count();
    stats.pages_sent = pages.pages() + extra.pages();
    stats.extra_channel_bytes = extra.bytes();
    stats.rounds = pages.rounds();
    stats.total_ms = std::chrono::duration<double, std::milli>(resumed_at - start).count();
    stats.guest = vm->wait_guest_handover(options.handover_wait);
    if (stats.guest) {
      try {
        stream.send(wire::Handover{static_cast<std::int64_t>(stats.guest->gap_ms * 1e6), stats.guest->sequence_continued,
                                   stats.guest->last_source_seq, stats.guest->first_destination_seq});
      } catch (const std::exception&) {
        // The source may already be gone; the guest runs here regardless.
      }
    }
    result.vm = std::move(vm);
  } catch (const std::exception& e) {
    stats.status = "failed";
    stats.error = e.what();
    if (!dynamic_cast<const transport::RemoteError*>(&e)) {
      try {
        stream.set_timeout(std::chrono::milliseconds(200));
        stream.send(wire::Error{e.what()});
      } catch (...) {
      }
    }
  }
  stats.bytes_sent = stream.counters().bytes_received;
  return result;
}

}  // namespace mig::engine
