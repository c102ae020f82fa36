#include "engine/simulator.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <stdexcept>
#include <utility>

#include "engine/page_sender.h"
#include "transport/rate_limit.h"

namespace mig::engine {
namespace {

// RoundEnd and RoundAck, and the batch headers of a round, beside its pages.
constexpr std::uint64_t kRoundOverheadBytes = 128;

// A dirty limit lets a vCPU catch up on at most this much time it was not held, as the VMMs'
// pacing does (DirtyPacing, vmm/dirty_limiter.h).
constexpr double kDirtyLimitCreditS = 0.010;

// The guest as the trace replays it, and the engine's view of its pages. Each writer of the
// trace (each vCPU it names, and the writes it names no vCPU for) has its own trace clock,
// which runs with wall time slowed by the throttle; a vCPU under a dirty limit is also held,
// so that what it wrote since the limit began never outruns the limit. The pages written
// gather until the engine fetches them.
class ReplayedGuest {
 public:
  ReplayedGuest(const DirtyTrace& trace, double start_s)
      : trace_(trace),
        interval_s_(static_cast<double>(trace.interval.count()) / 1e6),
        loop_from_(static_cast<std::uint64_t>(start_s / interval_s_)),
        clocks_(trace.vcpus + 1, start_s / interval_s_),
        pacing_(trace.vcpus),
        dirty_((trace.pages + 63) / 64, 0) {}

  // `seconds` of wall time from `wall`, at `throttle_pct`, each vCPU dirtying at most
  // `limit_pages_per_s` (0: no limit).
  void run(double wall, double seconds, unsigned throttle_pct, double limit_pages_per_s) {
    const double speed = (1 - throttle_pct / 100.0) / interval_s_;  // intervals per wall second
    if (limit_pages_per_s <= 0 && std::adjacent_find(clocks_.begin(), clocks_.end(), std::not_equal_to<>()) == clocks_.end()) {
      // No writer held, none behind: one pass over the trace for them all.
      pacing_.assign(trace_.vcpus, {});
      run_free(kEveryWriter, seconds, speed);
      return;
    }
    for (std::size_t writer = 0; writer < clocks_.size(); ++writer) {
      const bool names_a_vcpu = writer < trace_.vcpus;
      if (names_a_vcpu && limit_pages_per_s > 0)
        run_held(writer, wall, seconds, speed, limit_pages_per_s);
      else
        run_free(writer, seconds, speed);
      if (names_a_vcpu && limit_pages_per_s <= 0) pacing_[writer] = {};
    }
  }

  // The engine re-arms these pages' dirty tracking: their writes until now leave with them.
  void rearm(std::span<const std::uint64_t> pages) {
    for (auto page : pages) dirty_[page / 64] &= ~(std::uint64_t{1} << (page % 64));
  }

  // The wall time the guest runs between the sender's re-armings: one trace interval, since a
  // trace knows no finer time than that.
  double step_s() const { return interval_s_; }

  // The pages written since the last fetch, ascending, as the dirty log would give them.
  std::vector<std::uint64_t> fetch() {
    std::vector<std::uint64_t> pages;
    for (std::size_t w = 0; w < dirty_.size(); ++w)
      for (std::uint64_t word = std::exchange(dirty_[w], 0); word != 0; word &= word - 1)
        pages.push_back(std::uint64_t{w} * 64 + static_cast<std::uint64_t>(std::countr_zero(word)));
    return pages;
  }

 private:
  // Where a dirty-limited vCPU's pacing began, and what it has written since.
  struct Pacing {
    double pages_per_s = 0, start = 0;
    std::uint64_t pages = 0;
    double due() const { return start + static_cast<double>(pages) / pages_per_s; }
  };

  std::uint32_t writer_id(std::size_t writer) const {
    return writer < trace_.vcpus ? static_cast<std::uint32_t>(writer) : std::uint32_t{kNoVcpu};
  }

