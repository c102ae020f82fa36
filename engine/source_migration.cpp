#include "engine/source_migration.h"

#include <algorithm>
#include <future>
#include <optional>
#include <random>
#include <string_view>

#include "common/thread_name.h"
#include "engine/cpu_time.h"
#include "engine/disk_migration.h"
#include "engine/page_hashes.h"
#include "engine/page_sender.h"
#include "engine/pages.h"
#include "engine/postcopy_source.h"

namespace mig::engine {

namespace {

using Clock = std::chrono::steady_clock;  // CLOCK_MONOTONIC on Linux, like the receiver's

double ms_between(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double, std::milli>(b - a).count(); }
std::int64_t monotonic_ns(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
}

// Undoes what a migration set on the source VM - throttling, dirty logging, the pause - in a
// destructor that cannot throw. After the commit the guest may already run at the
// destination, so the pause is never undone then.
class SourceRollback {
 public:
  SourceRollback(MigratableVm& vm, DiskSender& disks, const MigrationObserver& observer)
      : vm_(vm), disks_(disks), observer_(observer) {}
  ~SourceRollback() { undo(); }
  SourceRollback(const SourceRollback&) = delete;
  SourceRollback& operator=(const SourceRollback&) = delete;

  void logging_started() { logging_ = true; }
  void throttled(bool on) { throttled_ = on; }
  void dirty_limited(bool on) { dirty_limited_ = on; }
  void paused() {
    paused_ = true;
    throttled_ = false;  // pause() ends throttling
  }
  void committed() { committed_ = true; }
  bool is_paused() const { return paused_; }
  bool is_committed() const { return committed_; }

  // Stops dirty logging now, off the downtime path; a failure here changes nothing about the
  // migration's outcome (a memslot update that fails leaves only a slower paused VM).
  void stop_logging() noexcept {
    disks_.stop_tracking();
    if (!logging_) return;
    logging_ = false;
    try {
      vm_.stop_dirty_log();
    } catch (...) {
    }
  }

  void undo() noexcept {
    stop_logging();
    if (committed_) return;
    try {
      if (throttled_) vm_.set_throttle(0);
      if (dirty_limited_) vm_.set_vcpu_dirty_limit(0);
      throttled_ = dirty_limited_ = false;
      disks_.reacquire_all();  // before the guest may write its disks again
      if (paused_) {
        vm_.resume();
        paused_ = false;
        if (observer_.guest_resumed) observer_.guest_resumed();
      }
    } catch (...) {
      // Nothing more can be done from here; the VM reports its own failure.
    }
  }

