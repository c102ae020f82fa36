// The convergence policy as a table: inputs are round statistics, output is the decision.
#include <catch2/catch.hpp>
#include <vector>

#include "engine/convergence.h"

using namespace mig::engine;

namespace {
// A round that sent `mb` megabytes in `seconds` and then found `dirty_pages` dirty.
RoundStats round_of(double mb, double seconds, std::uint64_t dirty_pages) {
  RoundStats r;
  r.bytes_sent = static_cast<std::uint64_t>(mb * 1e6);
  r.pages_sent = r.bytes_sent / 4096;
  r.duration_s = seconds;
  r.dirty_pages = dirty_pages;
  r.bandwidth_Bps = static_cast<double>(r.bytes_sent) / seconds;
  r.dirty_rate_Bps = static_cast<double>(dirty_pages * 4096) / seconds;
  return r;
}

RoundStats throttled(RoundStats r, unsigned pct) {
  r.throttle_pct = pct;
  return r;
}
}  // namespace

TEST_CASE("convergence decisions") {
  ConvergencePolicy defaults;  // 30 ms, 30 rounds, 3 rounds without progress, stop, improve within, auto-converge
  ConvergencePolicy improving = defaults;  // improve within the target, never throttle
  improving.auto_converge = false;
  ConvergencePolicy policy = improving;  // the target alone decides
  policy.improve_within_target = false;
  ConvergencePolicy abort_policy = policy;
  abort_policy.on_no_convergence = NoConvergence::abort;
  // 1 GB/s links throughout: 30 ms of downtime is 30 MB, about 7324 pages.
  const auto converging = round_of(1000, 1.0, 100);
  const auto just_inside = round_of(1000, 1.0, 7300);
  const auto just_outside = round_of(1000, 1.0, 7400);
  const auto stuck = round_of(100, 0.1, 30000);  // 1 GB/s sent, 1.2 GB/s dirtied

  struct Row {
    const char* what;
    std::vector<RoundStats> rounds;
    ConvergencePolicy policy;
    Decision expected;
  };
  const std::vector<Row> table = {
      {"nothing yet", {}, policy, Decision::next_round},
      {"round 0 left little dirty", {converging}, policy, Decision::stop_converged},
      {"nothing dirty at all", {round_of(1000, 1.0, 0)}, policy, Decision::stop_converged},
      {"expected downtime just inside the target", {just_inside}, policy, Decision::stop_converged},
      {"expected downtime just outside the target", {just_outside}, policy, Decision::next_round},
      {"round cap reached", std::vector<RoundStats>(30, just_outside), policy, Decision::stop_max_rounds},
      {"one round short of the cap", std::vector<RoundStats>(29, just_outside), policy, Decision::next_round},
      {"stuck for 3 rounds after round 0", {just_outside, stuck, stuck, stuck}, policy, Decision::stop_no_progress},
      {"stuck for 3 rounds, abort policy", {just_outside, stuck, stuck, stuck}, abort_policy, Decision::abort_no_progress},
      {"stuck for only 2 rounds", {just_outside, just_outside, stuck, stuck}, policy, Decision::next_round},
      {"round 0 alone never counts as stuck", {stuck, stuck, stuck}, policy, Decision::next_round},
      // 5000 pages in round 0, then a round through 4882 pages (20 MB) at 1 GB/s.
      {"improving: within the target and the last round left 61% of its pages",
       {round_of(1000, 1.0, 5000), round_of(20, 0.02, 3000)}, improving, Decision::next_round},
      {"improving: within the target and the last round left 92% of its pages",
       {round_of(1000, 1.0, 5000), round_of(20, 0.02, 4500)}, improving, Decision::stop_converged},
      {"auto-converge: within the target - not shrinking - throttling can still help",
       {round_of(1000, 1.0, 5000), round_of(20, 0.02, 4500)}, defaults, Decision::next_round},
      {"auto-converge: within the target - not shrinking - below 5 ms expected",
       {round_of(1000, 1.0, 5000), round_of(4, 0.004, 950)}, defaults, Decision::stop_converged},
      {"auto-converge: within the target - not shrinking - at the maximum throttle",
       {round_of(1000, 1.0, 5000), throttled(round_of(20, 0.02, 4500), 99)}, defaults, Decision::stop_converged},
      {"auto-converge: stuck outside the target - throttle first", {just_outside, stuck, stuck, stuck}, defaults,
       Decision::next_round},
      {"auto-converge: stuck outside the target at the maximum throttle",
       {just_outside, throttled(stuck, 80), throttled(stuck, 90), throttled(stuck, 99)}, defaults,
       Decision::stop_no_progress},
      {"improving: below the 1 ms floor", {round_of(1000, 1.0, 5000), round_of(20, 0.02, 200)}, improving,
       Decision::stop_converged},
      {"improving: round 0 alone may earn another round", {just_inside}, improving, Decision::next_round},
      {"improving: nothing left", {round_of(1000, 1.0, 5000), round_of(20, 0.02, 0)}, improving, Decision::stop_converged},
      {"improving: not past the round cap", std::vector<RoundStats>(30, round_of(1000, 1.0, 5000)), improving,
       Decision::stop_converged},
      {"improving: outside the target it changes nothing", {just_outside}, improving, Decision::next_round},
      {"at the target the rounds that improve stop", {round_of(1000, 1.0, 5000), round_of(20, 0.02, 3000)}, policy,
       Decision::stop_converged},
  };
  for (const auto& row : table) {
    INFO(row.what);
    CHECK(to_string(decide(row.rounds, row.policy)) == to_string(row.expected));
  }
}

