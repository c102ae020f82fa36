#include "engine/sender.h"

#include <algorithm>
#include <future>
#include <optional>
#include <random>

#include "engine/compression.h"
#include "engine/delta.h"
#include "engine/page_hashes.h"
#include "engine/pages.h"

namespace mig::engine {

namespace {

using Clock = std::chrono::steady_clock;  // CLOCK_MONOTONIC on Linux, like the receiver's

double ms_between(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double, std::milli>(b - a).count(); }
std::int64_t monotonic_ns(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
}

using Bitmaps = std::vector<std::vector<std::uint64_t>>;

struct RoundCounts {
  std::uint64_t pages_sent = 0, pages_skipped = 0, pages_delta = 0, bytes = 0;
  RoundCounts& operator+=(const RoundCounts& o) {
    pages_sent += o.pages_sent;
    pages_skipped += o.pages_skipped;
    pages_delta += o.pages_delta;
    bytes += o.bytes;
    return *this;
  }
};

// Turns the pages set in a bitmap into page-batch frames, gathered straight from guest
// memory. Hashes each page as it goes, which both feeds verification and finds the pages
// not worth sending.
class PageSender {
 public:
  static constexpr std::size_t kBatchPages = 256;

  // Channel `channel` of `channels`: it handles only the pages that travel on it.
  PageSender(std::span<const MemoryRegion> regions, transport::Stream& stream, PageHashes& hashes,
             const SenderOptions& options, unsigned channel, unsigned channels)
      : regions_(regions), stream_(stream), hashes_(hashes), dedup_(options.dedup),
        skip_zero_(options.skip_zero_pages), channel_(channel), channels_(channels) {
    if (options.compress_level > 0) compressor_.emplace(options.compress_level);
    if (options.delta_cache_pages > 0) {
      // Batches send cached pages straight from their slots: a slot must not be reused while
      // the batch that points at it is being built.
      delta_.emplace(std::max(options.delta_cache_pages, 2 * kBatchPages));
      delta_bytes_.reserve(kBatchPages * kPageSize);  // never reallocates: iovecs point into it
    }
  }

  std::uint64_t batches_compressed() const { return compressor_ ? compressor_->batches_compressed() : 0; }
  std::uint64_t pages_delta() const { return pages_delta_total_; }

  // Sends this channel's pages among those set in `pending`, which it only reads: other
  // channels read it at the same time.
  RoundCounts send_round(std::uint32_t round, const Bitmaps& pending) {
    round_ = round;
    counts_ = {};
    const std::uint64_t before = stream_.counters().bytes_sent;
    for (std::size_t r = 0; r < regions_.size(); ++r) {
      const std::uint64_t region_first = regions_[r].guest_addr / kPageSize;
      for (const auto& run : runs_of(pending[r], regions_[r].size / kPageSize))
        for (std::uint64_t page = run.first; page < run.first + run.count; ++page)
          if (channels_ == 1 || (region_first + page) / wire::kChannelChunkPages % channels_ == channel_) add_page(r, page);
    }
    flush();
    counts_.bytes = stream_.counters().bytes_sent - before;
    pages_delta_total_ += counts_.pages_delta;
    return counts_;
  }

