#include "control/json.h"

#include <algorithm>

namespace mig::control {

namespace {

nlohmann::json round_table(const std::vector<engine::RoundStats>& rounds) {
  nlohmann::json table = nlohmann::json::array();
  for (const auto& r : rounds) table.push_back(to_json(r));
  return table;
}

nlohmann::json guest_downtime(const std::optional<engine::GuestHandover>& guest) {
  return guest ? nlohmann::json(guest->gap_ms) : nlohmann::json(nullptr);
}

}  // namespace

nlohmann::json to_json(const engine::RoundStats& r) {
  return {{"round", r.round},
          {"pages", r.pages_sent},
          {"pages_skipped", r.pages_skipped},
          {"bytes", r.bytes_sent},
          {"duration_ms", r.duration_s * 1000},
          {"dirty_pages", r.dirty_pages},
          {"dirty_rate_MBps", r.dirty_rate_Bps / 1e6},
          {"bandwidth_MBps", r.bandwidth_Bps / 1e6},
          {"expected_downtime_ms", r.expected_downtime_ms},
          {"throttle_pct", r.throttle_pct},
          {"dirty_limit_MBps", r.dirty_limit_MBps},
          {"dirty_disk_bytes", r.dirty_disk_bytes}};
}

nlohmann::json to_json(const engine::LatencySummary& l) {
  return {{"count", l.count}, {"p50_ms", l.p50_ms}, {"p99_ms", l.p99_ms}, {"max_ms", l.max_ms}, {"log2_us", l.log2_us}};
}

// QEMU's names where it has them (postcopy-requests, postcopy-blocktime), mig's otherwise.
nlohmann::json to_json(const engine::PostcopyStats& p) {
  return {{"switchover_ms", p.switchover_ms},
          {"pages_needed", p.pages_needed},
          {"postcopy-requests", p.requests},
          {"recoveries", p.recoveries},
          {"pages_urgent", p.pages_urgent},
          {"pages_background", p.pages_background},
          {"bytes_before_switchover", p.bytes_before},
          {"bytes_after_switchover", p.bytes_after},
          {"postcopy_ms", p.postcopy_ms},
          {"pages_zero_filled", p.pages_zero_filled},
          {"fault_latency", to_json(p.fault_latency)},
          {"postcopy-blocktime", p.blocktime_ms},
          {"postcopy-vcpu-blocktime", p.vcpu_blocktime_ms}};
}

// virsh domjobinfo's disk fields (total, processed, remaining, bps), and mig's own.
nlohmann::json to_json(const engine::DiskStats& d) {
  return {{"disks", d.disks},
          {"copied", d.copied},
          {"size", d.size_bytes},
          {"round0", d.round0_bytes},
          {"total", d.total_bytes},
          {"processed", d.processed_bytes},
          {"remaining", d.remaining_bytes},
          {"bps", d.bps},
          {"zero_bytes", d.zero_bytes},
          {"wire_bytes", d.wire_bytes},
          {"verified", d.verified}};
}

namespace {
nlohmann::json disk_json(const std::optional<engine::DiskStats>& d) { return d ? to_json(*d) : nlohmann::json(nullptr); }
nlohmann::json postcopy_json(const std::optional<engine::PostcopyStats>& p) { return p ? to_json(*p) : nlohmann::json(nullptr); }
}  // namespace

nlohmann::json to_json(const engine::MigrationStats& s) {
  return {
      {"role", "source"},
      {"status", engine::to_string(s.status)},
      {"error", s.error},
      {"failed_phase", s.status == engine::MigrationStatus::completed ? "" : engine::to_string(s.failed_phase)},
      {"stop_reason", engine::to_string(s.stop_reason)},
      {"policy", s.policy},
      {"stop_rule", s.stop_rule},
      {"offline", s.offline},
      {"total_ms", s.total_ms},
      {"setup_ms", s.setup_ms},
      {"rounds", s.rounds},
      {"bytes_sent", s.bytes_sent},
      {"downtime_bytes", s.downtime_bytes},
      {"pages_sent", s.pages_sent},
      {"pages_zero", s.pages_zero},
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
      {"guest_downtime_ms", guest_downtime(s.guest)},
      {"heartbeat_sequence_continued", s.guest ? nlohmann::json(s.guest->sequence_continued) : nlohmann::json(nullptr)},
      {"throughput_MBps", s.throughput_MBps},
      {"security", transport::to_string(s.security)},
      {"commit_retried", s.commit_retried},
      {"zerocopy", s.zerocopy},
      {"zerocopy_sends", s.zerocopy_sends},
      {"zerocopy_copied", s.zerocopy_copied},
      {"batches_compressed", s.batches_compressed},
      {"channels", s.channels},
      {"cpu_s", s.cpu_s},
      {"cpu_s_per_GiB", engine::per_GiB(s.cpu_s, s.bytes_sent)},
      {"round_table", round_table(s.round_table)},
      {"postcopy", postcopy_json(s.postcopy)},
      {"disk", disk_json(s.disk)},
  };
}

nlohmann::json to_json(const engine::IncomingStats& s) {
  return {
      {"role", "destination"},
      {"status", engine::to_string(s.status)},
      {"error", s.error},
      {"total_ms", s.total_ms},
      {"guest_bytes", s.guest_bytes},
      {"bytes_received", s.bytes_received},
      {"pages_received", s.pages_received},
      {"rounds", s.rounds},
      {"channels", s.channels},
      {"security", transport::to_string(s.security)},
      {"commit_retried", s.commit_retried},
      {"verified", s.verified},
      {"shared_memory", s.shared_memory},
      {"restore_ms", s.restore_ms},
      {"resume_ms", s.resume_ms},
      {"guest_downtime_ms", guest_downtime(s.guest)},
      {"heartbeat_sequence_continued", s.guest ? nlohmann::json(s.guest->sequence_continued) : nlohmann::json(nullptr)},
      {"cpu_s", s.cpu_s},
      {"cpu_s_per_GiB", engine::per_GiB(s.cpu_s, s.bytes_received)},
      {"postcopy", postcopy_json(s.postcopy)},
      {"disk", disk_json(s.disk)},
  };
}

nlohmann::json migration_info(const engine::MigrationProgress& p) {
  const double seconds = std::max(p.elapsed_ms / 1000, 1e-9);
  const engine::RoundStats last = p.rounds.empty() ? engine::RoundStats{} : p.rounds.back();
  nlohmann::json ram = {
      {"transferred", p.bytes_sent},
      {"remaining", p.pages_remaining * engine::kPageSize},
      {"total", p.guest_bytes},
      {"duplicate", p.pages_zero},
      {"skipped", p.pages_skipped},
      {"normal", p.pages_sent - p.pages_zero},
      {"normal-bytes", (p.pages_sent - p.pages_zero) * engine::kPageSize},
      {"dirty-pages-rate", static_cast<std::uint64_t>(last.dirty_rate_Bps / engine::kPageSize)},
      {"mbps", static_cast<double>(p.bytes_sent) * 8 / 1e6 / seconds},
      {"dirty-sync-count", p.dirty_syncs},
      {"page-size", engine::kPageSize},
      {"pages-per-second", static_cast<std::uint64_t>(static_cast<double>(p.pages_sent) / seconds)},
      {"precopy-bytes", p.precopy_bytes},
      {"downtime-bytes", p.downtime_bytes},
      {"postcopy-bytes", p.postcopy ? p.postcopy->bytes_after : 0},
  };
  nlohmann::json info = {
      {"status", engine::to_string(p.status)},
      {"total-time", static_cast<std::int64_t>(p.elapsed_ms)},
      {"setup-time", static_cast<std::int64_t>(p.setup_ms)},
      {"expected-downtime", static_cast<std::int64_t>(last.expected_downtime_ms)},
      {"ram", ram},
      {"cpu-throttle-percentage", last.throttle_pct},
  };
  if (last.dirty_limit_MBps > 0) info["vcpu-dirty-limit"] = last.dirty_limit_MBps;  // QEMU's parameter, in its unit (MB/s)
  nlohmann::json own = {{"phase", engine::to_string(p.phase)}, {"rounds", round_table(p.rounds)}};
  // The engine names no front end: while post-copy is paused, what to do is said here, in QMP's words.
  if (!p.error.empty())
    info["error-desc"] = p.status != engine::MigrationStatus::postcopy_paused
                             ? p.error
                             : p.error + R"( (QMP: migrate-recover {"uri"} at the destination, then migrate {"uri", "resume": true} here))";
  // QEMU's block-migration "disk" object, from the last round's figures or the outcome's.
  if (const auto& disk = p.result && p.result->disk ? p.result->disk : p.disk; disk && disk->copied)
    info["disk"] = {{"transferred", disk->processed_bytes},
                    {"remaining", disk->remaining_bytes},
                    {"total", disk->total_bytes},
                    {"mbps", disk->bps * 8 / 1e6}};
  if (p.postcopy) {
    info["postcopy-requests"] = p.postcopy->requests;
    own["postcopy"] = to_json(*p.postcopy);
  }
  if (p.result) {
    const auto& r = *p.result;
    info["total-time"] = static_cast<std::int64_t>(r.total_ms);
    if (r.status == engine::MigrationStatus::completed) info["downtime"] = static_cast<std::int64_t>(r.downtime_ms);
    if (!r.error.empty()) info["error-desc"] = r.error;
    own["downtime-ms"] = r.downtime_ms;
    own["guest-downtime-ms"] = guest_downtime(r.guest);
    own["verified"] = r.verified;
    own["stop-reason"] = engine::to_string(r.stop_reason);
    own["rounds-total"] = r.rounds;
    own["stats"] = to_json(r);
  }
  info["mig"] = own;
  return info;
}

nlohmann::json to_json(const engine::DestinationCheck& check) {
  return {{"channels", check.channels}, {"postcopy", check.postcopy}, {"shared-memory", check.shared_memory}};
}

}  // namespace mig::control