TEST_CASE("auto-converge raises the throttle only while rounds stop paying") {
  ConvergencePolicy policy;  // 20 % first, +10 % per round, at most 99 %
  const auto round0 = round_of(1000, 1.0, 5000);
  const auto shrinking = round_of(20, 0.02, 3000);  // left 61 % of 4882 pages, 12 ms expected
  const auto flat = round_of(20, 0.02, 4800);       // left 98 %
  auto next = [&](std::vector<RoundStats> rounds) { return next_throttle_pct(rounds, policy); };
  CHECK(next({}) == 0);
  CHECK(next({round0}) == 0);  // round 0 says nothing about the guest
  CHECK(next({round0, shrinking}) == 0);
  CHECK(next({round0, flat}) == 20);
  CHECK(next({round0, throttled(flat, 20)}) == 30);
  CHECK(next({round0, throttled(shrinking, 30)}) == 30);  // kept, not raised
  CHECK(next({round0, throttled(flat, 90)}) == 99);
  CHECK(next({round0, throttled(flat, 99)}) == 99);
  // Below 5 ms expected the guest is not worth slowing: 1200 of 4882 pages left, 4.9 ms.
  CHECK(next({round0, round_of(20, 0.02, 1200)}) == 0);
  // Only the target decides: within it, no throttle.
  policy.improve_within_target = false;
  CHECK(next({round0, flat}) == 0);
  policy.auto_converge = false;
  CHECK(next({round0, round_of(100, 0.1, 30000)}) == 0);
}

TEST_CASE("bandwidth is measured over a recent window - not the whole run") {
  ConvergencePolicy policy;
  policy.bandwidth_window_s = 0.25;
  // A slow first second, then fast recent rounds: the estimate follows the recent ones.
  std::vector<RoundStats> rounds = {round_of(100, 1.0, 0), round_of(200, 0.1, 0), round_of(200, 0.1, 0), round_of(200, 0.1, 0)};
  CHECK(window_bandwidth(rounds, policy) == Approx(2e9));
  // Tiny recent rounds are pooled with earlier ones until the window is covered.
  rounds = {round_of(1000, 1.0, 0), round_of(1, 0.001, 0)};
  CHECK(window_bandwidth(rounds, policy) == Approx(1001e6 / 1.001));
  rounds.back().dirty_pages = 2441;  // 10 MB left at ~1 GB/s
  CHECK(expected_downtime_ms(rounds, policy) == Approx(10.0).epsilon(0.01));
}
