// Steering a migration through its MigrationControl: cancel in each phase, a new downtime
// target or a forced switchover at a round boundary, and the status sequence observers see.
#include <catch2/catch.hpp>
#include <future>
#include <thread>

#include "tests/fake_vm.h"

using namespace mig;
using namespace std::chrono_literals;
using Catch::Matchers::Contains;
using engine::MigrationStatus;

namespace {

constexpr std::uint64_t kPages = 4096;  // 16 MiB

void fill(test::FakeVm& vm) {
  for (std::uint64_t p = 0; p < kPages; p += 3) vm.write(0, p, p * 7 + 1);
}

// Every round finds these 64 pages dirty again, so only the policy (or the operator) stops
// the rounds: with a target of 0 ms they go on to max_rounds.
void dirty_64_pages_per_round(test::FakeVm& vm) {
  std::uint64_t value = 1;
  vm.before_fetch = [value](test::FakeVm& v) mutable {
    for (std::uint64_t p = 0; p < 64; ++p) v.write(0, p * 5, value++);
  };
}

engine::SenderOptions endless_rounds(std::uint32_t max_rounds) {
  engine::SenderOptions options;
  options.policy.downtime_target_ms = 0;
  options.policy.max_rounds = max_rounds;
  return options;
}

// The source runs on, as before, and can be migrated again afterwards.
void require_source_intact(test::FakeVm& source) {
  CHECK_FALSE(source.paused());
  CHECK(source.pauses == source.resumes);
  auto again = test::migrate_fake(source, engine::SenderOptions{});
  INFO(again.sent.error << " / " << again.received.stats.error);
  REQUIRE(again.sent.status == MigrationStatus::completed);
  REQUIRE(again.destination != nullptr);
  CHECK(again.destination->region_memory(0) == source.region_memory(0));
}

void require_cancelled(const test::FakeMigration& m) {
  INFO(m.sent.error << " / " << m.received.stats.error);
  CHECK(m.sent.status == MigrationStatus::cancelled);
  CHECK_THAT(m.sent.error, Contains("cancelled"));
  // The destination hears of it as an Error frame, or - when the cancel cut a page batch
  // short - as a connection closed mid-frame. Either way it discards the guest.
  CHECK(m.received.stats.status == MigrationStatus::failed);
  CHECK_THAT(m.received.stats.error, Contains("cancelled") || Contains("closed the connection mid-stream"));
  CHECK(m.received.vm == nullptr);
}

}  // namespace

