#include "engine/stats.h"

#include <nlohmann/json.hpp>

namespace mig::engine {

nlohmann::json to_json(const MigrationStats& s) {
  nlohmann::json rounds = nlohmann::json::array();
  for (const auto& r : s.round_table)
    rounds.push_back({{"round", r.round},
                      {"pages", r.pages_sent},
                      {"pages_skipped", r.pages_skipped},
                      {"bytes", r.bytes_sent},
                      {"duration_ms", r.duration_s * 1000},
                      {"dirty_pages", r.dirty_pages},
                      {"dirty_rate_MBps", r.dirty_rate_Bps / 1e6},
                      {"bandwidth_MBps", r.bandwidth_Bps / 1e6},
                      {"expected_downtime_ms", r.expected_downtime_ms},
                      {"throttle_pct", r.throttle_pct}});
  nlohmann::json j = {
      {"status", s.status},
      {"error", s.error},
      {"stop_reason", s.stop_reason},
      {"offline", s.offline},
      {"total_ms", s.total_ms},
      {"rounds", s.rounds},
      {"bytes_sent", s.bytes_sent},
      {"pages_sent", s.pages_sent},
      {"pages_skipped", s.pages_skipped},
      {"pages_delta", s.pages_delta},
      {"guest_bytes", s.guest_bytes},
      {"verified", s.verified},
      {"shared_memory", s.shared_memory},
      {"downtime_ms", s.downtime_ms},
      {"downtime_clock", s.downtime_clock},
      {"downtime_breakdown",
       {{"pause_ms", s.downtime.pause_ms},
        {"final_sync_ms", s.downtime.final_sync_ms},
        {"final_pages_ms", s.downtime.final_pages_ms},
        {"state_ms", s.downtime.state_ms},
        {"verify_restore_ms", s.downtime.verify_restore_ms},
        {"restore_ms", s.downtime.restore_ms},
        {"commit_resume_ms", s.downtime.commit_resume_ms},
        {"resume_ms", s.downtime.resume_ms}}},
      {"guest_downtime_ms", s.guest ? nlohmann::json(s.guest->gap_ms) : nlohmann::json(nullptr)},
      {"heartbeat_sequence_continued", s.guest ? nlohmann::json(s.guest->sequence_continued) : nlohmann::json(nullptr)},
      {"throughput_MBps", s.throughput_MBps},
      {"zerocopy", s.zerocopy},
      {"zerocopy_sends", s.zerocopy_sends},
      {"zerocopy_copied", s.zerocopy_copied},
      {"batches_compressed", s.batches_compressed},
      {"channels", s.channels},
      {"round_table", rounds},
  };
  return j;
}

}  // namespace mig::engine
