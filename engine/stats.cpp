#include "engine/stats.h"

#include <algorithm>
#include <bit>

namespace mig::engine {

const char* to_string(MigrationStatus status) {
  switch (status) {
    case MigrationStatus::none: return "none";
    case MigrationStatus::setup: return "setup";
    case MigrationStatus::active: return "active";
    case MigrationStatus::device: return "device";
    case MigrationStatus::postcopy_active: return "postcopy-active";
    case MigrationStatus::postcopy_paused: return "postcopy-paused";
    case MigrationStatus::postcopy_recover: return "postcopy-recover";
    case MigrationStatus::completed: return "completed";
    case MigrationStatus::failed: return "failed";
    case MigrationStatus::cancelling: return "cancelling";
    case MigrationStatus::cancelled: return "cancelled";
    case MigrationStatus::handoff_unknown: return "handoff-unknown";
  }
  return "unknown";
}

bool is_finished(MigrationStatus status) {
  return status == MigrationStatus::completed || status == MigrationStatus::failed ||
         status == MigrationStatus::cancelled || status == MigrationStatus::handoff_unknown;
}

const char* to_string(Phase phase) {
  switch (phase) {
    case Phase::setup: return "setup";
    case Phase::precopy: return "pre-copy";
    case Phase::stop_and_copy: return "stop-and-copy";
    case Phase::device_state: return "device-state";
    case Phase::awaiting_ready: return "awaiting-ready";
    case Phase::commit: return "commit";
    case Phase::postcopy: return "post-copy";
    case Phase::finished: return "finished";
  }
  return "unknown";
}

const char* to_string(StopReason reason) {
  switch (reason) {
    case StopReason::none: return "";
    case StopReason::converged: return "converged";
    case StopReason::max_rounds: return "max-rounds";
    case StopReason::no_progress: return "no-progress";
    case StopReason::forced: return "forced";
    case StopReason::offline: return "offline";
    case StopReason::shared_memory: return "shared-memory";
    case StopReason::postcopy: return "postcopy";
  }
  return "unknown";
}

StopReason stop_reason_of(Decision decision) {
  switch (decision) {
    case Decision::stop_converged: return StopReason::converged;
    case Decision::stop_max_rounds: return StopReason::max_rounds;
    case Decision::stop_no_progress: return StopReason::no_progress;
    case Decision::start_postcopy: return StopReason::postcopy;
    case Decision::next_round: case Decision::abort_no_progress: break;
  }
  return StopReason::none;
}

LatencySummary summarize_latencies(std::vector<double> latencies_ms) {
  LatencySummary out;
  out.count = latencies_ms.size();
  if (latencies_ms.empty()) return out;
  std::sort(latencies_ms.begin(), latencies_ms.end());
  auto at = [&](double q) { return latencies_ms[static_cast<std::size_t>(q * static_cast<double>(latencies_ms.size() - 1) + 0.5)]; };
  out.p50_ms = at(0.5);
  out.p99_ms = at(0.99);
  out.max_ms = latencies_ms.back();
  for (const double ms : latencies_ms) {
    const auto bucket = static_cast<std::size_t>(std::bit_width(static_cast<std::uint64_t>(ms * 1000)));
    if (out.log2_us.size() <= bucket) out.log2_us.resize(bucket + 1);
    ++out.log2_us[bucket];
  }
  return out;
}

}  // namespace mig::engine
