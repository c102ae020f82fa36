// The handle through which anyone outside a migration observes and steers it: cancel, new
// downtime target or bandwidth, forced switchover, and a progress snapshot. Thread-safe; the
// migration's phases read it at round boundaries and between page batches.
//
// Status changes follow QEMU's MigrationStatus (one compare-and-set, so a cancel from another
// thread wins cleanly):
//
//   setup ──▶ active ──▶ device ──▶ completed
//     │         │          │   └──▶ handoff-unknown   (the link broke after Commit)
//     │         │          └──▶ postcopy-active ──▶ completed
//     │         │                  ▲        └──▶ postcopy-paused ──▶ failed (given up)
//     │         │                  └─ postcopy-recover ◀─┘
//     └─────────┴──────────┴──▶ failed
//     └─────────┴──────────┴──▶ cancelling ──▶ cancelled
//
// `device` is the stop-and-copy: the guest is paused and its last pages and state travel.
// A cancel is honoured until the source sends Commit; after that the destination may run the
// guest, and cancel() says no. After a post-copy switchover neither side holds the whole
// guest: a broken link pauses the migration (postcopy-paused) until resume_postcopy() gives
// it a new way to the destination, or abandon() gives the guest up.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "../engine/convergence.h"
#include "../engine/stats.h"
#include "../transport/stream.h"

namespace mig::engine {

// What can be changed while a migration runs. A change takes effect at the next round
// boundary; the bandwidth limit at the next page batch, so that lifting it does not wait out
// a round paced by the old one.
struct Tunables {
  double downtime_target_ms = 30;
  double bandwidth_limit = 0;  // bytes per second of pre-copy page data; 0 = unlimited
  unsigned throttle_initial_pct = 20;
  unsigned throttle_step_pct = 10;
  unsigned throttle_max_pct = 99;
  friend bool operator==(const Tunables&, const Tunables&) = default;
};

// A consistent picture of a migration at one instant, for query-migrate and progress lines.
struct MigrationProgress {
  MigrationStatus status = MigrationStatus::none;
  Phase phase = Phase::setup;
  double elapsed_ms = 0;
  double setup_ms = 0;              // connect until the first page could go
  std::uint64_t guest_bytes = 0;
  std::uint64_t bytes_sent = 0;     // all wire bytes so far, every channel; never decreases
  std::uint64_t precopy_bytes = 0;  // of which while the guest ran
  std::uint64_t downtime_bytes = 0; // of which while it was paused
  std::uint64_t pages_sent = 0;     // with their contents
  std::uint64_t pages_zero = 0;     // sent as zero pages (QEMU's "duplicate")
  std::uint64_t pages_skipped = 0;  // unchanged since their last send
  std::uint64_t pages_remaining = 0;  // still to go in this round, plus dirtied since
  std::uint32_t dirty_syncs = 0;    // dirty-log fetches so far
  std::vector<RoundStats> rounds;   // finished pre-copy rounds: the last says the expected downtime and throttle
  std::optional<PostcopyStats> postcopy;  // since a switchover to post-copy
  std::optional<DiskStats> disk;          // when the guest has disks
  std::string error;  // while postcopy-paused: why the link broke, and what to do
  std::optional<MigrationStats> result;  // once finished
};

// Called on the migration's own thread; a callback must not call back into the migration.
struct MigrationObserver {
  std::function<void(MigrationStatus)> status_changed;
  std::function<void(const RoundStats&)> round_finished;
  std::function<void()> guest_paused;   // the source stopped the guest for the switchover
  std::function<void()> guest_resumed;  // ... and had to start it again (failure, cancel)
};

// Thrown inside a migration when MigrationControl::cancel() was asked for.
struct MigrationCancelled : std::runtime_error {
  MigrationCancelled() : std::runtime_error("migration cancelled") {}
};

class MigrationControl {
 public:
  explicit MigrationControl(Tunables tunables = {}, MigrationObserver observer = {});
  MigrationControl(const MigrationControl&) = delete;
  MigrationControl& operator=(const MigrationControl&) = delete;