  void write(std::uint64_t page) { dirty_[page / 64] |= std::uint64_t{1} << (page % 64); }

  // Runs one writer, or all of them (kEveryWriter) when their clocks agree.
  void run_free(std::size_t writer, double seconds, double speed) {
    const bool all = writer == kEveryWriter;
    const double from = clocks_[all ? 0 : writer], to = from + seconds * speed;
    for_each_write(trace_, from, to, [&](std::uint64_t page, double) { write(page); },
                   all ? kEveryWriter : writer_id(writer), loop_from_);
    if (all)
      std::fill(clocks_.begin(), clocks_.end(), to);
    else
      clocks_[writer] = to;
  }

  // A vCPU under a dirty limit writes in its trace's order, each write no earlier than its
  // pacing allows; once it is held past the end of `seconds`, its clock stops at the write it
  // waits to make.
  void run_held(std::size_t writer, double wall, double seconds, double speed, double limit) {
    const double from = clocks_[writer], to = from + seconds * speed;
    std::vector<std::pair<double, std::uint64_t>> writes;  // trace time, page
    for_each_write(trace_, from, to, [&](std::uint64_t page, double when) { writes.emplace_back(when, page); }, writer_id(writer),
                   loop_from_);
    std::sort(writes.begin(), writes.end());
    Pacing& pacing = pacing_[writer];
    if (pacing.pages_per_s != limit) pacing = {limit, wall, 0};
    double held = 0;  // wall seconds this vCPU has been held in this run
    clocks_[writer] = to;
    for (const auto& [when, page] : writes) {
      const double unheld = wall + (when - from) / speed;
      double at = unheld + held;
      if (at - pacing.due() > kDirtyLimitCreditS) pacing = {limit, at, 0};
      at = std::max(at, pacing.due());
      if (at >= wall + seconds) {
        clocks_[writer] = when;
        return;
      }
      held = at - unheld;
      ++pacing.pages;
      write(page);
    }
  }

  const DirtyTrace& trace_;
  const double interval_s_;
  const std::uint64_t loop_from_;  // the interval where the migration started: a replay past the end loops back to it
  std::vector<double> clocks_;  // per writer (the vCPUs, then the unnamed writes): trace time, in intervals
  std::vector<Pacing> pacing_;  // per vCPU
  std::vector<std::uint64_t> dirty_;
};

// When a round's bytes leave: at the link's rate, and under the sender's limit no sooner than
// its token buckets allow. The engine gives each channel a bucket of limit / channels
// (PageSender), full when the first batch goes and kept for the migration; they are modelled
// as one bucket that holds all their bursts.
class PreCopySending {
 public:
  explicit PreCopySending(const SimulatorOptions& o)
      : link_Bps_(o.bandwidth_Bps),
        limit_Bps_(o.bandwidth_limit_Bps),
        burst_(limit_Bps_ > 0 ? o.channels * transport::TokenBucket::default_burst(limit_Bps_ / o.channels) : 0),
        tokens_(burst_) {}

  // Seconds from the round's start until its first `bytes` have left.
  double seconds_for(double bytes) const {
    const double on_link = bytes / link_Bps_;
    return limit_Bps_ > 0 ? std::max(on_link, (bytes - tokens_) / limit_Bps_) : on_link;
  }
  // The bytes that have left `seconds` into the round.
  double bytes_by(double seconds) const {
    const double on_link = seconds * link_Bps_;
    return limit_Bps_ > 0 ? std::min(on_link, tokens_ + seconds * limit_Bps_) : on_link;
  }
  // A round of `bytes` ended after `seconds`: the tokens it spent are gone, and those the
  // limit added meanwhile are there, up to the burst.
  void end_round(double bytes, double seconds) {
    if (limit_Bps_ > 0) tokens_ = std::clamp(tokens_ + seconds * limit_Bps_ - bytes, 0.0, burst_);
  }

