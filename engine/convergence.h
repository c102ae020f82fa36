// When to stop pre-copying: a pure function of the rounds so far. No clocks, no I/O, so it
// can be tested as a table and swapped by researchers.
#pragma once

#include <cstdint>
#include <span>
#include <string>

namespace mig::engine {

struct RoundStats {
  std::uint32_t round = 0;
  std::uint64_t pages_sent = 0;     // raw or zero-encoded pages put on the wire
  std::uint64_t pages_skipped = 0;  // dirty pages not sent: unchanged since their last send
  std::uint64_t bytes_sent = 0;     // wire bytes, headers included
  double duration_s = 0;            // first page sent until the receiver acknowledged the round
  std::uint64_t dirty_pages = 0;    // found by the fetch after the round: the next round's work
  std::uint64_t dirty_disk_bytes = 0;  // disk chunks written meanwhile (--copy-storage-all), also next round's work
  double dirty_rate_Bps = 0;        // dirty_pages * page size / duration_s
  double bandwidth_Bps = 0;         // bytes_sent / duration_s
  double expected_downtime_ms = 0;  // what stopping now would cost, by the windowed bandwidth
  unsigned throttle_pct = 0;        // percent of the time the guest's vCPUs were held during the round
  double dirty_limit_MBps = 0;      // each vCPU's dirty-rate cap during the round (dirty-limit); 0: none
};

// What pre-copy does when it stops making progress: stop and copy the rest (a long pause),
// abort (the guest runs on here), or switch to post-copy (needs post-copy enabled).
enum class NoConvergence { stop, abort, postcopy };

struct ConvergencePolicy {
  double downtime_target_ms = 30;
  std::uint32_t max_rounds = 30;  // round 0 counts
  // Rounds in a row whose dirty rate reached their transfer rate before we call it no
  // progress. Both are counted in pages over the round's duration (the guest dirtied at least
  // as many pages as the round got through), so wire overhead cannot hide a stuck migration.
  std::uint32_t no_progress_rounds = 3;
  NoConvergence on_no_convergence = NoConvergence::stop;
  // Bandwidth is measured over the most recent rounds covering at least this long, so one
  // slow or tiny round does not swing the estimate, and early rounds do not dilute it.
  double bandwidth_window_s = 0.25;
  // The target is a ceiling, not a goal. Within it, go on while rounds still pay: a round
  // that left at most `improve_shrink` of the pages it went through cut the downtime by at
  // least a tenth, and cost about one downtime of pre-copy time, which the guest does not
  // notice. Below `improve_floor_ms` the pause is dominated by state and handshake, not
  // pages, and rounds stop. Off (`improve_within_target = false`) the target alone decides,
  // as in QEMU.
  bool improve_within_target = true;
  double improve_shrink = 0.9;
  double improve_floor_ms = 1.0;
  // Auto-converge (QEMU's name, and its percentages): a round that did not cut the pages
  // left by a tenth, while the expected downtime is above `throttle_above_ms` (above the
  // target when only the target decides), holds the guest's vCPUs for part of the time:
  // throttle_initial_pct, then throttle_step_pct more per such round, up to
  // throttle_max_pct. A guest that dirties memory as fast as the link drains it slows down
  // for a few rounds instead of paying with a long pause; below a few ms, the pause hurts it
  // less than being slowed. Outside the target, stuck rounds count as no progress only at
  // throttle_max_pct.
  bool auto_converge = true;
  double throttle_above_ms = 5;
  unsigned throttle_initial_pct = 20;
  unsigned throttle_step_pct = 10;
  unsigned throttle_max_pct = 99;
};

enum class Decision {
  next_round,
  stop_converged,    // expected downtime within target
  stop_max_rounds,
  stop_no_progress,  // on_no_convergence = stop
  abort_no_progress, // on_no_convergence = abort
  start_postcopy,    // on_no_convergence = postcopy
};
std::string to_string(Decision d);
inline bool stops(Decision d) { return d != Decision::next_round && d != Decision::abort_no_progress; }

// Bytes per second over the most recent rounds spanning policy.bandwidth_window_s.
double window_bandwidth(std::span<const RoundStats> rounds, const ConvergencePolicy& policy);
double expected_downtime_ms(std::span<const RoundStats> rounds, const ConvergencePolicy& policy,
                            std::uint64_t page_size = 4096);

// `rounds` holds every finished round, oldest first, each with the dirty pages found after it.
Decision decide(std::span<const RoundStats> rounds, const ConvergencePolicy& policy);
// The throttle for the next round (auto-converge), in percent, given the rounds so far.
unsigned next_throttle_pct(std::span<const RoundStats> rounds, const ConvergencePolicy& policy);

}  // namespace mig::engine
