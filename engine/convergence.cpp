#include "engine/convergence.h"

#include <algorithm>

namespace mig::engine {

std::string to_string(Decision d) {
  switch (d) {
    case Decision::next_round: return "next-round";
    case Decision::stop_converged: return "converged";
    case Decision::stop_max_rounds: return "max-rounds";
    case Decision::stop_no_progress: return "no-progress";
    case Decision::abort_no_progress: return "aborted-no-progress";
    case Decision::start_postcopy: return "start-postcopy";
  }
  return "unknown";
}

double window_bandwidth(std::span<const RoundStats> rounds, const ConvergencePolicy& policy) {
  double bytes = 0, seconds = 0;
  for (auto it = rounds.rbegin(); it != rounds.rend(); ++it) {
    bytes += static_cast<double>(it->bytes_sent);
    seconds += it->duration_s;
    if (seconds >= policy.bandwidth_window_s) break;
  }
  return seconds > 0 ? bytes / seconds : 0;
}

double expected_downtime_ms(std::span<const RoundStats> rounds, const ConvergencePolicy& policy, std::uint64_t page_size) {
  if (rounds.empty()) return 0;
  const double remaining = static_cast<double>(rounds.back().dirty_pages * page_size + rounds.back().dirty_disk_bytes);
  if (remaining == 0) return 0;
  const double bandwidth = window_bandwidth(rounds, policy);
  return bandwidth > 0 ? remaining / bandwidth * 1000 : 1e12;
}

namespace {
// The last round left at most `improve_shrink` of the pages it went through.
bool still_shrinking(const RoundStats& last, const ConvergencePolicy& policy) {
  const double went_through = static_cast<double>(last.pages_sent + last.pages_skipped);
  return static_cast<double>(last.dirty_pages) <= policy.improve_shrink * went_through;
}

// The expected downtime above which a stuck guest is worth slowing down.
double throttle_above_ms(const ConvergencePolicy& policy) {
  return policy.improve_within_target ? policy.throttle_above_ms : policy.downtime_target_ms;
}

bool can_throttle_more(const RoundStats& last, const ConvergencePolicy& policy) {
  return policy.auto_converge && last.throttle_pct < policy.throttle_max_pct;
}
}  // namespace

Decision decide(std::span<const RoundStats> rounds, const ConvergencePolicy& policy) {
  if (rounds.empty()) return Decision::next_round;
  const RoundStats& last = rounds.back();
  const double expected_ms = expected_downtime_ms(rounds, policy);
  if (expected_ms <= policy.downtime_target_ms) {
    if (!policy.improve_within_target || expected_ms <= policy.improve_floor_ms || rounds.size() >= policy.max_rounds)
      return Decision::stop_converged;
    const bool throttling_pays = expected_ms > throttle_above_ms(policy) && can_throttle_more(last, policy);
    return still_shrinking(last, policy) || throttling_pays ? Decision::next_round : Decision::stop_converged;
  }
  if (rounds.size() >= policy.max_rounds) return Decision::stop_max_rounds;
  // A stuck guest is first throttled, as far as the policy allows.
  if (can_throttle_more(last, policy)) return Decision::next_round;
  // Round 0 sends all memory, so its dirty rate says nothing about progress; judge the
  // pre-copy rounds after it.
  if (policy.no_progress_rounds > 0 && rounds.size() > policy.no_progress_rounds) {
    bool stuck = true;
    for (std::size_t i = rounds.size() - policy.no_progress_rounds; i < rounds.size(); ++i)
      stuck = stuck && rounds[i].dirty_pages >= rounds[i].pages_sent + rounds[i].pages_skipped;
    if (stuck) {
      switch (policy.on_no_convergence) {
        case NoConvergence::stop: return Decision::stop_no_progress;
        case NoConvergence::abort: return Decision::abort_no_progress;
        case NoConvergence::postcopy: return Decision::start_postcopy;
      }
    }
  }
  return Decision::next_round;
}

unsigned next_throttle_pct(std::span<const RoundStats> rounds, const ConvergencePolicy& policy) {
  if (rounds.empty()) return 0;
  const RoundStats& last = rounds.back();
  // Round 0 sends all memory: how much it left says nothing about the guest.
  const bool stuck = rounds.size() >= 2 && !still_shrinking(last, policy) &&
                     expected_downtime_ms(rounds, policy) > throttle_above_ms(policy);
  if (!policy.auto_converge || !stuck) return last.throttle_pct;
  return std::min(policy.throttle_max_pct,
                  last.throttle_pct > 0 ? last.throttle_pct + policy.throttle_step_pct : policy.throttle_initial_pct);
}

}  // namespace mig::engine