 private:
  const double link_Bps_, limit_Bps_, burst_;
  double tokens_;
};

// One pre-copy round from wall time `now`: the pages pending leave in address order, back to
// back as `sending` lets them, read ahead of it by what the way holds, while the guest runs on in
// steps. As the engine does, the sender re-arms the dirty tracking of a stretch of pages as it
// reads the first of them (at the start of that step): what the guest wrote to them before
// then leaves with them. RoundEnd and RoundAck follow the last page, and then the dirty log
// is fetched, into `pending`. Every pending page is sent: the engine's dedup skips a page only
// when its bytes equal those of a send it is certain of (page_hashes.h), which takes a rewrite
// with the same bytes, and a trace cannot tell that from a change.
RoundStats replay_round(ReplayedGuest& guest, PreCopySending& sending, std::vector<std::uint64_t>& pending, double now,
                        RoundStats r, const SimulatorOptions& o) {
  const std::uint64_t scale = o.guest_scale;
  r.pages_sent = pending.size() * scale;
  r.bytes_sent = r.pages_sent * kWirePageBytes + kRoundOverheadBytes;
  r.duration_s = sending.seconds_for(static_cast<double>(r.bytes_sent)) + 2 * o.latency_ms / 1000;
  const double page_bytes = static_cast<double>(scale * kWirePageBytes), end = now + r.duration_s;
  const double dirty_limit = r.dirty_limit_MBps * 1e6 / kPageSize;
  std::size_t rearmed = 0;  // pending[0, rearmed) are re-armed
  for (double at = now; at < end;) {
    const double step_end = std::min(end, at + guest.step_s());
    // The pages read before the step ends (those that have left, and what is read ahead);
    // the engine re-arms each one's stretch of PageSender::kRearmPages as it comes to the
    // first page of it.
    const double read_by = (sending.bytes_by(step_end - now) + o.read_ahead_bytes) / page_bytes;
    const auto due = static_cast<std::size_t>(std::min(static_cast<double>(pending.size()), std::ceil(read_by)));
    while (rearmed < due) {
      const std::uint64_t stretch = pending[rearmed] / PageSender::kRearmPages;
      std::size_t stretch_end = rearmed;
      while (stretch_end < pending.size() && pending[stretch_end] / PageSender::kRearmPages == stretch) ++stretch_end;
      guest.rearm(std::span(pending).subspan(rearmed, stretch_end - rearmed));
      rearmed = stretch_end;
    }
    guest.run(at, step_end - at, r.throttle_pct, dirty_limit);
    at = step_end;
  }
  sending.end_round(static_cast<double>(r.bytes_sent), r.duration_s);
  pending = guest.fetch();
  r.dirty_pages = pending.size() * scale;
  r.dirty_rate_Bps = static_cast<double>(r.dirty_pages * kPageSize) / r.duration_s;
  r.bandwidth_Bps = static_cast<double>(r.bytes_sent) / r.duration_s;
  return r;
}

Tunables tunables_of(const ConvergencePolicy& policy) {
  Tunables t;
  t.downtime_target_ms = policy.downtime_target_ms;
  t.throttle_initial_pct = policy.throttle_initial_pct;
  t.throttle_step_pct = policy.throttle_step_pct;
  t.throttle_max_pct = policy.throttle_max_pct;
  return t;
}

// The pages that hold data when the migration starts: those populated when the trace began,
// and every page the guest wrote before `start_s` (a trace recorded from boot has none of the
// first kind).
std::vector<std::uint64_t> populated_at(const DirtyTrace& trace, double start_s) {
  std::vector<bool> holds_data(trace.pages, false);
  for (auto page : trace.populated) holds_data[page] = true;
  for_each_write(trace, 0, start_s * 1e6 / static_cast<double>(trace.interval.count()),
                 [&](std::uint64_t page, double) { holds_data[page] = true; });
  std::vector<std::uint64_t> pages;
  for (std::uint64_t page = 0; page < trace.pages; ++page)
    if (holds_data[page]) pages.push_back(page);
  return pages;
}

void check(const DirtyTrace& trace, const SimulatorOptions& o) {
  if (trace.frames.empty()) throw std::invalid_argument("the trace has no intervals to replay");
  if (!(o.bandwidth_Bps > 0)) throw std::invalid_argument("the bandwidth must be positive");
  if (!(o.bandwidth_limit_Bps >= 0)) throw std::invalid_argument("the bandwidth limit must be positive, or 0 for none");
  if (o.channels < 1) throw std::invalid_argument("there must be at least one channel");
  if (o.guest_scale < 1) throw std::invalid_argument("the guest scale must be at least 1");
  if (o.trace_start_s < 0 || o.trace_start_s >= trace.seconds())
    throw std::invalid_argument("the trace start must be within the trace (0 to " + shortest_text(trace.seconds()) + " s)");
}

}  // namespace

SimulatedMigration simulate(const DirtyTrace& trace, const SimulatorOptions& o) {
  check(trace, o);
  const auto policy = o.policy ? o.policy : PolicyRegistry::global().make("mig", o.convergence);
  const double rtt = 2 * o.latency_ms / 1000;
  SimulatedMigration m;
  m.policy = policy->name();
  m.guest_bytes = trace.guest_bytes() * o.guest_scale;
  // Connecting and Hello/HelloAck: two round trips; dirty tracking starts after them.
  double now = 2 * rtt + o.setup_ms / 1000;
  ReplayedGuest guest(trace, o.trace_start_s);
  PreCopySending sending(o);
  std::vector<std::uint64_t> pending = populated_at(trace, o.trace_start_s);

  // Pre-copy, round by round, until the policy (or the round limit) says otherwise. A
  // per-vCPU dirty limit needs a trace that names the vCPUs.
  const bool can_limit_dirty_rate = trace.vcpus > 0;
  for (RoundStats next;;) {
    next.round = static_cast<std::uint32_t>(m.round_table.size());
    const auto r = replay_round(guest, sending, pending, now, next, o);
    now += r.duration_s;
    m.bytes_sent += r.bytes_sent;
    m.round_table.push_back(r);
    m.round_table.back().expected_downtime_ms = expected_downtime_ms(m.round_table, o.convergence);
    const auto answer = decide_within_round_limit(*policy, {m.round_table, tunables_of(o.convergence), o.convergence.max_rounds,
                                                            trace.pages * o.guest_scale, o.can_throttle, false,
                                                            can_limit_dirty_rate});
    m.stop_rule = answer.rule;
    if (answer.decision == Decision::abort_no_progress || answer.decision == Decision::start_postcopy) {
      // The engine gives up here (post-copy is not simulated): the source runs on.
      m.aborted = true;
      m.total_ms = now * 1000;
      m.rounds = static_cast<std::uint32_t>(m.round_table.size());
      return m;
    }
    if (answer.decision != Decision::next_round) {
      m.stop_reason = stop_reason_of(answer.decision);
      break;
    }
    if (o.can_throttle) next.throttle_pct = answer.throttle_pct;
    if (can_limit_dirty_rate) next.dirty_limit_MBps = answer.dirty_limit_MBps;
  }

  // Stop-and-copy: the last pages and the state, unlimited; Complete, restore, Ready, Commit.
  const double pause_bandwidth = o.pause_bandwidth_Bps > 0 ? o.pause_bandwidth_Bps : o.bandwidth_Bps;
  const std::uint64_t final_bytes =
      pending.size() * o.guest_scale * kWirePageBytes + o.state_bytes + kRoundOverheadBytes;
  m.bytes_sent += final_bytes;
  m.downtime_ms = (static_cast<double>(final_bytes) / pause_bandwidth + 1.5 * rtt) * 1000 + o.restore_ms;
  m.total_ms = now * 1000 + m.downtime_ms + 0.5 * rtt * 1000;
  m.rounds = static_cast<std::uint32_t>(m.round_table.size()) + 1;
  return m;
}

}  // namespace mig::engine
