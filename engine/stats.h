// Everything a migration measured, for people (the progress line) and machines (JSON).
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "engine/convergence.h"
#include "engine/vm.h"

namespace mig::engine {

struct DowntimeBreakdown {
  double pause_ms = 0;        // stopping the vCPUs
  double final_sync_ms = 0;   // the last dirty-log fetch
  double final_pages_ms = 0;  // sending the last dirty pages
  double state_ms = 0;        // saving and sending vCPU, VM and device state
  double verify_restore_ms = 0;  // Complete sent until Ready received (the receiver verifies and restores)
  double restore_ms = 0;      // of which restoring, as the receiver measured it
  double commit_resume_ms = 0;   // Commit sent until Running received
  double resume_ms = 0;       // of which resuming, as the receiver measured it
};

struct MigrationStats {
  std::string status = "failed";  // completed | failed | handoff-unknown
  std::string error;
  std::string stop_reason;        // the convergence decision, or "offline"
  bool offline = false;
  double total_ms = 0;            // connect to Running
  std::uint32_t rounds = 0;       // including the final, paused round
  std::uint64_t bytes_sent = 0;   // all wire bytes
  std::uint64_t pages_sent = 0;
  std::uint64_t pages_skipped = 0;
  std::uint64_t pages_delta = 0;  // sent as a delta against their previous version
  std::uint64_t guest_bytes = 0;
  bool verified = false;          // the page-hash check ran and passed
  bool shared_memory = false;     // same-host hand-over: memory was shared, not copied (nothing to verify)
  double downtime_ms = 0;         // pause start to the destination's resume, host clock
  std::string downtime_clock;     // "shared" (one host) or "round-trip" (an upper bound)
  DowntimeBreakdown downtime;
  std::optional<GuestHandover> guest;  // the downtime the guest saw, from its heartbeats
  double throughput_MBps = 0;     // bytes_sent / total time
  bool zerocopy = false;          // MSG_ZEROCOPY still on at the end (auto drops it where the kernel copies)
  std::uint64_t zerocopy_sends = 0, zerocopy_copied = 0;
  std::uint64_t batches_compressed = 0;
  unsigned channels = 1;                 // connections that carried pages
  std::uint64_t extra_channel_bytes = 0; // of bytes_sent, what channels 1..n-1 carried
  std::vector<RoundStats> round_table;  // pre-copy rounds; the final round is in downtime
};

nlohmann::json to_json(const MigrationStats& stats);

}  // namespace mig::engine
