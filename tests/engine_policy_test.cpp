// Convergence policies as tables: a history of rounds in, a decision (and throttle) out.
// Rounds last 1 s and send 1000 pages, so the link moves 4.096 MB/s and a round that leaves
// d dirty pages expects d ms of downtime.
#include <catch2/catch.hpp>

#include "engine/policy.h"
#include "fake_vm.h"

using namespace mig;
using engine::Decision;
using Catch::Matchers::Contains;

namespace {

engine::RoundStats round_of(std::uint64_t pages_sent, std::uint64_t dirty_pages) {
  engine::RoundStats r;
  r.pages_sent = pages_sent;
  r.bytes_sent = pages_sent * engine::kPageSize;
  r.duration_s = 1;
  r.dirty_pages = dirty_pages;
  return r;
}

// Rounds after a round 0 of 1000 pages: one per entry, each sending 1000 pages and leaving
// the given dirty pages.
std::vector<engine::RoundStats> leaving(std::initializer_list<std::uint64_t> dirty) {
  std::vector<engine::RoundStats> rounds{round_of(1000, 2000)};
  for (auto d : dirty) rounds.push_back(round_of(1000, d));
  return rounds;
}

struct Situation {
  std::vector<engine::RoundStats> rounds;
  std::uint64_t guest_pages = 100000;
  bool postcopy_enabled = false;
  bool can_throttle = true;
  std::uint32_t max_rounds = 30;
  bool can_limit_dirty_rate = true;
};

engine::PolicyAnswer ask(const std::string& spec, const Situation& s) {
  const auto policy = engine::PolicyRegistry::global().make(spec);
  engine::PolicyView view{s.rounds,         engine::Tunables{}, s.max_rounds, s.guest_pages, s.can_throttle, s.postcopy_enabled,
                          s.can_limit_dirty_rate};
  return policy->decide(view);
}

struct Row {
  const char* what;
  Situation situation;
  Decision expected;
  const char* rule;  // a part of the rule it names
};

void check_table(const std::string& spec, const std::vector<Row>& table) {
  for (const auto& row : table) {
    INFO(spec << ": " << row.what);
    const auto answer = ask(spec, row.situation);
    CHECK(engine::to_string(answer.decision) == engine::to_string(row.expected));
    CHECK_THAT(answer.rule, Contains(row.rule));
  }
}

}  // namespace

TEST_CASE("the registry holds every shipped policy and refuses what it does not know") {
  std::vector<std::string> names;
  for (const auto& [name, summary] : engine::PolicyRegistry::global().list()) {
    names.push_back(name);
    CHECK_FALSE(summary.empty());
  }
  CHECK(names == std::vector<std::string>{"dirty-limit", "kubevirt-stall", "mig", "ovirt-steps", "qemu", "xen"});
  auto& registry = engine::PolicyRegistry::global();
  CHECK_THROWS_WITH(registry.make("zen"), Contains("no policy 'zen'") && Contains("xen"));
  CHECK_THROWS_WITH(registry.make("xen:colour=blue"), Contains("no parameter colour"));
  CHECK_THROWS_WITH(registry.make("xen:max_rounds=abc"), Contains("max_rounds=abc is not a number"));
  CHECK_THROWS_WITH(registry.make("xen:max_rounds=0"), Contains("not a number from 1 to 1000"));
  CHECK_THROWS_WITH(registry.make("xen:min_dirty"), Contains("not key=value"));
  CHECK_THROWS_WITH(registry.make("xen:min_dirty=1,min_dirty=2"), Contains("given twice"));
  CHECK_THROWS_WITH(registry.make("ovirt-steps:steps=2:100/1:50"), Contains("STALLED rising"));
  CHECK_THROWS_WITH(registry.make("ovirt-steps:then=maybe"), Contains("not abort, stop or postcopy"));
  CHECK(registry.make("xen:max_rounds=5,min_dirty=10,max_factor=2")->name() == "xen");
}

