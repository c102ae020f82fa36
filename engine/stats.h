// What a migration measured and how it ended, as plain values with typed outcomes. Strings
// appear only where people or JSON read them (to_string here, JSON in control/).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "../engine/convergence.h"
#include "../engine/vm.h"
#include "../transport/tls.h"

namespace mig::engine {

// QEMU's MigrationStatus names where they exist; handoff-unknown is mig's own.
enum class MigrationStatus {
  none, setup, active, device, postcopy_active, postcopy_paused, postcopy_recover, completed, failed, cancelling, cancelled,
  handoff_unknown
};
const char* to_string(MigrationStatus status);
bool is_finished(MigrationStatus status);

// The source's phases, in order. A failure names the phase it happened in.
enum class Phase { setup, precopy, stop_and_copy, device_state, awaiting_ready, commit, postcopy, finished };
const char* to_string(Phase phase);

// Why pre-copy ended.
enum class StopReason { none, converged, max_rounds, no_progress, forced, offline, shared_memory, postcopy };
const char* to_string(StopReason reason);
StopReason stop_reason_of(Decision decision);

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

// A latency distribution: percentiles, and counts in log2 buckets of microseconds (bucket i
// holds latencies in [2^(i-1), 2^i) us; bucket 0 those under 1 us).
struct LatencySummary {
  std::uint64_t count = 0;
  double p50_ms = 0, p99_ms = 0, max_ms = 0;
  std::vector<std::uint64_t> log2_us;
};
LatencySummary summarize_latencies(std::vector<double> latencies_ms);

// Post-copy, as each side saw it. A side fills in what it can measure.
struct PostcopyStats {
  double switchover_ms = 0;        // from the start of the migration to the source's pause
  std::uint64_t pages_needed = 0;  // not valid at the destination at the switchover
  std::uint64_t requests = 0;      // pages a vCPU (or the VMM) waited for and asked the source for
  std::uint32_t recoveries = 0;    // reconnections after a broken link
  // The source.
  std::uint64_t pages_urgent = 0;      // sent in answer to a request
  std::uint64_t pages_background = 0;  // pushed on the main channel
  std::uint64_t bytes_before = 0, bytes_after = 0;  // wire bytes before and after the switchover
  double postcopy_ms = 0;  // the destination running the guest until it had every page
  // The destination.
  std::uint64_t pages_zero_filled = 0;  // faults on pages never sent, filled with zeros there
  LatencySummary fault_latency;         // fault to install, for pages that were waited on
  double blocktime_ms = 0;              // time vCPUs (and VMM threads) waited on missing pages, summed
  std::vector<double> vcpu_blocktime_ms;  // per vCPU, where the VM names its vCPU threads
};

// The disks of a migration: with --copy-storage-all what their data took (the fields virsh
// domjobinfo reports: total, processed, remaining, bps); with shared storage only the hand-over.
struct DiskStats {
  unsigned disks = 0;
  bool copied = false;                // data moved; otherwise shared images changed owner
  std::uint64_t size_bytes = 0;       // the disks' virtual sizes, together
  std::uint64_t round0_bytes = 0;     // the data chunks found at the start (SEEK_DATA / block status)
  std::uint64_t total_bytes = 0;      // to move: round 0's data chunks plus every chunk rewritten since
  std::uint64_t processed_bytes = 0;  // of which sent
  std::uint64_t remaining_bytes = 0;  // of which still pending
  std::uint64_t zero_bytes = 0;       // of processed, sent as holes (no data on the wire)
  std::uint64_t wire_bytes = 0;       // what the disk frames took on the wire
  double bps = 0;                     // processed bytes per second of migration so far
  bool verified = false;              // the chunk-hash digest matched
};

// The source's view of one migration.
struct MigrationStats {
  MigrationStatus status = MigrationStatus::failed;  // completed, failed, cancelled or handoff_unknown
  std::string error;              // why, for failed, cancelled and handoff_unknown
  Phase failed_phase = Phase::setup;  // where it failed or was cancelled
  StopReason stop_reason = StopReason::none;
  std::string policy;             // the convergence policy that decided (engine/policy.h)
  std::string stop_rule;          // which of its rules ended pre-copy, in its words
  bool offline = false;
  double total_ms = 0;            // connect to Running
  double setup_ms = 0;            // connect until the first page could go
  std::uint32_t rounds = 0;       // including the final, paused round
  std::uint64_t bytes_sent = 0;   // all wire bytes, every channel
  std::uint64_t downtime_bytes = 0;  // of which while the guest was paused
  std::uint64_t pages_sent = 0;
  std::uint64_t pages_zero = 0;   // of pages_sent, sent as zero pages
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
  transport::StreamSecurity security = transport::StreamSecurity::plaintext;  // of the main connection; every channel has the same
  bool zerocopy = false;          // MSG_ZEROCOPY still on at the end (auto drops it where the kernel copies)
  std::uint64_t zerocopy_sends = 0, zerocopy_copied = 0;
  std::uint64_t batches_compressed = 0;
  unsigned channels = 1;                 // connections that carried pages
  std::uint64_t extra_channel_bytes = 0; // of bytes_sent, what channels 1..n-1 carried
  std::vector<RoundStats> round_table;  // pre-copy rounds; the final round is in downtime
  double cpu_s = 0;  // user + system CPU time of the migration's threads (engine/cpu_time.h)
  std::optional<PostcopyStats> postcopy;  // when the switchover was to post-copy
  std::optional<DiskStats> disk;          // when the guest has disks
  bool commit_retried = false;  // the connection broke after Commit; a new one settled the handoff
};

// The destination's view of one incoming migration.
struct IncomingStats {
  MigrationStatus status = MigrationStatus::failed;  // completed or failed
  std::string error;
  double total_ms = 0;            // Hello to resumed
  std::uint64_t guest_bytes = 0;
  std::uint64_t bytes_received = 0;  // every channel
  std::uint64_t pages_received = 0;
  std::uint32_t rounds = 0;
  unsigned channels = 1;
  transport::StreamSecurity security = transport::StreamSecurity::plaintext;
  bool verified = false;
  bool shared_memory = false;
  double restore_ms = 0;
  double resume_ms = 0;
  std::optional<GuestHandover> guest;
  double cpu_s = 0;  // user + system CPU time of the receiving threads (engine/cpu_time.h)
  // When the guest ran here in post-copy: completed, or failed with the guest lost (pages
  // only the source held never came).
  std::optional<PostcopyStats> postcopy;
  std::optional<DiskStats> disk;
  bool commit_retried = false;  // Commit came on a new connection, after the first broke
  // The session was a pre-flight check (kCapDryRun): completed means the guest would be
  // taken, failed says why not; no VM was built either way.
  bool dry_run = false;
};

// CPU seconds per GiB moved; 0 when nothing moved.
inline double per_GiB(double cpu_s, std::uint64_t bytes) {
  return bytes ? cpu_s / (static_cast<double>(bytes) / static_cast<double>(1ull << 30)) : 0;
}

}  // namespace mig::engine
