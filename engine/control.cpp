#include "engine/control.h"

#include <utility>

namespace mig::engine {

MigrationControl::MigrationControl(Tunables tunables, MigrationObserver observer)
    : observer_(std::move(observer)), tunables_(tunables), bandwidth_limit_(tunables.bandwidth_limit) {}

bool MigrationControl::cancel() {
  {
    std::lock_guard lock(mutex_);
    if (committed_ || is_finished(status_) || status_ == MigrationStatus::cancelling) return false;
    status_ = MigrationStatus::cancelling;
    cancel_requested_ = true;
  }
  if (observer_.status_changed) observer_.status_changed(MigrationStatus::cancelling);
  return true;
}

void MigrationControl::set_downtime_target(double ms) {
  std::lock_guard lock(mutex_);
  tunables_.downtime_target_ms = ms;
}

void MigrationControl::set_bandwidth(double bytes_per_second) { bandwidth_limit_ = bytes_per_second; }

void MigrationControl::set_tunables(const Tunables& tunables) {
  std::lock_guard lock(mutex_);
  tunables_ = tunables;
  bandwidth_limit_ = tunables.bandwidth_limit;
}

Tunables MigrationControl::tunables() const {
  std::lock_guard lock(mutex_);
  Tunables t = tunables_;
  t.bandwidth_limit = bandwidth_limit_;
  return t;
}

void MigrationControl::force_switchover() { switchover_forced_ = true; }

bool MigrationControl::start_postcopy() {
  std::lock_guard lock(mutex_);
  if (!postcopy_enabled_ || committed_ || is_finished(status_) || status_ == MigrationStatus::cancelling) return false;
  postcopy_requested_ = true;
  return true;
}

bool MigrationControl::resume_postcopy(std::function<transport::Stream()> connect) {
  {
    std::lock_guard lock(mutex_);
    if (status_ != MigrationStatus::postcopy_paused || recovery_) return false;
    recovery_ = std::move(connect);
  }
  finished_.notify_all();
  return true;
}

void MigrationControl::abandon() {
  {
    std::lock_guard lock(mutex_);
    abandoned_ = true;
  }
  finished_.notify_all();
}

std::function<transport::Stream()> MigrationControl::wait_for_recovery() {
  std::unique_lock lock(mutex_);
  finished_.wait(lock, [&] { return recovery_ || abandoned_; });
  if (abandoned_) return {};
  return std::exchange(recovery_, nullptr);
}

MigrationStatus MigrationControl::status() const {
  std::lock_guard lock(mutex_);
  return status_;
}

MigrationStatus MigrationControl::wait_finished(std::chrono::milliseconds timeout) const {
  std::unique_lock lock(mutex_);
  finished_.wait_for(lock, timeout, [&] { return is_finished(status_); });
  return status_;
}

MigrationProgress MigrationControl::progress() const {
  std::lock_guard lock(mutex_);
  MigrationProgress p = progress_;
  p.status = status_;
  if (!p.result)
    p.elapsed_ms = started_at_ == std::chrono::steady_clock::time_point{}
                       ? 0
                       : std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started_at_).count();
  p.bytes_sent = bytes_sent_;
  p.precopy_bytes = precopy_bytes_;
  p.downtime_bytes = downtime_bytes_;
  p.pages_sent = pages_sent_;
  p.pages_zero = pages_zero_;
  p.pages_skipped = pages_skipped_;
  p.pages_remaining = pages_remaining_;
  p.dirty_syncs = dirty_syncs_;
  return p;
}

bool MigrationControl::advance(MigrationStatus expected, MigrationStatus desired) {
  {
    std::lock_guard lock(mutex_);
    if (status_ != expected) return false;
    status_ = desired;
  }
  if (is_finished(desired)) finished_.notify_all();
  if (observer_.status_changed) observer_.status_changed(desired);
  return true;
}

void MigrationControl::update_postcopy(const PostcopyStats& stats, std::string error) {
  std::lock_guard lock(mutex_);
  progress_.postcopy = stats;
  progress_.error = std::move(error);
}

void MigrationControl::update_disk(const DiskStats& stats) {
  std::lock_guard lock(mutex_);
  progress_.disk = stats;
}

bool MigrationControl::begin_commit() {
  std::lock_guard lock(mutex_);
  if (status_ == MigrationStatus::cancelling) return false;
  committed_ = true;
  return true;
}

void MigrationControl::set_phase(Phase phase) {
  std::lock_guard lock(mutex_);
  progress_.phase = phase;
}

void MigrationControl::started(std::uint64_t guest_bytes) {
  std::lock_guard lock(mutex_);
  started_at_ = std::chrono::steady_clock::now();
  progress_.guest_bytes = guest_bytes;
}

void MigrationControl::set_setup_done() {
  std::lock_guard lock(mutex_);
  progress_.setup_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started_at_).count();
}

void MigrationControl::count_batch(std::uint64_t bytes, std::uint64_t pages_sent, std::uint64_t pages_zero,
                                   std::uint64_t pages_skipped, bool guest_paused) {
  bytes_sent_ += bytes;
  (guest_paused ? downtime_bytes_ : precopy_bytes_) += bytes;
  pages_sent_ += pages_sent;
  pages_zero_ += pages_zero;
  pages_skipped_ += pages_skipped;
  // Saturating: the count pending is taken before the round, pages found after it are not.
  const std::uint64_t done = pages_sent + pages_skipped;
  std::uint64_t left = pages_remaining_.load();
  while (!pages_remaining_.compare_exchange_weak(left, left > done ? left - done : 0)) {
  }
}

void MigrationControl::round_started(std::uint64_t pages_pending) { pages_remaining_ = pages_pending; }

void MigrationControl::round_finished(const RoundStats& round) {
  {
    std::lock_guard lock(mutex_);
    progress_.rounds.push_back(round);
  }
  pages_remaining_ = round.dirty_pages;
  if (observer_.round_finished) observer_.round_finished(round);
}

void MigrationControl::finish(const MigrationStats& stats) {
  MigrationStatus before;
  {
    std::lock_guard lock(mutex_);
    progress_.result = stats;
    progress_.elapsed_ms = stats.total_ms;
    progress_.phase = Phase::finished;
    if (stats.status == MigrationStatus::completed) pages_remaining_ = 0;
    before = status_;
    status_ = stats.status;
  }
  finished_.notify_all();
  if (before != stats.status && observer_.status_changed) observer_.status_changed(stats.status);
}

}  // namespace mig::engine