TEST_CASE("an embedder adds a policy at run time, and it is made by name like the others") {
  struct Always final : engine::MigrationPolicy {
    std::string name() const override { return "always-stop"; }
    engine::PolicyAnswer decide(const engine::PolicyView&) const override { return {Decision::stop_converged, 0, "always"}; }
  };
  engine::PolicyRegistry::global().add("always-stop", "stops after round 0", [](engine::PolicyParameters&, const engine::ConvergencePolicy&) {
    return std::make_unique<Always>();
  });
  CHECK(ask("always-stop", {leaving({})}).decision == Decision::stop_converged);
  // Whatever a policy says, the engine ends pre-copy at the round limit.
  struct Never final : engine::MigrationPolicy {
    std::string name() const override { return "never-stop"; }
    engine::PolicyAnswer decide(const engine::PolicyView&) const override { return {Decision::next_round, 0, "never"}; }
  };
  const auto rounds = leaving({900, 900});
  const engine::PolicyView at_limit{rounds, engine::Tunables{}, 3, 100000, true, false};
  const auto limited = engine::decide_within_round_limit(Never{}, at_limit);
  CHECK(limited.decision == Decision::stop_max_rounds);
  CHECK(limited.rule == "the round limit (3)");
  const engine::PolicyView below{rounds, engine::Tunables{}, 4, 100000, true, false};
  CHECK(engine::decide_within_round_limit(Never{}, below).decision == Decision::next_round);
  CHECK_THROWS_WITH(engine::PolicyRegistry::global().make("always-stop:x=1"), Contains("no parameter x"));
}

TEST_CASE("xen: 30 rounds, under 50 dirty pages, growing rounds, or 3x memory sent") {
  auto grow = leaving({900});
  grow.push_back(round_of(1500, 900));
  std::vector<engine::RoundStats> heavy{round_of(1000, 999), round_of(999, 998), round_of(998, 997)};
  auto heavier = heavy;
  heavier.push_back(round_of(997, 996));
  check_table("xen", {
      {"round 0 left plenty", {leaving({})}, Decision::next_round, "next round"},
      {"fewer than 50 dirty pages", {leaving({49})}, Decision::stop_converged, "below 50 dirty pages"},
      {"50 dirty pages are not fewer", {leaving({50})}, Decision::next_round, "next round"},
      {"a round sent more than the one before", {grow}, Decision::stop_no_progress, "sent more than the one before"},
      {"2997 of 1000 pages sent: under 3x", {heavy, 1000}, Decision::next_round, "next round"},
      {"3994 of 1000 pages sent: over 3x", {heavier, 1000}, Decision::stop_no_progress, "sent more than 3x the memory"},
      {"the 30th round", {std::vector<engine::RoundStats>(30, round_of(100, 100))}, Decision::stop_max_rounds, "round limit"},
  });
  Situation five{std::vector<engine::RoundStats>(5, round_of(100, 100))};
  CHECK(ask("xen:max_rounds=5", five).decision == Decision::stop_max_rounds);
  CHECK(ask("xen:min_dirty=101", five).decision == Decision::stop_converged);
  CHECK(ask("xen", five).throttle_pct == 0);
}

TEST_CASE("dirty-limit: QEMU's stopping rule, and each vCPU capped from QEMU's second high period on - never throttled") {
  Situation no_ring{leaving({600})};
  no_ring.can_limit_dirty_rate = false;
  check_table("dirty-limit", {
      {"10 ms left, under the 30 ms limit", {leaving({10})}, Decision::stop_converged, "within the downtime limit"},
      {"31 ms left", {leaving({31})}, Decision::next_round, "above the downtime limit"},
      {"stuck rounds go on, as QEMU's", {leaving({900, 900, 900, 900, 900})}, Decision::next_round, "above"},
      {"mig's round limit still holds", {leaving({900, 900}), 100000, false, true, 3}, Decision::stop_max_rounds, "round limit"},
      {"a VM without per-vCPU dirty counts", no_ring, Decision::next_round, "cannot limit its vCPUs' dirty rates"},
  });
  // QEMU's trigger, as for auto-converge: round 0 (2000 dirty pages of 1000 sent) is one
  // high period, a round leaving more than 500 pages another.
  CHECK(ask("dirty-limit", {leaving({})}).dirty_limit_MBps == 0);
  CHECK(ask("dirty-limit", {leaving({400})}).dirty_limit_MBps == 0);
  CHECK(ask("dirty-limit", {leaving({600})}).dirty_limit_MBps == 1);  // vcpu-dirty-limit: 1 MB/s
  CHECK(ask("dirty-limit", {leaving({600, 10})}).dirty_limit_MBps == 1);  // once on, it stays: QEMU does not lift it
  CHECK(ask("dirty-limit:limit=25", {leaving({600})}).dirty_limit_MBps == 25);
  CHECK(ask("dirty-limit:trigger_pct=70", {leaving({600})}).dirty_limit_MBps == 0);
  CHECK(ask("dirty-limit", no_ring).dirty_limit_MBps == 0);
  CHECK(ask("dirty-limit", {leaving({600, 600, 600, 600})}).throttle_pct == 0);
  CHECK_THROWS_WITH(engine::PolicyRegistry::global().make("dirty-limit:limit=0"), Contains("not a number from"));
}

