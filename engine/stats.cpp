#include "engine/stats.h"

namespace mig::engine {

const char* to_string(MigrationStatus status) {
  switch (status) {
    case MigrationStatus::none: return "none";
    case MigrationStatus::setup: return "setup";
    case MigrationStatus::active: return "active";
    case MigrationStatus::device: return "device";
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
  }
  return "unknown";
}

StopReason stop_reason_of(Decision decision) {
  switch (decision) {
    case Decision::stop_converged: return StopReason::converged;
    case Decision::stop_max_rounds: return StopReason::max_rounds;
    case Decision::stop_no_progress: return StopReason::no_progress;
    case Decision::next_round: case Decision::abort_no_progress: break;
  }
  return StopReason::none;
}

}  // namespace mig::engine
