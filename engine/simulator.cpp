#include "engine/simulator.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <set>
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

  // After a post-copy switchover: `seconds` of wall time from `wall` at the destination,
  // which neither throttles nor limits the guest. visit(page, wall time) returns how long the
  // write waits (for a page still on its way); the writer's later writes come that much
  // later, and one still waiting when the time is up goes on from that write.
  template <typename Visit>
  void run_at_destination(double wall, double seconds, Visit&& visit) {
    struct Write {
      double when;  // trace time
      std::uint64_t page;
      std::size_t writer;
    };
    std::vector<Write> writes;
    const std::vector<double> from = clocks_;
    for (std::size_t writer = 0; writer < clocks_.size(); ++writer)
      for_each_write(trace_, from[writer], from[writer] + seconds / interval_s_,
                     [&](std::uint64_t page, double when) { writes.push_back({when, page, writer}); }, writer_id(writer), loop_from_);
    std::sort(writes.begin(), writes.end(), [](const Write& a, const Write& b) { return a.when < b.when; });
    std::vector<double> waited(clocks_.size(), 0);
    std::vector<bool> held_over(clocks_.size(), false);
    for (const auto& w : writes) {
      if (held_over[w.writer]) continue;
      const double at = wall + (w.when - from[w.writer]) * interval_s_ + waited[w.writer];
      if (at >= wall + seconds) {
        held_over[w.writer] = true;
        clocks_[w.writer] = w.when;
        continue;
      }
      waited[w.writer] += visit(w.page, at);
      clocks_[w.writer] = std::nextafter(w.when, w.when + 1);  // past it at least; its time run is added below
    }
    for (std::size_t writer = 0; writer < clocks_.size(); ++writer)
      if (!held_over[writer])
        clocks_[writer] = std::max(clocks_[writer], from[writer] + std::max(0.0, seconds - waited[writer]) / interval_s_);
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
        channels_(o.channels),
        burst_(bursts(o.channels)),
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
  // Post-copy's push, `idle_s` after the last round: on the main channel alone, at the whole
  // limit. With one channel that is the bucket pre-copy used; with more, a new (full) one.
  void start_push(double idle_s) {
    if (channels_ == 1) return end_round(0, idle_s);
    channels_ = 1;
    tokens_ = burst_ = bursts(1);
  }

 private:
  // The bursts of `channels` buckets that share the limit.
  double bursts(unsigned channels) const {
    return limit_Bps_ > 0 ? channels * transport::TokenBucket::default_burst(limit_Bps_ / channels) : 0;
  }

  const double link_Bps_, limit_Bps_;
  unsigned channels_;
  double burst_, tokens_;
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

// After a post-copy switchover the destination runs the guest, and every page it lacks
// leaves the source once: pushed in address order, paced by the sender's limit as pre-copy
// was, or at once when the guest writes it first (a request, answered unpaced in a round
// trip plus the page's time on the link, after which the push goes on from the page after
// it, as PostcopySource does). The writer waits for the page; a trace holds no reads, so a
// page the guest only reads is never requested.
class PostcopyReplay {
 public:
  PostcopyReplay(std::span<const std::uint64_t> needed, double resumed, const PreCopySending& pacing, const SimulatorOptions& o)
      : missing_(needed.begin(), needed.end()),
        pacing_(pacing),
        scale_(o.guest_scale),
        page_bytes_(static_cast<double>(o.guest_scale * kWirePageBytes)),
        link_Bps_(o.bandwidth_Bps),
        rtt_(2 * o.latency_ms / 1000),
        resumed_(resumed),
        // The source starts pushing when it hears Running, half a round trip after the guest
        // resumed; each page lands half a round trip after it left.
        first_landing_(resumed + rtt_),
        request_wait_(rtt_ + static_cast<double>(kWirePageBytes) / link_Bps_),
        needed_(needed.size()),
        finished_(first_landing_) {}

  // The guest writes `page` at wall time `when` (writes come in time order); returns how
  // long the writer waits for it.
  double write(std::uint64_t page, double when) {
    push_until(when);
    if (missing_.erase(page) == 0) return 0;
    ++urgent_;
    push_at_ = page + 1;
    finished_ = std::max(finished_, when + request_wait_);
    return request_wait_;
  }

  // The background push, up to wall time `when`: paced as pre-copy was, on a link that the
  // answers to requests share.
  void push_until(double when) {
    const double since = std::max(0.0, when - first_landing_);
    const double landed = std::floor(std::min(pacing_.bytes_by(since), since * link_Bps_ - static_cast<double>(urgent_) * page_bytes_) / page_bytes_);
    while (!missing_.empty() && static_cast<double>(pushed_) < landed) {
      auto next = missing_.lower_bound(push_at_);
      if (next == missing_.end()) next = missing_.begin();
      push_at_ = *next + 1;
      missing_.erase(next);
      ++pushed_;
    }
    if (missing_.empty())
      finished_ = std::max(finished_, first_landing_ + std::max(pacing_.seconds_for(static_cast<double>(pushed_) * page_bytes_),
                                                               static_cast<double>(pushed_ + urgent_) * page_bytes_ / link_Bps_));
  }

  bool done() const { return missing_.empty(); }

  // The last page landed at `finished_`; Complete follows it, and PostcopyDone comes back.
  PostcopyStats stats() const {
    PostcopyStats p;
    p.pages_needed = needed_ * scale_;
    p.requests = p.pages_urgent = urgent_ * scale_;
    p.pages_background = pushed_ * scale_;
    p.blocktime_ms = static_cast<double>(p.requests) * request_wait_ * 1000;
    p.postcopy_ms = (finished_ - resumed_) * 1000;
    return p;
  }

 private:
  std::set<std::uint64_t> missing_;
  const PreCopySending& pacing_;
  const std::uint64_t scale_;
  const double page_bytes_, link_Bps_, rtt_, resumed_, first_landing_;
  const double request_wait_;  // a round trip and the page's time on the link
  const std::uint64_t needed_;
  double finished_;
  std::uint64_t push_at_ = 0, pushed_ = 0, urgent_ = 0;
};

// One simulated migration, phase by phase, as SourceMigration runs a real one.
class Simulation {
 public:
  Simulation(const DirtyTrace& trace, const SimulatorOptions& o)
      : trace_(trace),
        o_(o),
        policy_(o.policy ? o.policy : PolicyRegistry::global().make("mig", o.convergence)),
        rtt_(2 * o.latency_ms / 1000),
        pause_bandwidth_Bps_(o.pause_bandwidth_Bps > 0 ? o.pause_bandwidth_Bps : o.bandwidth_Bps),
        guest_(trace, o.trace_start_s),
        sending_(o),
        pending_(populated_at(trace, o.trace_start_s)) {
    m_.policy = policy_->name();
    m_.guest_bytes = trace.guest_bytes() * o.guest_scale;
  }

  SimulatedMigration run() {
    // Connecting and Hello/HelloAck: two round trips; dirty tracking starts after them.
    now_ = 2 * rtt_ + o_.setup_ms / 1000;
    switch (precopy()) {
      case Ending::stop_and_copy: stop_and_copy(); break;
      case Ending::postcopy: switch_to_postcopy(); break;
      case Ending::give_up: give_up(); break;
    }
    return m_;
  }

 private:
  enum class Ending { stop_and_copy, postcopy, give_up };

  // Round by round, until the policy (or the round limit) says otherwise. A per-vCPU dirty
  // limit needs a trace that names the vCPUs. As the engine does, post-copy (where it is on)
  // takes over from a pre-copy that cannot converge, or right after round 0 when asked to.
  Ending precopy() {
    const bool can_limit_dirty_rate = trace_.vcpus > 0, postcopy = o_.postcopy != SimulatorOptions::Postcopy::off;
    for (RoundStats next;;) {
      next.round = static_cast<std::uint32_t>(m_.round_table.size());
      const auto r = replay_round(guest_, sending_, pending_, now_, next, o_);
      now_ += r.duration_s;
      m_.bytes_sent += r.bytes_sent;
      m_.round_table.push_back(r);
      m_.round_table.back().expected_downtime_ms = expected_downtime_ms(m_.round_table, o_.convergence);
      const auto answer = decide_within_round_limit(*policy_, {m_.round_table, tunables_of(o_.convergence), o_.convergence.max_rounds,
                                                               trace_.pages * o_.guest_scale, o_.can_throttle, postcopy,
                                                               can_limit_dirty_rate});
      m_.stop_rule = answer.rule;
      const bool unconverged = answer.decision == Decision::stop_max_rounds || answer.decision == Decision::stop_no_progress ||
                               answer.decision == Decision::start_postcopy;
      if (postcopy && (unconverged || o_.postcopy == SimulatorOptions::Postcopy::after_round_0)) return Ending::postcopy;
      if (answer.decision == Decision::abort_no_progress || answer.decision == Decision::start_postcopy) return Ending::give_up;
      if (answer.decision != Decision::next_round) {
        m_.stop_reason = stop_reason_of(answer.decision);
        return Ending::stop_and_copy;
      }
      if (o_.can_throttle) next.throttle_pct = answer.throttle_pct;
      if (can_limit_dirty_rate) next.dirty_limit_MBps = answer.dirty_limit_MBps;
    }
  }

  // The last pages and the state, unlimited; Complete, restore, Ready, Commit.
  void stop_and_copy() {
    const std::uint64_t final_bytes = pending_.size() * o_.guest_scale * kWirePageBytes + o_.state_bytes + kRoundOverheadBytes;
    m_.bytes_sent += final_bytes;
    m_.downtime_ms = pause_to_resume_ms(final_bytes);
    m_.total_ms = now_ * 1000 + m_.downtime_ms + 0.5 * rtt_ * 1000;
    m_.rounds = static_cast<std::uint32_t>(m_.round_table.size()) + 1;
  }

  // Instead of the final round: the state goes with the list of the pages the destination
  // lacks (a bitmap of guest memory), the guest resumes there, and the pages follow while it
  // runs, until Complete and PostcopyDone.
  void switch_to_postcopy() {
    const std::uint64_t bitmap_bytes = (trace_.pages * o_.guest_scale + 63) / 64 * 8;
    const std::uint64_t switch_bytes = o_.state_bytes + bitmap_bytes + kRoundOverheadBytes;
    m_.downtime_ms = pause_to_resume_ms(switch_bytes);
    const double resumed = now_ + m_.downtime_ms / 1000;
    // The push starts from a full bucket at the whole limit (it is one channel); with one
    // channel already, the bucket goes on, refilled over the switchover.
    sending_.start_push(resumed + 0.5 * rtt_ - now_);
    PostcopyReplay replay(pending_, resumed, sending_, o_);
    for (double at = resumed; !replay.done(); at += guest_.step_s()) {
      guest_.run_at_destination(at, guest_.step_s(), [&](std::uint64_t page, double when) { return replay.write(page, when); });
      replay.push_until(at + guest_.step_s());
    }
    PostcopyStats p = replay.stats();
    p.switchover_ms = now_ * 1000;
    p.bytes_before = m_.bytes_sent;
    p.bytes_after = switch_bytes + p.pages_needed * kWirePageBytes;
    m_.bytes_sent += p.bytes_after;
    m_.total_ms = (resumed + 0.5 * rtt_) * 1000 + p.postcopy_ms;  // PostcopyDone, heard at the source
    m_.rounds = static_cast<std::uint32_t>(m_.round_table.size()) + 1;
    m_.stop_reason = StopReason::postcopy;
    m_.postcopy = p;
  }

  // The engine fails the migration here: the source runs on.
  void give_up() {
    m_.aborted = true;
    m_.total_ms = now_ * 1000;
    m_.rounds = static_cast<std::uint32_t>(m_.round_table.size());
  }

  // From the pause until the destination resumes: `bytes` at the pause bandwidth, then
  // Complete, Ready and Commit (one and a half round trips) and the restore.
  double pause_to_resume_ms(std::uint64_t bytes) const {
    return (static_cast<double>(bytes) / pause_bandwidth_Bps_ + 1.5 * rtt_) * 1000 + o_.restore_ms;
  }

  const DirtyTrace& trace_;
  const SimulatorOptions& o_;
  const std::shared_ptr<const MigrationPolicy> policy_;
  const double rtt_, pause_bandwidth_Bps_;
  ReplayedGuest guest_;
  PreCopySending sending_;
  std::vector<std::uint64_t> pending_;  // to send in the next round
  double now_ = 0;                      // wall seconds since the migration began
  SimulatedMigration m_;
};

}  // namespace

SimulatedMigration simulate(const DirtyTrace& trace, const SimulatorOptions& o) {
  check(trace, o);
  return Simulation(trace, o).run();
}

}  // namespace mig::engine