TEST_CASE("cancel before round 0 ends: the source runs on and migrates later") {
  test::FakeVm source({kPages});
  fill(source);
  engine::SenderOptions options;
  options.bandwidth_limit = 1e6;  // round 0 would take about 3.5 s (5.6 MB, the first 2 MiB a burst)
  auto control = std::make_shared<engine::MigrationControl>(options.tunables());
  auto canceller = std::async(std::launch::async, [&] {
    while (control->progress().bytes_sent < 100'000) std::this_thread::sleep_for(1ms);
    return control->cancel();
  });
  const auto started = std::chrono::steady_clock::now();
  auto m = test::migrate_fake(source, options, control);
  const auto took = std::chrono::steady_clock::now() - started;
  CHECK(canceller.get());
  require_cancelled(m);
  CHECK(m.sent.failed_phase == engine::Phase::precopy);
  CHECK(m.sent.round_table.empty());  // round 0 never finished
  CHECK(took < 1500ms);               // it did not wait the round out
  CHECK(control->status() == MigrationStatus::cancelled);
  CHECK_FALSE(control->cancel());  // over: nothing left to cancel
  require_source_intact(source);
}

TEST_CASE("cancel mid-round on a bandwidth-limited link does not wait the round out") {
  test::FakeVm source({kPages});
  fill(source);
  std::uint64_t value = 1;
  source.before_fetch = [&value](test::FakeVm& v) {  // 8 MiB dirty again every round
    for (std::uint64_t p = 0; p < 2048; ++p) v.write(0, p * 2, value++);
  };
  auto options = endless_rounds(30);
  engine::MigrationObserver observer;
  std::shared_ptr<engine::MigrationControl> control;
  // From round 2 on, the link crawls at 1 MB/s: a round then takes about 6 s.
  observer.round_finished = [&](const engine::RoundStats& r) {
    if (r.round == 1) control->set_bandwidth(1e6);
  };
  control = std::make_shared<engine::MigrationControl>(options.tunables(), observer);
  auto canceller = std::async(std::launch::async, [&] {
    while (control->progress().rounds.size() < 2) std::this_thread::sleep_for(1ms);
    std::this_thread::sleep_for(300ms);  // well inside round 2
    const auto asked = std::chrono::steady_clock::now();
    CHECK(control->cancel());
    return asked;
  });
  auto m = test::migrate_fake(source, options, control);
  const auto cancelled_after = std::chrono::steady_clock::now() - canceller.get();
  require_cancelled(m);
  CHECK(m.sent.failed_phase == engine::Phase::precopy);
  CHECK(m.sent.round_table.size() == 2);
  CHECK(cancelled_after < 2s);
  require_source_intact(source);
}

TEST_CASE("cancel during stop-and-copy resumes the source and the destination discards") {
  test::FakeVm source({kPages});
  fill(source);
  dirty_64_pages_per_round(source);
  engine::MigrationObserver observer;
  std::shared_ptr<engine::MigrationControl> control;
  bool cancelled_while_paused = false;
  // The moment the source pauses the guest for the switchover.
  observer.guest_paused = [&] { cancelled_while_paused = control->cancel(); };
  engine::SenderOptions options;
  control = std::make_shared<engine::MigrationControl>(options.tunables(), observer);
  auto m = test::migrate_fake(source, options, control);
  CHECK(cancelled_while_paused);
  require_cancelled(m);
  CHECK(m.sent.failed_phase >= engine::Phase::stop_and_copy);
  CHECK(m.sent.failed_phase <= engine::Phase::commit);
  require_source_intact(source);
}

TEST_CASE("after the commit a cancel is refused and the migration completes") {
  test::FakeVm source({kPages});
  fill(source);
  engine::MigrationObserver observer;
  std::shared_ptr<engine::MigrationControl> control;
  bool refused = false;
  observer.status_changed = [&](MigrationStatus s) {
    if (s == MigrationStatus::completed) refused = !control->cancel();
  };
  engine::SenderOptions options;
  control = std::make_shared<engine::MigrationControl>(options.tunables(), observer);
  auto m = test::migrate_fake(source, options, control);
  REQUIRE(m.sent.status == MigrationStatus::completed);
  CHECK(refused);
  CHECK(source.paused());
}

TEST_CASE("a new downtime target takes effect at the next round boundary") {
  // Without a change, these rounds go on to the cap.
  {
    test::FakeVm source({kPages});
    fill(source);
    dirty_64_pages_per_round(source);
    auto m = test::migrate_fake(source, endless_rounds(12));
    REQUIRE(m.sent.status == MigrationStatus::completed);
    CHECK(m.sent.stop_reason == engine::StopReason::max_rounds);
    CHECK(m.sent.round_table.size() == 12);
  }
  // Raised at the end of round 3: the decision after round 3 already uses it.
  test::FakeVm source({kPages});
  fill(source);
  dirty_64_pages_per_round(source);
  auto options = endless_rounds(12);
  engine::MigrationObserver observer;
  std::shared_ptr<engine::MigrationControl> control;
  observer.round_finished = [&](const engine::RoundStats& r) {
    if (r.round == 3) control->set_downtime_target(1000);
  };
  control = std::make_shared<engine::MigrationControl>(options.tunables(), observer);
  auto m = test::migrate_fake(source, options, control);
  REQUIRE(m.sent.status == MigrationStatus::completed);
  CHECK(m.sent.stop_reason == engine::StopReason::converged);
  CHECK(m.sent.round_table.size() == 4);
  CHECK(control->tunables().downtime_target_ms == 1000);
  REQUIRE(m.destination != nullptr);
  CHECK(m.destination->region_memory(0) == source.region_memory(0));
}

TEST_CASE("a forced switchover stops pre-copy at the next round boundary") {
  test::FakeVm source({kPages});
  fill(source);
  dirty_64_pages_per_round(source);
  auto options = endless_rounds(30);
  engine::MigrationObserver observer;
  std::shared_ptr<engine::MigrationControl> control;
  observer.round_finished = [&](const engine::RoundStats& r) {
    if (r.round == 2) control->force_switchover();
  };
  control = std::make_shared<engine::MigrationControl>(options.tunables(), observer);
  auto m = test::migrate_fake(source, options, control);
  REQUIRE(m.sent.status == MigrationStatus::completed);
  CHECK(m.sent.stop_reason == engine::StopReason::forced);
  CHECK(m.sent.round_table.size() == 3);
}

TEST_CASE("observers see setup - active - device - completed and every round") {
  test::FakeVm source({kPages});
  fill(source);
  dirty_64_pages_per_round(source);
  std::vector<MigrationStatus> statuses;
  std::vector<std::uint32_t> rounds;
  int paused = 0, resumed = 0;
  engine::MigrationObserver observer{[&](MigrationStatus s) { statuses.push_back(s); },
                                     [&](const engine::RoundStats& r) { rounds.push_back(r.round); }, [&] { ++paused; },
                                     [&] { ++resumed; }};
  auto options = endless_rounds(5);
  auto control = std::make_shared<engine::MigrationControl>(options.tunables(), observer);
  auto m = test::migrate_fake(source, options, control);
  REQUIRE(m.sent.status == MigrationStatus::completed);
  CHECK(statuses == std::vector{MigrationStatus::setup, MigrationStatus::active, MigrationStatus::device, MigrationStatus::completed});
  CHECK(rounds == std::vector<std::uint32_t>{0, 1, 2, 3, 4});
  CHECK(paused == 1);
  CHECK(resumed == 0);
  const auto progress = control->progress();
  CHECK(progress.status == MigrationStatus::completed);
  CHECK(progress.pages_remaining == 0);
  CHECK(progress.bytes_sent == m.sent.bytes_sent);
  CHECK(progress.downtime_bytes > 0);
  CHECK(progress.precopy_bytes + progress.downtime_bytes == progress.bytes_sent);
  CHECK(progress.dirty_syncs == 6);  // one per pre-copy round, one in the pause
  REQUIRE(progress.result.has_value());
}

TEST_CASE("a failure names the phase it happened in") {
  test::FakeVm source({kPages});
  fill(source);
  engine::SenderOptions options;
  options.policy.on_no_convergence = engine::NoConvergence::abort;
  options.policy.downtime_target_ms = 0;
  options.policy.no_progress_rounds = 2;
  options.policy.auto_converge = false;
  source.thrash = true;
  auto m = test::migrate_fake(source, options);
  CHECK(m.sent.status == MigrationStatus::failed);
  CHECK(m.sent.failed_phase == engine::Phase::precopy);
  CHECK_THAT(m.sent.error, Contains("pre-copy: ") && Contains("no progress"));
  CHECK_FALSE(source.paused());
}

TEST_CASE("a failure to stop dirty logging after Running leaves the migration completed") {
  test::FakeVm source({kPages});
  fill(source);
  source.fail_stop_dirty_log = true;
  auto m = test::migrate_fake(source, engine::SenderOptions{});
  INFO(m.sent.error);
  CHECK(m.sent.status == MigrationStatus::completed);
  CHECK(m.received.stats.status == MigrationStatus::completed);
  CHECK(source.paused());  // and the guest stays where it went
}

TEST_CASE("a slow bandwidth limit paces in slices - the receiver never waits out its timeout") {
  // 2.4 MB at 100 KB/s: past the 2 MiB burst, 0.3 MB take 3 s. Paced a whole 1 MiB batch at
  // a time, the receiver (2 s timeout) would hear nothing for those 3 s.
  test::FakeVm source({1024});
  for (std::uint64_t p = 0; p < 600; ++p) source.write(0, p, p + 1);
  engine::SenderOptions options;
  options.bandwidth_limit = 100e3;
  auto m = test::migrate_fake(source, options);
  INFO(m.sent.error << " / " << m.received.stats.error);
  REQUIRE(m.sent.status == MigrationStatus::completed);
  CHECK(m.destination->region_memory(0) == source.region_memory(0));
}