  // --- for whoever steers the migration ---------------------------------------------------
  // Asks the migration to stop and resume the source. False when it is too late (Commit
  // sent) or the migration already ended.
  bool cancel();
  void set_downtime_target(double ms);
  void set_bandwidth(double bytes_per_second);
  void set_tunables(const Tunables& tunables);
  Tunables tunables() const;
  // Stop pre-copying at the next round boundary, whatever the policy says.
  void force_switchover();
  // Switch to post-copy as soon as round 0 is done (migrate-start-postcopy). False when the
  // migration does not have post-copy enabled, or is past the point where it could switch.
  bool start_postcopy();
  // Post-copy recovery: reconnects a postcopy-paused migration through `connect` (each call
  // opens one connection to the destination's recovery address). False unless paused.
  bool resume_postcopy(std::function<transport::Stream()> connect);
  // Gives up a postcopy-paused migration (the owner quits): it ends as failed, and the guest
  // is lost unless the destination holds every page.
  void abandon();
  MigrationProgress progress() const;
  MigrationStatus status() const;
  // Blocks until the migration has ended (or `timeout`); returns its final status.
  MigrationStatus wait_finished(std::chrono::milliseconds timeout) const;

  // --- for the migration itself ----------------------------------------------------------
  // The one way to change status: from `expected` to `desired`, or not at all (returns
  // false, e.g. when a cancel got there first).
  bool advance(MigrationStatus expected, MigrationStatus desired);
  bool cancel_requested() const { return cancel_requested_.load(std::memory_order_relaxed); }
  // The bandwidth limit as of now, read before every page batch.
  double bandwidth_limit() const { return bandwidth_limit_.load(std::memory_order_relaxed); }
  bool switchover_forced() const { return switchover_forced_.load(std::memory_order_relaxed); }
  // Lets start_postcopy() ask: the migration offers post-copy (make_control, at its start).
  void enable_postcopy() { postcopy_enabled_ = true; }
  bool postcopy_requested() const { return postcopy_requested_.load(std::memory_order_relaxed); }
  // Blocks while postcopy-paused until resume_postcopy() (returns its connect) or abandon()
  // (returns an empty function).
  std::function<transport::Stream()> wait_for_recovery();
  // The point of no return: after this, cancel() refuses. False when a cancel came first.
  bool begin_commit();
  void set_phase(Phase phase);
  void started(std::uint64_t guest_bytes);
  void set_setup_done();
  // Page batches as they leave (any channel's thread).
  void count_batch(std::uint64_t bytes, std::uint64_t pages_sent, std::uint64_t pages_zero, std::uint64_t pages_skipped,
                   bool guest_paused);
  void round_started(std::uint64_t pages_pending);
  void round_finished(const RoundStats& round);
  void count_dirty_sync() { ++dirty_syncs_; }
  void update_postcopy(const PostcopyStats& stats, std::string error = {});
  void update_disk(const DiskStats& stats);
  // The outcome; called again to add what was learnt after it (the guest's downtime).
  void finish(const MigrationStats& stats);
  const MigrationObserver& observer() const { return observer_; }

 private:
  const MigrationObserver observer_;
  mutable std::mutex mutex_;
  mutable std::condition_variable finished_;
  MigrationStatus status_ = MigrationStatus::none;
  bool committed_ = false;
  Tunables tunables_;  // but for the bandwidth limit, which lives in bandwidth_limit_
  MigrationProgress progress_;  // the parts that change only at phase and round boundaries
  std::chrono::steady_clock::time_point started_at_{};
  std::atomic<bool> cancel_requested_{false}, switchover_forced_{false};
  std::atomic<bool> postcopy_enabled_{false}, postcopy_requested_{false};
  std::function<transport::Stream()> recovery_;
  bool abandoned_ = false;
  std::atomic<double> bandwidth_limit_{0};
  std::atomic<std::uint64_t> bytes_sent_{0}, precopy_bytes_{0}, downtime_bytes_{0};
  std::atomic<std::uint64_t> pages_sent_{0}, pages_zero_{0}, pages_skipped_{0}, pages_remaining_{0};
  std::atomic<std::uint32_t> dirty_syncs_{0};
};

}  // namespace mig::engine