 private:
  void add_page(std::size_t region, std::uint64_t page) {
    const std::byte* host = regions_[region].host + page * kPageSize;
    // A resent page under delta encoding goes through a snapshot: the bytes hashed, cached
    // and sent must be one and the same, or a later delta would apply to bytes the receiver
    // never had. Round 0 sends straight from guest memory and caches nothing.
    const bool through_cache = delta_ && round_ > 0;
    if (through_cache) {
      std::memcpy(snapshot_, host, kPageSize);
      host = snapshot_;
    }
    const std::uint64_t hash = hash_page(host);
    const std::uint64_t last_sent = hashes_.get(region, page);
    const bool zero = hash == zero_page_hash() && is_zero_page(host);
    // Unchanged since its last send: the receiver already holds these bytes. Zero pages the
    // receiver never got are such pages too (both tables start at the zero hash).
    if (hash == last_sent && (zero ? skip_zero_ : dedup_)) {
      ++counts_.pages_skipped;
      return;
    }
    hashes_.set(channel_, region, page, hash);
    wire::PageDescriptor d;
    d.guest_addr = regions_[region].guest_addr + page * kPageSize;
    d.encoding = zero ? wire::PageEncoding::zero : wire::PageEncoding::raw;
    d.length = zero ? 0 : static_cast<std::uint32_t>(kPageSize);
    if (zero) {
      // The receiver's copy becomes zero; so must the version a later delta starts from.
      if (through_cache)
        if (std::byte* slot = delta_->find(region, page)) std::memset(slot, 0, kPageSize);
    } else if (through_cache) {
      add_through_cache(region, page, host, d);
    } else if (!pages_.empty() && static_cast<const std::byte*>(pages_.back().iov_base) + pages_.back().iov_len == host) {
      pages_.back().iov_len += kPageSize;  // adjacent pages: one iovec, fewer and larger copies
    } else {
      pages_.push_back({const_cast<std::byte*>(host), kPageSize});
    }
    descriptors_.push_back(d);
    ++counts_.pages_sent;
    if (descriptors_.size() == kBatchPages) flush();
  }

  // `snapshot` is the page as hashed. It goes as a delta against its cached version when that
  // is small enough, else whole from its cache slot; either way the slot then holds it.
  void add_through_cache(std::size_t region, std::uint64_t page, const std::byte* snapshot, wire::PageDescriptor& d) {
    std::byte* slot = delta_->find(region, page);
    const std::size_t at = delta_bytes_.size();
    if (slot && encode_delta(slot, snapshot, kPageSize / 2, delta_bytes_) > 0) {
      d.encoding = wire::PageEncoding::delta;
      d.length = static_cast<std::uint32_t>(delta_bytes_.size() - at);
      pages_.push_back({delta_bytes_.data() + at, d.length});
      ++counts_.pages_delta;
    } else {
      slot = delta_->slot_for(region, page);
      pages_.push_back({slot, kPageSize});
    }
    std::memcpy(slot, snapshot, kPageSize);
    memory_ = transport::PageMemory::scratch;
  }

  void flush() {
    if (descriptors_.empty()) return;
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
    stream_.send_gathered(wire::MessageType::page_batch, head_, pages_, memory_);
    descriptors_.clear();
    pages_.clear();
    delta_bytes_.clear();
    memory_ = transport::PageMemory::guest;
  }