TEST_CASE("qemu: only the downtime limit stops it, and auto-converge throttles every second high period") {
  check_table("qemu", {
      {"10 ms left, under the 30 ms limit", {leaving({10})}, Decision::stop_converged, "within the downtime limit"},
      {"30 ms left: at the limit", {leaving({30})}, Decision::stop_converged, "within the downtime limit"},
      {"31 ms left", {leaving({31})}, Decision::next_round, "above the downtime limit"},
      {"stuck rounds go on: QEMU has no no-progress rule", {leaving({900, 900, 900, 900, 900})}, Decision::next_round, "above"},
      {"mig's round limit still holds", {leaving({900, 900}), 100000, false, true, 3}, Decision::stop_max_rounds, "round limit"},
  });
  // A period is high when it dirtied more than half of what it sent: more than 500 pages
  // here, and round 0 (2000 dirty pages) is one.
  CHECK(ask("qemu", {leaving({})}).throttle_pct == 0);                    // one high period
  CHECK(ask("qemu", {leaving({600})}).throttle_pct == 20);                // the second: cpu-throttle-initial
  CHECK(ask("qemu", {leaving({600, 600, 600})}).throttle_pct == 30);      // the fourth: cpu-throttle-increment
  CHECK(ask("qemu", {leaving({600, 400, 600})}).throttle_pct == 20);      // the third high period counts one
  CHECK(ask("qemu", {leaving({600, 400, 600, 400, 600})}).throttle_pct == 30);  // low periods do not reset the count
  CHECK(ask("qemu", {leaving({600}), 100000, false, false}).throttle_pct == 0);  // the VM cannot be throttled
  CHECK(ask("qemu:auto_converge=off", {leaving({600})}).throttle_pct == 0);
  CHECK(ask("qemu:trigger_pct=70", {leaving({600})}).throttle_pct == 0);  // 600 pages are under 70 %
  Situation long_stuck{leaving(std::initializer_list<std::uint64_t>{})};
  for (int i = 0; i < 40; ++i) long_stuck.rounds.push_back(round_of(1000, 900));
  long_stuck.max_rounds = 100;
  CHECK(ask("qemu", long_stuck).throttle_pct == 99);  // cpu-throttle-max
}

TEST_CASE("mig's policy is decide() and next_throttle_pct() with the live tunables") {
  for (const auto& rounds : {leaving({}), leaving({10}), leaving({900, 900, 900}), leaving({600, 500, 400})}) {
    engine::ConvergencePolicy policy;
    const auto answer = ask("mig", {rounds});
    CHECK(answer.decision == engine::decide(rounds, policy));
    CHECK(answer.throttle_pct == engine::next_throttle_pct(rounds, policy));
    CHECK_THAT(answer.rule, Contains("mig: " + engine::to_string(answer.decision)));
  }
  // A VM that cannot be throttled: stuck rounds count as no progress at once.
  const auto stuck = leaving({1000, 1000, 1000});  // each round dirtied as much as it sent
  CHECK(ask("mig", {stuck, 100000, false, true}).decision == Decision::next_round);
  CHECK(ask("mig", {stuck, 100000, false, false}).decision == Decision::stop_no_progress);
  CHECK(ask("mig:no_progress_rounds=5", {stuck, 100000, false, false}).decision == Decision::next_round);
}