 private:
  MigratableVm& vm_;
  DiskSender& disks_;
  const MigrationObserver& observer_;
  bool logging_ = false, throttled_ = false, dirty_limited_ = false, paused_ = false, committed_ = false;
};

// ORs the pages dirtied since the last fetch into `pending`; returns how many are pending.
// They stay unarmed until PageSender reaches them: a page written between this fetch and its
// turn then leaves once, with that write, and is not fetched again for it.
std::uint64_t fetch_dirty(MigratableVm& vm, std::span<const MemoryRegion> regions, Bitmaps& scratch, Bitmaps& pending) {
  std::uint64_t total = 0;
  for (std::size_t r = 0; r < regions.size(); ++r) {
    vm.fetch_dirty_log_unarmed(r, scratch[r]);
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

Tunables SenderOptions::tunables() const {
  return {policy.downtime_target_ms, bandwidth_limit, policy.throttle_initial_pct, policy.throttle_step_pct,
          policy.throttle_max_pct};
}

std::shared_ptr<MigrationControl> make_control(const SenderOptions& options, MigrationObserver observer) {
  auto control = std::make_shared<MigrationControl>(options.tunables(), std::move(observer));
  if (options.postcopy) control->enable_postcopy();
  return control;
}

struct SourceMigration::State {
  State(MigratableVm& vm_, transport::Stream& stream_, SenderOptions options_, MigrationControl& control)
      : vm(vm_), stream(stream_), options(std::move(options_)), policy(options.policy),
        decider(options.policy_plugin ? options.policy_plugin : PolicyRegistry::global().make("mig", options.policy)),
        regions(vm.memory_regions()),
        disks(vm.disks(), options.copy_storage), rollback(vm, disks, control.observer()) {}

  MigratableVm& vm;
  transport::Stream& stream;
  const SenderOptions options;
  ConvergencePolicy policy;  // options.policy with the live tunables applied
  std::shared_ptr<const MigrationPolicy> decider;  // options.policy_plugin, or mig's
  bool can_throttle = true;                         // until the VM refuses a throttle
  bool can_limit_dirty_rate = true;                 // until the VM refuses a dirty limit
  const std::vector<MemoryRegion> regions;
  DiskSender disks;
  SourceRollback rollback;
  MigrationStats stats;
  Phase phase = Phase::setup;

  // Agreed at the handshake.
  std::uint64_t session = 0;
  bool verify = false, same_host = false, shared = false;
  unsigned channels = 1;
  std::vector<transport::Stream> extra;  // channels 1..n-1
  std::vector<transport::Stream*> streams;
  std::unique_ptr<PageHashes> hashes;
  std::vector<std::unique_ptr<PageSender>> senders;
  transport::Stream* main = nullptr;  // channel 0: `stream`, until a post-copy recovery replaces it

  // Post-copy.
  bool postcopy = false;  // agreed at the handshake
  bool switching_to_postcopy = false;
  std::optional<transport::Stream> urgent, reconnected;
  std::unique_ptr<PostcopySource> postcopy_source;
  PostcopyStats postcopy_stats;
  std::uint64_t postcopy_bytes_closed = 0;  // sent on connections a post-copy recovery replaced

  // The rounds.
  Bitmaps pending, scratch;
  std::uint64_t pending_pages = 0;  // set in `pending`, as the plan or the last fetch counted them
  std::uint32_t round = 0;  // the round being sent, in the end the final one
  unsigned throttle_pct = 0;
  double dirty_limit_MBps = 0;
  RoundCounts totals;

  // The switchover's clock.
  CpuTime cpu;                  // the helper threads; the driving thread counts from cpu_start
  std::uint64_t cpu_start = 0;
  Clock::time_point start, pause_start, paused_at, synced, pages_done, state_done, ready_at, running_at;
  wire::Ready ready;
  wire::Running running;
};

SourceMigration::SourceMigration(MigratableVm& vm, transport::Stream& stream, SenderOptions options,
                                 std::shared_ptr<MigrationControl> control)
    : control_(control ? std::move(control) : make_control(options)) {
  s_ = std::make_unique<State>(vm, stream, std::move(options), *control_);
}

SourceMigration::~SourceMigration() = default;

namespace {

// Control frames count towards what the migration has sent, like page batches.
template <typename Message>
void send_counted(transport::Stream& stream, MigrationControl& control, const Message& message, bool guest_paused) {
  const std::uint64_t before = stream.counters().bytes_sent;
  stream.send(message);
  control.count_batch(stream.counters().bytes_sent - before, 0, 0, 0, guest_paused);
}

// Moves the status on, unless a cancel got there first.
void enter(MigrationControl& control, MigrationStatus from, MigrationStatus to) {
  if (!control.advance(from, to)) throw MigrationCancelled();
}

}  // namespace

MigrationStats SourceMigration::run() {
  State& s = *s_;
  s.start = Clock::now();
  s.cpu_start = thread_cpu_ns();
  for (const auto& r : s.regions) s.stats.guest_bytes += r.size;
  s.stats.offline = s.options.offline;
  s.stats.policy = s.decider->name();
  control_->started(s.stats.guest_bytes);
  try {
    // Whoever steers the migration may have announced set-up already, while connecting.
    if (control_->status() != MigrationStatus::setup) enter(*control_, MigrationStatus::none, MigrationStatus::setup);
    set_up();
    enter(*control_, MigrationStatus::setup, MigrationStatus::active);
    start_tracking();
    plan_round_zero();
    if (!s.rollback.is_paused()) precopy();
    if (s.switching_to_postcopy) {
      switch_to_postcopy();
      send_device_state();
      await_ready();
      commit();
      postcopy();
    } else {
      stop_and_copy();
      send_device_state();
      await_ready();
      commit();
    }
    // Completed from here: the guest runs at the destination. What the guest saw of the
    // switchover is reported once it has shown a heartbeat there.
    finish_statistics();
    control_->finish(s.stats);
    report_guest_handover();
  } catch (const std::exception& e) {
    fail(e);
  }
  // The source runs again before anyone can see the migration failed.
  s.rollback.undo();
  finish_statistics();
  control_->finish(s.stats);
  return s.stats;
}

namespace {

// A receiver that cannot take post-copy says why in an Error; one that answers without it broke
// the protocol.
constexpr const char* kPostcopyDropped = "the destination took the migration without the post-copy asked for";

// What the destination checks before it builds anything: the guest's shape, CPU and clock.
wire::Hello describe_guest(const MigratableVm& vm) {
  wire::Hello hello;
  hello.vcpus = vm.vcpu_count();
  hello.host_boot_id = transport::host_boot_id();
  hello.cpuid = vm.guest_cpuid();
  hello.tsc_khz = vm.guest_tsc_khz();
  for (const auto& r : vm.memory_regions()) hello.regions.push_back({r.guest_addr, r.size});
  return hello;
}

// The destination's answer to Hello. A receiver that takes only TLS closes a plaintext TCP
// connection without a word, which alone would leave the operator guessing.
wire::HelloAck receive_hello_ack(transport::Stream& stream) {
  try {
    return stream.receive<wire::HelloAck>();
  } catch (const transport::PeerError& e) {
    if (stream.security() != transport::StreamSecurity::plaintext || stream.can_pass_fds() ||
        std::string_view(e.what()).find("closed the connection") == std::string_view::npos)
      throw;
    throw transport::PeerError(std::string(e.what()) +
                               " before answering Hello: a receiver that takes only TLS does that to a source without "
                               "--tls-creds or --tls-psk");
  }
}

// A same-host hand-over is offered where the guest's memory can be shared and the stream can
// carry its file descriptors (a unix socket).
bool offers_memory(const std::vector<int>& memory_fds, const transport::Stream& stream, const SenderOptions& options) {
  return options.share_memory && !memory_fds.empty() && stream.can_pass_fds();
}

}  // namespace

DestinationCheck check_destination(MigratableVm& vm, transport::Stream& stream, const SenderOptions& options) {
  stream.set_timeout(options.peer_timeout);
  auto hello = describe_guest(vm);
  // The memory is offered as the migration would offer it: a receiver that would take it
  // needs no post-copy, so a --paused one is fit for a same-host hand-over.
  const bool offer_sharing = offers_memory(vm.shareable_memory_fds(), stream, options);
  hello.capabilities = wire::kCapDryRun | (offer_sharing ? wire::kCapSharedMemory : 0) |
                       (options.postcopy ? wire::kCapPostcopy : 0);
  hello.channels = std::clamp(options.channels, 1u, wire::kMaxChannels);
  hello.disks = describe_disks(vm.disks(), options.copy_storage);
  stream.send(hello);
  const auto ack = receive_hello_ack(stream);  // a refusal arrives as Error, and throws
  if (!(ack.capabilities & wire::kCapDryRun))
    throw std::runtime_error("the destination took the check for a migration (it predates dry runs)");
  const bool shared = offer_sharing && (ack.capabilities & wire::kCapSharedMemory);
  if (options.postcopy && !shared && !(ack.capabilities & wire::kCapPostcopy)) throw wire::ProtocolError(kPostcopyDropped);
  if (ack.channels < 1 || ack.channels > hello.channels) throw wire::ProtocolError("receiver accepted an impossible channel count");
  return {shared ? 1u : ack.channels, options.postcopy && !shared, shared};
}

void SourceMigration::set_up() {
  State& s = *s_;
  s.stream.set_timeout(s.options.peer_timeout);
  s.stream.set_interrupt([control = control_.get()] { return control->cancel_requested(); });
  auto hello = describe_guest(s.vm);
  const auto memory_fds = s.vm.shareable_memory_fds();
  const bool offer_sharing = offers_memory(memory_fds, s.stream, s.options);
  // Offered beside sharing, verification and post-copy apply if the receiver copies instead.
  hello.capabilities = (offer_sharing ? wire::kCapSharedMemory : 0) | (s.options.verify ? wire::kCapVerify : 0);
  if (s.options.postcopy) {
    if (!s.options.open_channel) throw std::invalid_argument("post-copy needs a way to open its channel");
    hello.capabilities |= wire::kCapPostcopy;
  }
  hello.channels = std::clamp(s.options.channels, 1u, wire::kMaxChannels);
  if (hello.channels > 1 && !s.options.open_channel) throw std::invalid_argument("parallel channels need a way to open them");
  hello.session = std::random_device{}() | (std::uint64_t{std::random_device{}()} << 32);
  hello.disks = s.disks.describe();
  s.session = hello.session;
  send_counted(s.stream, *control_, hello, false);
  const auto ack = receive_hello_ack(s.stream);
  s.verify = s.options.verify && (ack.capabilities & wire::kCapVerify);
  s.shared = offer_sharing && (ack.capabilities & wire::kCapSharedMemory);
  s.postcopy = s.options.postcopy && !s.shared && (ack.capabilities & wire::kCapPostcopy);
  if (s.options.postcopy && !s.shared && !s.postcopy) throw wire::ProtocolError(kPostcopyDropped);
  s.same_host = !hello.host_boot_id.empty() && ack.host_boot_id == hello.host_boot_id;
  if (s.shared) hand_over_memory(memory_fds);
  s.channels = s.shared ? 1 : ack.channels;
  if (s.channels < 1 || s.channels > hello.channels) throw wire::ProtocolError("receiver accepted an impossible channel count");
  open_channels();
  s.stats.setup_ms = ms_between(s.start, Clock::now());
  control_->set_setup_done();
}

// Same host: the receiver maps this very memory. Its acknowledgement says the destination
// VM is built on it, so building that stays out of the downtime. The hand-over is round 0.
void SourceMigration::hand_over_memory(const std::vector<int>& fds) {
  State& s = *s_;
  send_counted(s.stream, *control_, wire::SharedMemory{static_cast<std::uint32_t>(fds.size())}, false);
  s.stream.send_fds(fds);
  send_counted(s.stream, *control_, wire::RoundEnd{0}, false);
  s.stream.receive<wire::RoundAck>();
}

void SourceMigration::open_channels() {
  State& s = *s_;
  for (unsigned i = 1; i < s.channels; ++i) {
    s.extra.push_back(s.options.open_channel());
    s.extra.back().set_timeout(s.options.peer_timeout);
    s.extra.back().set_interrupt([control = control_.get()] { return control->cancel_requested(); });
    send_counted(s.extra.back(), *control_, wire::ChannelHello{s.session, i}, false);
  }
  if (s.postcopy) {
    s.urgent = s.options.open_channel();
    send_counted(*s.urgent, *control_, wire::ChannelHello{s.session, wire::kPostcopyChannel}, false);
  }
  s.main = &s.stream;
  s.streams = {&s.stream};
  for (auto& e : s.extra) s.streams.push_back(&e);
  // With post-copy, one more PageHashes channel: the answers to requests.
  s.hashes = std::make_unique<PageHashes>(s.regions, s.channels + (s.postcopy ? 1 : 0));
  const PageSenderConfig config{s.options.dedup, s.options.skip_zero_pages, s.options.compress_level,
                                s.options.delta_cache_pages, &s.vm};
  for (unsigned i = 0; i < s.channels; ++i)
    s.senders.push_back(std::make_unique<PageSender>(s.regions, *s.streams[i], *s.hashes, config, *control_, i, s.channels));
  s.pending = empty_bitmaps(s.regions);
  s.scratch = empty_bitmaps(s.regions);
}

namespace {

// Pauses the guest for the switchover (or, offline and shared, for the whole migration).
void pause_guest(MigratableVm& vm, MigrationControl& control, SourceRollback& rollback, Clock::time_point& pause_start,
                 Clock::time_point& paused_at) {
  enter(control, MigrationStatus::active, MigrationStatus::device);
  pause_start = Clock::now();
  vm.pause();
  rollback.paused();
  paused_at = Clock::now();
  if (control.observer().guest_paused) control.observer().guest_paused();
}

// Sends round `round` of `pending` on every channel at once, each ending it with RoundEnd and
// waiting for its RoundAck when `acknowledged`.
RoundCounts send_on_all_channels(std::vector<std::unique_ptr<PageSender>>& senders,
                                 const std::vector<transport::Stream*>& streams, MigrationControl& control,
                                 std::uint32_t round, Bitmaps& pending, bool acknowledged, bool guest_paused,
                                 CpuTime& cpu, const std::function<bool()>& stop_early = {}) {
  auto one = [&](std::size_t i) {
    auto counts = senders[i]->send_round(round, pending, guest_paused, stop_early);
    if (acknowledged) {
      send_counted(*streams[i], control, wire::RoundEnd{round}, guest_paused);
      if (streams[i]->receive<wire::RoundAck>().round != round) throw wire::ProtocolError("RoundAck for the wrong round");
    }
    return counts;
  };
  if (senders.size() == 1) return one(0);
  std::vector<std::future<RoundCounts>> running;
  for (std::size_t i = 0; i < senders.size(); ++i)
    running.push_back(std::async(std::launch::async, [&one, &cpu, i] {
      name_this_thread("mig-send-ch" + std::to_string(i));
      CpuTime::Scope counted(cpu);
      return one(i);
    }));
  RoundCounts total;
  std::exception_ptr failure;
  for (auto& f : running) {
    try {
      total += f.get();
    } catch (...) {
      if (!failure) failure = std::current_exception();
    }
  }
  if (failure) std::rethrow_exception(failure);
  return total;
}

}  // namespace

// Tracking starts before round 0 reads anything, so every later write is caught. Offline
// and shared-memory migrations pause instead: there is nothing to track.
void SourceMigration::start_tracking() {
  State& s = *s_;
  if (s.options.offline || s.shared) {
    pause_guest(s.vm, *control_, s.rollback, s.pause_start, s.paused_at);
    s.stats.stop_reason = s.shared ? StopReason::shared_memory : StopReason::offline;
    return;
  }
  s.vm.start_dirty_log();
  s.rollback.logging_started();
  s.disks.start_tracking();
}

// Round 0: every page that may be non-zero; untouched pages are known zero for free. Shared
// memory leaves it empty: the destination already maps this very memory.
void SourceMigration::plan_round_zero() {
  State& s = *s_;
  s.disks.plan_round_zero();
  if (s.shared) return;
  for (std::size_t r = 0; r < s.regions.size(); ++r) {
    if (s.options.skip_zero_pages)
      s.vm.populated_pages(r, s.pending[r]);
    else
      std::fill(s.pending[r].begin(), s.pending[r].end(), ~std::uint64_t{0});  // bits past the end are ignored
  }
  s.pending_pages = count_pages(s.regions, s.pending);
  if (s.options.page_plan) send_counted(s.stream, *control_, wire::PagePlan{s.pending}, false);
}

void SourceMigration::precopy() {
  State& s = *s_;
  enter_phase(Phase::precopy);
  apply_tunables();
  while (precopy_round(s.round)) ++s.round;
  ++s.round;  // the final round follows, paused
}

// Sends one round while the guest runs; returns whether another should follow.
bool SourceMigration::precopy_round(std::uint32_t round) {
  State& s = *s_;
  const auto round_start = Clock::now();
  control_->round_started(s.pending_pages);
  // Disk chunks go first on channel 0, so its RoundAck covers them too.
  const std::uint64_t disk_bytes_before = s.disks.wire_bytes();
  s.disks.send_pending(*s.main, *control_, false);
  // A round after round 0 is cut short for a switch to post-copy: its pages would only be
  // dirtied again.
  auto counts = send_on_all_channels(s.senders, s.streams, *control_, round, s.pending, true, false, s.cpu,
                                     [this, round] { return round > 0 && postcopy_wanted(); });
  s.totals += counts;
  counts.bytes += s.disks.wire_bytes() - disk_bytes_before;
  s.pending_pages = fetch_dirty(s.vm, s.regions, s.scratch, s.pending);
  s.disks.fetch_written();
  control_->count_dirty_sync();
  record_round(round, counts, std::chrono::duration<double>(Clock::now() - round_start).count());

  // The round boundary: whatever the operator changed meanwhile counts from here.
  apply_tunables();
  if (control_->cancel_requested()) throw MigrationCancelled();
  if (control_->switchover_forced()) {
    s.stats.stop_reason = StopReason::forced;
    return false;
  }
  const PolicyAnswer answer = decide_within_round_limit(*s.decider, policy_view());
  s.stats.stop_rule = answer.rule;
  const Decision decision = answer.decision;
  // With post-copy on, a pre-copy that cannot converge switches instead of pausing long.
  const bool unconverged = decision == Decision::stop_max_rounds || decision == Decision::stop_no_progress ||
                           decision == Decision::start_postcopy;
  if (postcopy_wanted() || (s.postcopy && unconverged)) {
    s.stats.stop_reason = StopReason::postcopy;
    s.switching_to_postcopy = true;
    return false;
  }
  if (decision == Decision::start_postcopy)
    throw std::runtime_error("pre-copy made no progress and post-copy is not enabled");
  if (decision == Decision::abort_no_progress)
    throw std::runtime_error("pre-copy made no progress (" + answer.rule + "); aborted as the policy asks (" +
                             s.decider->name() + ", --on-no-convergence=abort with mig's)");
  if (decision != Decision::next_round) {
    s.stats.stop_reason = stop_reason_of(decision);
    return false;
  }
  adjust_throttle(answer.throttle_pct);
  adjust_dirty_limit(answer.dirty_limit_MBps);
  return true;
}

PolicyView SourceMigration::policy_view() const {
  const State& s = *s_;
  return {s.stats.round_table, control_->tunables(), s.policy.max_rounds, s.stats.guest_bytes / kPageSize,
          s.can_throttle, s.postcopy, s.can_limit_dirty_rate};
}

// The round's line in the round table, with what stopping now would cost.
void SourceMigration::record_round(std::uint32_t round, const RoundCounts& counts, double seconds) {
  State& s = *s_;
  RoundStats rs;
  rs.round = round;
  rs.pages_sent = counts.pages_sent;
  rs.pages_skipped = counts.pages_skipped;
  rs.bytes_sent = counts.bytes;
  rs.duration_s = seconds;
  rs.dirty_pages = s.pending_pages;
  rs.dirty_disk_bytes = s.disks.pending_bytes();
  rs.dirty_rate_Bps = static_cast<double>(s.pending_pages * kPageSize) / std::max(seconds, 1e-9);
  rs.bandwidth_Bps = static_cast<double>(counts.bytes) / std::max(seconds, 1e-9);
  rs.throttle_pct = s.throttle_pct;
  rs.dirty_limit_MBps = s.dirty_limit_MBps;
  s.stats.round_table.push_back(rs);
  s.stats.round_table.back().expected_downtime_ms = expected_downtime_ms(s.stats.round_table, s.policy);
  control_->round_finished(s.stats.round_table.back());
  if (s.disks.copying()) control_->update_disk(s.disks.stats(std::chrono::duration<double>(Clock::now() - s.start).count()));
}

// Auto-converge: the throttle the policy wants for the next round.
void SourceMigration::adjust_throttle(unsigned wanted_pct) {
  State& s = *s_;
  if (wanted_pct == s.throttle_pct || !s.can_throttle) return;
  if (s.vm.set_throttle(wanted_pct / 100.0)) {
    s.throttle_pct = wanted_pct;
    s.rollback.throttled(wanted_pct > 0);
  } else {
    s.can_throttle = false;  // policies now judge stuck rounds without a throttle to come
  }
}

// Dirty-limit: the per-vCPU cap the policy wants for the next round.
void SourceMigration::adjust_dirty_limit(double wanted_MBps) {
  State& s = *s_;
  if (wanted_MBps == s.dirty_limit_MBps || !s.can_limit_dirty_rate) return;
  if (s.vm.set_vcpu_dirty_limit(wanted_MBps * 1e6)) {
    s.dirty_limit_MBps = wanted_MBps;
    s.rollback.dirty_limited(wanted_MBps > 0);
  } else {
    s.can_limit_dirty_rate = false;
  }
}

void SourceMigration::apply_tunables() {
  State& s = *s_;
  const Tunables t = control_->tunables();
  s.policy.downtime_target_ms = t.downtime_target_ms;
  s.policy.throttle_initial_pct = t.throttle_initial_pct;
  s.policy.throttle_step_pct = t.throttle_step_pct;
  s.policy.throttle_max_pct = t.throttle_max_pct;
}

// The guest pauses (unless it already is), and the pages it dirtied since the last round go,
// unlimited. With one channel, Complete right behind the pages is the end of the round. With
// several, each must have acknowledged its share before state and Complete go out on
// channel 0; the extra channels are then done and closed.
void SourceMigration::stop_and_copy() {
  State& s = *s_;
  enter_phase(Phase::stop_and_copy);
  if (!s.rollback.is_paused()) {
    pause_guest(s.vm, *control_, s.rollback, s.pause_start, s.paused_at);
    s.pending_pages = fetch_dirty(s.vm, s.regions, s.scratch, s.pending);
    control_->count_dirty_sync();
  }
  s.disks.fetch_written();
  s.synced = Clock::now();
  control_->round_started(s.pending_pages);
  s.disks.send_pending(*s.main, *control_, true);
  hand_over_disks();
  s.totals += send_on_all_channels(s.senders, s.streams, *control_, s.round, s.pending, s.channels > 1, true, s.cpu);
  for (const auto& e : s.extra) s.stats.extra_channel_bytes += e.counters().bytes_sent;
  s.extra.clear();
  s.streams.resize(1);
  s.pages_done = Clock::now();
}

// Shared storage: the image is flushed and its lock given up, for the destination to take
// before it says Ready. Until the commit, the rollback takes it back.
void SourceMigration::hand_over_disks() {
  State& s = *s_;
  s.disks.release_all();
}

void SourceMigration::send_device_state() {
  State& s = *s_;
  enter_phase(Phase::device_state);
  for (const auto& section : s.vm.save_state())
    send_counted(s.stream, *control_, wire::StateSection{section.name, section.version, section.data}, true);
  s.state_done = Clock::now();
}

// The receiver checks the page-hash digest and restores the state before it says Ready.
void SourceMigration::await_ready() {
  State& s = *s_;
  enter_phase(Phase::awaiting_ready);
  for (const auto& sender : s.senders) {
    s.stats.pages_delta += sender->pages_delta();
    s.stats.batches_compressed += sender->batches_compressed();
  }
  if (s.postcopy_source)
    send_counted(s.stream, *control_, wire::PostcopyStart{s.pending}, true);
  else
    send_counted(s.stream, *control_,
                 wire::Complete{s.verify ? s.hashes->digest() : 0, s.totals.pages_sent, s.verify ? s.disks.digest() : 0},
                 true);
  s.ready = s.stream.receive<wire::Ready>();
  s.ready_at = Clock::now();
}

// The point of no return. From the moment Commit may have left, the destination may run the
// guest: the source must never run it again, whatever happens to the connection.
void SourceMigration::commit() {
  State& s = *s_;
  enter_phase(Phase::commit);
  if (!control_->begin_commit()) throw MigrationCancelled();
  s.rollback.committed();
  try {
    send_counted(s.stream, *control_, wire::Commit{}, true);
    s.running = s.stream.receive<wire::Running>();
  } catch (const std::exception& lost) {
    // In post-copy the destination may run the guest now and lack pages only this side
    // holds: postcopy() meets the broken link and waits for a recovery, never resumes here.
    if (!s.postcopy_source) s.running = ask_again_after_commit(lost);
  }
  s.running_at = Clock::now();
  s.rollback.stop_logging();  // off the downtime path: a memslot update costs milliseconds

  auto& stats = s.stats;
  stats.status = s.postcopy_source ? MigrationStatus::postcopy_active : MigrationStatus::completed;
  stats.rounds = s.round + 1;
  stats.pages_sent = s.totals.pages_sent;
  stats.pages_zero = s.totals.pages_zero;
  stats.pages_skipped = s.totals.pages_skipped;
  stats.verified = s.verify && !s.shared;  // memory handed over is one copy: nothing compared
  stats.shared_memory = s.shared;
  stats.channels = s.channels;
  stats.total_ms = ms_between(s.start, s.running_at);
  auto& d = stats.downtime;
  d.pause_ms = ms_between(s.pause_start, s.paused_at);
  d.final_sync_ms = ms_between(s.paused_at, s.synced);
  d.final_pages_ms = ms_between(s.synced, s.pages_done);
  d.state_ms = ms_between(s.pages_done, s.state_done);
  d.verify_restore_ms = ms_between(s.state_done, s.ready_at);
  d.restore_ms = static_cast<double>(s.ready.restore_ns) / 1e6;
  d.commit_resume_ms = ms_between(s.ready_at, s.running_at);
  d.resume_ms = static_cast<double>(s.running.resume_ns) / 1e6;
  if (s.same_host) {
    stats.downtime_clock = "shared";
    stats.downtime_ms = static_cast<double>(s.running.resumed_at_ns - monotonic_ns(s.pause_start)) / 1e6;
  } else {
    stats.downtime_clock = "round-trip";
    stats.downtime_ms = ms_between(s.pause_start, s.running_at);
  }
}

bool SourceMigration::postcopy_wanted() const {
  const State& s = *s_;
  if (!s.postcopy) return false;
  if (control_->postcopy_requested()) return true;
  return s.options.postcopy_after_s &&
         std::chrono::duration<double>(Clock::now() - s.start).count() >= *s.options.postcopy_after_s;
}

// Instead of the final round: the guest pauses, and what it dirtied since its last send
// (plus what a cut-short round did not send) is what the destination lacks. It goes after
// the switch, first answering the requests that may come even before Commit: restoring
// state at the destination can touch guest memory.
void SourceMigration::switch_to_postcopy() {
  State& s = *s_;
  enter_phase(Phase::stop_and_copy);
  pause_guest(s.vm, *control_, s.rollback, s.pause_start, s.paused_at);
  s.pending_pages = fetch_dirty(s.vm, s.regions, s.scratch, s.pending);
  control_->count_dirty_sync();
  // Disks do not take post-copy: their last chunks go now, while the guest is paused.
  s.disks.fetch_written();
  s.disks.send_pending(*s.main, *control_, true);
  hand_over_disks();
  s.synced = s.pages_done = Clock::now();
  for (const auto& e : s.extra) s.stats.extra_channel_bytes += e.counters().bytes_sent;
  s.extra.clear();  // each acknowledged its last round: all it carried has landed
  s.streams.resize(1);
  s.postcopy_stats.switchover_ms = ms_between(s.start, s.pause_start);
  s.postcopy_stats.bytes_before = total_bytes_sent();
  s.postcopy_source = std::make_unique<PostcopySource>(s.regions, s.pending, *s.hashes, *control_, s.round, s.channels);
  s.postcopy_source->serve(*s.urgent);
}

// The destination runs the guest; every page it lacks goes to it. A broken link does not end
// the migration: neither side holds the whole guest now, so the source waits, paused, for
// the operator to reconnect it (or to give the guest up).
void SourceMigration::postcopy() {
  State& s = *s_;
  enter_phase(Phase::postcopy);
  control_->advance(MigrationStatus::device, MigrationStatus::postcopy_active);
  for (;;) {
    try {
      finish_postcopy();
      break;
    } catch (const std::exception& e) {
      const auto serving = s.postcopy_source->stop_serving();
      s.stats.error = "post-copy link broke: " + (serving ? *serving : explain_failure(*s.main, e)) +
                      "; the destination runs the guest and only this side holds its missing pages: this side waits "
                      "to be reconnected to the destination's recovery address, and the guest must not run here again";
      control_->update_postcopy(s.postcopy_stats, s.stats.error);
      control_->advance(MigrationStatus::postcopy_active, MigrationStatus::postcopy_paused);
      reconnect_postcopy();
    }
  }
  s.stats.error.clear();
  s.stats.status = MigrationStatus::completed;
}

void SourceMigration::finish_postcopy() {
  State& s = *s_;
  const auto started = Clock::now();
  s.main->set_timeout(s.options.peer_timeout);
  s.postcopy_source->push_rest(*s.main);
  if (auto error = s.postcopy_source->stop_serving()) throw std::runtime_error(*error);
  send_counted(*s.main, *control_,
               wire::Complete{s.verify ? s.hashes->digest() : 0, s.totals.pages_sent, s.verify ? s.disks.digest() : 0}, false);
  s.main->receive<wire::PostcopyDone>();
  s.postcopy_stats.postcopy_ms += ms_between(started, Clock::now());
  s.stats.total_ms = ms_between(s.start, Clock::now());
}

// Waits for the operator's resume, then reconnects both channels; the destination says which
// pages it still lacks, and they go again. A failed attempt waits for the next resume.
void SourceMigration::reconnect_postcopy() {
  State& s = *s_;
  for (;;) {
    auto connect = control_->wait_for_recovery();
    if (!connect) throw std::runtime_error("post-copy was given up while paused: " + s.stats.error);
    control_->advance(MigrationStatus::postcopy_paused, MigrationStatus::postcopy_recover);
    try {
      if (s.reconnected) s.postcopy_bytes_closed += s.reconnected->counters().bytes_sent;
      s.postcopy_bytes_closed += s.urgent->counters().bytes_sent;
      s.urgent.reset();
      s.reconnected = connect();
      s.main = &*s.reconnected;
      s.main->set_timeout(s.options.peer_timeout);
      s.main->send(wire::PostcopyResume{s.session});
      const auto ack = s.main->receive<wire::PostcopyResumeAck>();
      if (ack.bitmaps.size() != s.regions.size()) throw wire::ProtocolError("PostcopyResumeAck does not match the memory layout");
      for (std::size_t r = 0; r < s.regions.size(); ++r)
        if (ack.bitmaps[r].size() != s.pending[r].size()) throw wire::ProtocolError("PostcopyResumeAck bitmap does not match its region");
      s.urgent = connect();
      s.urgent->send(wire::ChannelHello{s.session, wire::kPostcopyChannel});
      s.postcopy_source->resend(ack.bitmaps);
      s.postcopy_source->serve(*s.urgent);
      ++s.postcopy_stats.recoveries;
      control_->advance(MigrationStatus::postcopy_recover, MigrationStatus::postcopy_active);
      return;
    } catch (const std::exception& e) {
      s.stats.error = std::string("post-copy recovery failed: ") + e.what();
      control_->advance(MigrationStatus::postcopy_recover, MigrationStatus::postcopy_paused);
    }
  }
}

// The destination reports the gap its guest saw, once the guest showed a heartbeat there. A
// guest without heartbeats, or a slow one, leaves the migration standing all the same.
void SourceMigration::report_guest_handover() {
  State& s = *s_;
  try {
    s.stream.set_timeout(s.options.handover_wait);
    const auto handover = s.stream.receive<wire::Handover>();
    s.stats.guest = GuestHandover{static_cast<double>(handover.gap_ns) / 1e6, handover.sequence_continued != 0,
                                  handover.last_source_seq, handover.first_destination_seq};
  } catch (const std::exception&) {
  }
}

// Commit may or may not have reached the destination, and only it knows whether it resumed
// the guest: ask it on a new connection until it answers or handoff_retry runs out (then the
// outcome stays unknown, and the guest stays paused here).
wire::Running SourceMigration::ask_again_after_commit(const std::exception& lost) {
  State& s = *s_;
  if (!s.options.open_channel) throw;
  const auto deadline = Clock::now() + s.options.handoff_retry;
  std::string last = lost.what();
  while (Clock::now() < deadline) {
    try {
      auto stream = s.options.open_channel();
      stream.set_timeout(s.options.peer_timeout);
      stream.send(wire::CommitRetry{s.session});
      const auto running = stream.receive<wire::Running>();
      s.stats.commit_retried = true;
      return running;
    } catch (const std::exception& e) {
      last = e.what();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  throw transport::PeerError(std::string(lost.what()) + "; asking the destination again failed too (" + last + ")");
}

void SourceMigration::enter_phase(Phase phase) {
  s_->phase = phase;
  control_->set_phase(phase);
}

void SourceMigration::fail(const std::exception& error) {
  State& s = *s_;
  auto& stats = s.stats;
  stats.failed_phase = s.phase;
  const bool committed = s.rollback.is_committed();
  if (s.phase == Phase::postcopy) {
    stats.status = MigrationStatus::failed;
    stats.error = error.what();
    return;
  }
  const bool cancelled = !committed && (control_->cancel_requested() || dynamic_cast<const MigrationCancelled*>(&error) ||
                                          dynamic_cast<const transport::Interrupted*>(&error));
  if (cancelled) {
    stats.status = MigrationStatus::cancelled;
    stats.error = std::string("cancelled during ") + to_string(s.phase);
  } else {
    stats.status = committed ? MigrationStatus::handoff_unknown : MigrationStatus::failed;
    stats.error = std::string(to_string(s.phase)) + ": " + explain_failure(s.stream, error);
  }
  if (committed) return;
  // Tell the receiver, so it discards what it has instead of waiting out its timeout.
  try {
    s.stream.set_interrupt(nullptr);
    s.stream.set_timeout(std::chrono::milliseconds(200));
    s.stream.send(wire::Error{cancelled ? "the source cancelled the migration" : "source aborted the migration: " + stats.error});
  } catch (...) {
  }
}

std::uint64_t SourceMigration::total_bytes_sent() const {
  const State& s = *s_;
  std::uint64_t total = s.stream.counters().bytes_sent + s.stats.extra_channel_bytes + s.postcopy_bytes_closed;
  for (const auto* stream : {s.urgent ? &*s.urgent : nullptr, s.reconnected ? &*s.reconnected : nullptr})
    if (stream) total += stream->counters().bytes_sent;
  return total;
}

void SourceMigration::finish_statistics() {
  State& s = *s_;
  auto& stats = s.stats;
  if (stats.total_ms == 0) stats.total_ms = ms_between(s.start, Clock::now());
  stats.cpu_s = s.cpu.seconds(s.cpu_start);
  if (s.postcopy_source) {
    // Also for a post-copy that was given up: it says the guest left.
    auto& p = s.postcopy_stats;
    p.pages_needed = s.postcopy_source->pages_needed();
    p.requests = s.postcopy_source->requests();
    p.pages_urgent = s.postcopy_source->pages_urgent();
    p.pages_background = s.postcopy_source->pages_background();
    p.bytes_after = total_bytes_sent() - p.bytes_before;
    stats.postcopy = p;
  }
  for (const auto& e : s.extra) stats.extra_channel_bytes += e.counters().bytes_sent;
  const auto& c = s.stream.counters();
  stats.bytes_sent = total_bytes_sent();
  stats.downtime_bytes = control_->progress().downtime_bytes;
  stats.security = s.stream.security();
  stats.zerocopy = s.stream.zerocopy();
  stats.zerocopy_sends = c.zerocopy_sends;
  stats.zerocopy_copied = c.zerocopy_copied;
  stats.throughput_MBps = static_cast<double>(stats.bytes_sent) / 1e3 / std::max(stats.total_ms, 1e-9);
  if (!s.disks.has_disks()) return;
  stats.disk = s.disks.stats(stats.total_ms / 1e3);
  stats.disk->verified = s.verify && s.disks.copying() && stats.status == MigrationStatus::completed;
}

}  // namespace mig::engine