  std::span<const MemoryRegion> regions_;
  transport::Stream& stream_;
  PageHashes& hashes_;  // shared by all channels; each writes only its own pages' entries
  bool dedup_, skip_zero_;
  unsigned channel_, channels_;
  std::uint32_t round_ = 0;
  RoundCounts counts_;
  std::uint64_t pages_delta_total_ = 0;
  std::optional<BatchCompressor> compressor_;
  std::optional<DeltaCache> delta_;
  std::vector<std::byte> delta_bytes_;
  alignas(64) std::byte snapshot_[kPageSize];
  std::vector<wire::PageDescriptor> descriptors_;
  std::vector<iovec> pages_;
  transport::PageMemory memory_ = transport::PageMemory::guest;  // where this batch's pages_ point
  std::vector<std::byte> head_;
};

Bitmaps empty_bitmaps(std::span<const MemoryRegion> regions) {
  Bitmaps b;
  for (const auto& r : regions) b.emplace_back(bitmap_words(r.size / kPageSize));
  return b;
}

// ORs the pages dirtied since the last fetch into `pending`; returns how many are pending.
std::uint64_t fetch_dirty(MigratableVm& vm, std::span<const MemoryRegion> regions, Bitmaps& scratch, Bitmaps& pending) {
  std::uint64_t total = 0;
  for (std::size_t r = 0; r < regions.size(); ++r) {
    vm.fetch_dirty_log(r, scratch[r]);
    for (std::size_t w = 0; w < pending[r].size(); ++w) pending[r][w] |= scratch[r][w];
    total += count_pages(pending[r], regions[r].size / kPageSize);
  }
  return total;
}

// A send failed: the receiver may have said why before closing. Prefer its words.
std::string explain_failure(transport::Stream& stream, const std::exception& e) {
  if (!dynamic_cast<const transport::PeerError*>(&e)) return e.what();
  try {
    stream.set_timeout(std::chrono::milliseconds(200));
    stream.read_header();
  } catch (const transport::RemoteError& remote) {
    return remote.what();
  } catch (...) {
  }
  return e.what();
}

}  // namespace

MigrationStats migrate(MigratableVm& vm, transport::Stream& stream, const SenderOptions& options) {
  MigrationStats stats;
  stats.offline = options.offline;
  const auto start = Clock::now();
  const auto regions = vm.memory_regions();
  for (const auto& r : regions) stats.guest_bytes += r.size;
  bool paused = false, logging = false, committed = false;
  unsigned throttle_pct = 0;  // auto-converge: the part of the time the vCPUs are held
  ConvergencePolicy policy = options.policy;  // auto-converge turns itself off where the VM cannot throttle
  try {
    stream.set_timeout(options.peer_timeout);
    wire::Hello hello;
    const auto memory_fds = vm.shareable_memory_fds();
    const bool offer_sharing = options.share_memory && !memory_fds.empty() && stream.can_pass_fds();
    // Shared memory needs no verification: there is only one copy.
    hello.capabilities = offer_sharing ? wire::kCapSharedMemory : options.verify ? wire::kCapVerify : 0;
    hello.vcpus = vm.vcpu_count();
    hello.host_boot_id = transport::host_boot_id();
    hello.channels = std::clamp(options.channels, 1u, wire::kMaxChannels);
    if (hello.channels > 1 && !options.open_channel) throw std::invalid_argument("parallel channels need a way to open them");
    hello.session = std::random_device{}() | (std::uint64_t{std::random_device{}()} << 32);
    for (const auto& r : regions) hello.regions.push_back({r.guest_addr, r.size});
    stream.send(hello);
    const auto ack = stream.receive<wire::HelloAck>();
    const bool verify = options.verify && (ack.capabilities & wire::kCapVerify);
    const bool same_host = !hello.host_boot_id.empty() && ack.host_boot_id == hello.host_boot_id;
    const bool shared = offer_sharing && (ack.capabilities & wire::kCapSharedMemory);
    if (shared) {
      stream.send(wire::SharedMemory{static_cast<std::uint32_t>(memory_fds.size())});
      stream.send_fds(memory_fds);
      // The hand-over is round 0. Its acknowledgement says the destination VM is built on
      // this memory, so building it stays out of the downtime.
      stream.send(wire::RoundEnd{0});
      stream.receive<wire::RoundAck>();
    }

    // Extra channels, and a page sender per channel.
    const unsigned channels = shared ? 1 : ack.channels;
    if (channels < 1 || channels > hello.channels) throw wire::ProtocolError("receiver accepted an impossible channel count");
    std::vector<transport::Stream> extra;
    std::vector<transport::Stream*> streams{&stream};
    for (unsigned i = 1; i < channels; ++i) {
      extra.push_back(options.open_channel());
      extra.back().set_timeout(options.peer_timeout);
      extra.back().send(wire::ChannelHello{hello.session, i});
    }
    for (auto& s : extra) streams.push_back(&s);
    PageHashes hashes(regions, channels);
    std::vector<std::unique_ptr<PageSender>> senders;
    for (unsigned i = 0; i < channels; ++i)
      senders.push_back(std::make_unique<PageSender>(regions, *streams[i], hashes, options, i, channels));
    Bitmaps pending = empty_bitmaps(regions), scratch = empty_bitmaps(regions);
    // Sends round `r` of `pending` on every channel at once, each ending it with RoundEnd and
    // waiting for its RoundAck when `acknowledged`; then clears `pending`.
    auto send_round = [&](std::uint32_t r, bool acknowledged) {
      auto one = [&](std::size_t i) {
        auto counts = senders[i]->send_round(r, pending);
        if (acknowledged) {
          streams[i]->send(wire::RoundEnd{r});
          if (streams[i]->receive<wire::RoundAck>().round != r) throw wire::ProtocolError("RoundAck for the wrong round");
        }
        return counts;
      };
      RoundCounts total;
      if (channels == 1) {
        total = one(0);
      } else {
        std::vector<std::future<RoundCounts>> running;
        for (std::size_t i = 0; i < channels; ++i) running.push_back(std::async(std::launch::async, one, i));
        std::exception_ptr failure;
        for (auto& f : running) {
          try {
            total += f.get();
          } catch (...) {
            if (!failure) failure = std::current_exception();
          }
        }
        if (failure) std::rethrow_exception(failure);
      }
      for (auto& bitmap : pending) std::fill(bitmap.begin(), bitmap.end(), 0);
      return total;
    };
    std::uint32_t round = 0;
    Clock::time_point pause_start = start, paused_at = start;

    if (options.offline || shared) {
      pause_start = Clock::now();
      vm.pause();
      paused = true;
      paused_at = Clock::now();
      stats.stop_reason = shared ? "shared-memory" : "offline";
    } else {
      // Tracking starts before round 0 reads anything, so every later write is caught.
      vm.start_dirty_log();
      logging = true;
    }
    // Round 0: every page that may be non-zero; untouched pages are known zero for free.
    // Shared memory leaves it empty: the destination already maps this very memory.
    if (!shared) {
      for (std::size_t r = 0; r < regions.size(); ++r) {
        if (options.skip_zero_pages)
          vm.populated_pages(r, pending[r]);
        else
          std::fill(pending[r].begin(), pending[r].end(), ~std::uint64_t{0});  // bits past the end are ignored
      }
      if (options.page_plan) stream.send(wire::PagePlan{pending});
    }

    if (!options.offline && !shared) {
      for (auto* s : streams) s->set_rate_limit(options.bandwidth_limit / channels);
      for (;; ++round) {
        const auto round_start = Clock::now();
        const auto counts = send_round(round, true);
        const std::uint64_t dirty = fetch_dirty(vm, regions, scratch, pending);
        RoundStats rs;
        rs.round = round;
        rs.pages_sent = counts.pages_sent;
        rs.pages_skipped = counts.pages_skipped;
        rs.bytes_sent = counts.bytes;
        rs.duration_s = std::chrono::duration<double>(Clock::now() - round_start).count();
        rs.dirty_pages = dirty;
        rs.dirty_rate_Bps = static_cast<double>(dirty * kPageSize) / std::max(rs.duration_s, 1e-9);
        rs.bandwidth_Bps = static_cast<double>(counts.bytes) / std::max(rs.duration_s, 1e-9);
        rs.throttle_pct = throttle_pct;
        stats.round_table.push_back(rs);
        stats.round_table.back().expected_downtime_ms = expected_downtime_ms(stats.round_table, policy);
        if (options.on_round) options.on_round(stats.round_table.back(), stats.guest_bytes);
        const Decision decision = decide(stats.round_table, policy);
        if (decision == Decision::next_round) {
          const unsigned wanted = next_throttle_pct(stats.round_table, policy);
          if (wanted != throttle_pct) {
            if (vm.set_throttle(wanted / 100.0)) {
              throttle_pct = wanted;
            } else {
              policy.auto_converge = false;  // stuck rounds now count as no progress at once
            }
          }
          continue;
        }
        stats.stop_reason = to_string(decision);
        if (decision == Decision::abort_no_progress)
          throw std::runtime_error("pre-copy made no progress for " + std::to_string(policy.no_progress_rounds) +
                                   " rounds (dirty rate at or above bandwidth); aborted as --on-no-convergence=abort asks");
        ++round;
        break;
      }
      for (auto* s : streams) s->set_rate_limit(0);
      pause_start = Clock::now();
      vm.pause();
      paused = true;
      paused_at = Clock::now();
      fetch_dirty(vm, regions, scratch, pending);
    }
    const auto synced = Clock::now();
    // With one channel, Complete right behind the pages is the end of the round. With
    // several, each must have acknowledged its share before state and Complete go out on
    // channel 0; the extra channels are then done and closed.
    const auto final_counts = send_round(round, channels > 1);
    std::uint64_t extra_bytes = 0;
    for (const auto& s : extra) extra_bytes += s.counters().bytes_sent;
    extra.clear();
    streams.resize(1);
    const auto pages_done = Clock::now();
    for (const auto& section : vm.save_state()) stream.send(wire::StateSection{section.name, section.version, section.data});
    const auto state_done = Clock::now();
    std::uint64_t pages_sent = final_counts.pages_sent, pages_skipped = final_counts.pages_skipped;
    for (const auto& r : stats.round_table) {
      pages_sent += r.pages_sent;
      pages_skipped += r.pages_skipped;
    }
    for (const auto& s : senders) {
      stats.pages_delta += s->pages_delta();
      stats.batches_compressed += s->batches_compressed();
    }
    stats.channels = channels;
    stats.extra_channel_bytes = extra_bytes;
    stream.send(wire::Complete{verify ? hashes.digest() : 0, pages_sent});
    const auto ready = stream.receive<wire::Ready>();
    const auto ready_at = Clock::now();
    // From here on the destination may run the guest: the source must never run it again.
    committed = true;
    stream.send(wire::Commit{});
    const auto running = stream.receive<wire::Running>();
    const auto running_at = Clock::now();
    // Off the downtime path: a memslot update costs milliseconds and the paused source no
    // longer needs the log.
    vm.stop_dirty_log();
    logging = false;

    stats.status = "completed";
    stats.rounds = round + 1;
    stats.pages_sent = pages_sent;
    stats.pages_skipped = pages_skipped;
    stats.verified = verify;
    stats.shared_memory = shared;

    stats.total_ms = ms_between(start, running_at);
    auto& d = stats.downtime;
    d.pause_ms = ms_between(pause_start, paused_at);
    d.final_sync_ms = ms_between(paused_at, synced);
    d.final_pages_ms = ms_between(synced, pages_done);
    d.state_ms = ms_between(pages_done, state_done);
    d.verify_restore_ms = ms_between(state_done, ready_at);
    d.restore_ms = static_cast<double>(ready.restore_ns) / 1e6;
    d.commit_resume_ms = ms_between(ready_at, running_at);
    d.resume_ms = static_cast<double>(running.resume_ns) / 1e6;
    if (same_host) {
      stats.downtime_clock = "shared";
      stats.downtime_ms = static_cast<double>(running.resumed_at_ns - monotonic_ns(pause_start)) / 1e6;
    } else {
      stats.downtime_clock = "round-trip";
      stats.downtime_ms = ms_between(pause_start, running_at);
    }
    try {
      stream.set_timeout(options.handover_wait);
      const auto handover = stream.receive<wire::Handover>();
      stats.guest = GuestHandover{static_cast<double>(handover.gap_ns) / 1e6, handover.sequence_continued != 0,
                                  handover.last_source_seq, handover.first_destination_seq};
    } catch (const std::exception&) {
      // The guest has no heartbeat, or it was slow to show one: the migration still stands.
    }
  } catch (const std::exception& e) {
    stats.error = explain_failure(stream, e);
    if (committed) {
      stats.status = "handoff-unknown";
    } else {
      stats.status = "failed";
      try {
        stream.set_timeout(std::chrono::milliseconds(200));
        stream.send(wire::Error{"source aborted the migration: " + stats.error});
      } catch (...) {
      }
      // Never lose the guest: everything before the handoff is undone here.
      if (throttle_pct > 0 && !paused) vm.set_throttle(0);
      if (logging) vm.stop_dirty_log();
      if (paused) vm.resume();
    }
  }
  if (stats.total_ms == 0) stats.total_ms = ms_between(start, Clock::now());
  const auto& c = stream.counters();
  stats.bytes_sent = c.bytes_sent + stats.extra_channel_bytes;
  stats.zerocopy = stream.zerocopy();
  stats.zerocopy_sends = c.zerocopy_sends;
  stats.zerocopy_copied = c.zerocopy_copied;
  stats.throughput_MBps = static_cast<double>(stats.bytes_sent) / 1e3 / std::max(stats.total_ms, 1e-9);
  return stats;
}

}  // namespace mig::engine