TEST_CASE("kubevirt-stall: once the lows stop, switch over at the next round near the lowest") {
  check_table("kubevirt-stall", {
      {"within the target", {leaving({20})}, Decision::stop_converged, "within the downtime target"},
      {"new lows", {leaving({900, 800, 700, 600})}, Decision::next_round, "progressing"},
      {"two rounds since the low", {leaving({900, 700, 750, 760, 700})}, Decision::next_round, "progressing"},
      {"three since the low, and back near it", {leaving({900, 700, 750, 760, 770, 760})}, Decision::stop_no_progress,
       "local minimum"},
      {"three since the low, but far above it", {leaving({900, 700, 750, 760, 770, 780})}, Decision::next_round,
       "waiting for a local minimum"},
      {"a new low after the stall is the best point yet", {leaving({900, 700, 750, 760, 770, 650})}, Decision::stop_no_progress,
       "local minimum"},
      {"with post-copy, it switches to post-copy", {leaving({900, 700, 750, 760, 770, 700}), 100000, true},
       Decision::start_postcopy, "local minimum"},
  });
  CHECK(ask("kubevirt-stall:stall_rounds=4", {leaving({900, 700, 750, 760, 770, 700})}).decision == Decision::next_round);
  CHECK(ask("kubevirt-stall:slack=0.2", {leaving({900, 700, 750, 760, 770, 830})}).decision == Decision::stop_no_progress);
}

TEST_CASE("ovirt-steps: stalled rounds raise the downtime step by step, then abort") {
  check_table("ovirt-steps", {
      {"no stall: the 30 ms target", {leaving({180})}, Decision::next_round, "initial downtime"},
      {"one stalled round: 150 ms", {leaving({180, 190})}, Decision::next_round, "1 stalled -> 150 ms"},
      {"a new low resets the count", {leaving({180, 190, 170})}, Decision::next_round, "initial downtime"},
      {"two stalled rounds: 200 ms, and 185 ms fits", {leaving({180, 190, 185})}, Decision::stop_converged,
       "2 stalled -> 200 ms"},
      {"six stalled: 500 ms", {leaving({1000, 1001, 1001, 1001, 1001, 1001, 1001})}, Decision::next_round, "6 stalled -> 500 ms"},
      {"past the last step", {leaving({1000, 1001, 1001, 1001, 1001, 1001, 1001, 1001})}, Decision::abort_no_progress,
       "past the last step"},
  });
  const Situation past{leaving({1000, 1001, 1001, 1001, 1001, 1001, 1001, 1001})};
  CHECK(ask("ovirt-steps:then=stop", past).decision == Decision::stop_no_progress);
  CHECK(ask("ovirt-steps:then=postcopy", past).decision == Decision::start_postcopy);
  CHECK(ask("ovirt-steps:steps=1:2000", {leaving({1000, 1001})}).decision == Decision::stop_converged);
}

TEST_CASE("a migration runs under the policy it is given, and says which rule stopped it") {
  test::FakeVm source({256});
  for (std::uint64_t p = 0; p < 256; ++p) source.write(0, p, p + 1);
  engine::SenderOptions options;
  options.policy_plugin = engine::PolicyRegistry::global().make("xen:min_dirty=1000");
  auto [sent, received, destination] = test::migrate_fake(source, options);
  REQUIRE(sent.status == engine::MigrationStatus::completed);
  CHECK(sent.policy == "xen");
  CHECK(sent.rounds == 2);  // round 0, then the final round: under 1000 dirty pages at once
  CHECK_THAT(sent.stop_rule, Contains("below 1000 dirty pages"));
  CHECK(received.stats.status == engine::MigrationStatus::completed);
  CHECK(destination != nullptr);

  test::FakeVm thrashing({256});
  for (std::uint64_t p = 0; p < 256; ++p) thrashing.write(0, p, p + 1);
  thrashing.thrash = true;
  options.policy.downtime_target_ms = 0;  // the steps alone raise it
  options.policy_plugin = engine::PolicyRegistry::global().make("ovirt-steps:steps=1:0.001,then=abort");
  auto aborted = test::migrate_fake(thrashing, options).sent;
  CHECK(aborted.status == engine::MigrationStatus::failed);
  CHECK_THAT(aborted.error, Contains("past the last step") && Contains("ovirt-steps"));
  CHECK_FALSE(thrashing.paused());
}
