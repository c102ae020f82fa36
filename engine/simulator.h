// mig-sim's engine: a migration replayed from a dirty trace instead of run.
//
// The policy, the round accounting (RoundStats, the windowed bandwidth, the expected
// downtime) and the stopping rules are the engine's own code; what a run measures (the time
// to send, the round trips, restore) is modelled from the link and a few fixed costs:
//   - a page on the wire is 4096 bytes plus its 16-byte descriptor (zero pages are not
//     modelled: a trace cannot tell them);
//   - every write is taken to change its page, so dedup never skips one: the engine skips
//     only a page rewritten with the bytes it last sent for certain (page_hashes.h), which a
//     trace cannot tell;
//   - round 0 sends the pages populated when the trace began; round k sends the pages the
//     guest wrote during round k-1 (each write of a trace frame is put at a fixed
//     pseudo-random moment within its interval); the guest's clock slows by the throttle the
//     policy asks for;
//   - a per-vCPU dirty limit (dirty-limit) needs a trace that names the vCPUs (recorded with
//     --dirty-track ring): each vCPU then replays on its own clock, held as the synthetic
//     guest holds it, so that what it wrote since the limit began keeps to the limit (with
//     10 ms of catching up); writes no vCPU is named for are never held. A trace that names no
//     vCPU replays a guest that cannot take the limit, and dirty-limit runs without its brake;
//   - a pre-copy round costs its bytes at the bandwidth plus one round trip (RoundEnd,
//     RoundAck); under the sender's own limit, its bytes leave as the engine's token buckets
//     let them: the buckets start full, so the first burst leaves at the link's rate, and
//     what the limit leaves unspent between rounds (their round trips) is spent in the next;
//     the final round its bytes at the pause bandwidth (the engine does not limit
//     it) plus the state, then one and a half round trips and `restore_ms` until the
//     destination resumes, and half a round trip more until the source hears Running;
//   - after a switch to post-copy, the state and a bitmap of the pages the destination lacks
//     go at the pause bandwidth, the guest resumes there, and each of those pages leaves
//     once: pushed in address order, paced by the sender's limit as pre-copy was, or at once
//     on the guest's first write to it (a request, answered unpaced in a round trip plus the
//     page's time on the link, while the writer waits; the push then goes on after it).
//     Reads, which a trace does not hold, never request a page; and the destination's own
//     costs (dropping the stale pages in the downtime, installing each page, waking a
//     writer) are not modelled, nor is post-copy's recovery from a broken link;
//   - a trace shorter than the migration is replayed again from where the migration started
//     in it (`trace_start_s`), since what comes before that (a boot, a fill) is not the
//     workload.
// `guest_scale` K stands for a guest K times as large whose every K-th part behaves like the
// recorded guest (with its own vCPUs, each under the same per-vCPU limit): populated and
// dirty counts are multiplied by K.
#pragma once

#include <memory>
#include <optional>
#include <vector>

#include "../engine/dirty_trace.h"
#include "../engine/policy.h"
#include "../engine/stats.h"

namespace mig::engine {

struct SimulatorOptions {
  std::shared_ptr<const MigrationPolicy> policy;  // null: mig's, with `convergence`
  ConvergencePolicy convergence;                  // the downtime target and round limit (and mig's rule)
  double bandwidth_Bps = 125e6;                   // pre-copy page data over the link (all channels together)
  double pause_bandwidth_Bps = 0;                 // the final round's; 0: bandwidth_Bps
  double bandwidth_limit_Bps = 0;                 // the sender's (mig-send --bandwidth); 0: none
  double latency_ms = 0.05;                       // one way
  // How far ahead of the link the sender reads pages, once the way has filled: what the
  // socket's send buffer and the link's queues hold between them (TCP's send buffer bounds
  // both: data queued on the way is unacknowledged, and stays in it). A page's dirty
  // tracking is re-armed when it is read, that much before it leaves.
  double read_ahead_bytes = 0;
  unsigned channels = 1;                          // only the bandwidth they share is modelled
  unsigned guest_scale = 1;
  bool can_throttle = true;
  double trace_start_s = 0;     // where in the trace dirty tracking starts
  double setup_ms = 1;          // connecting and the handshake, beyond their round trips
  double restore_ms = 1;        // verifying and restoring at the destination, and resuming
  std::uint64_t state_bytes = 64 * 1024;  // vCPU, VM and device state
  // Post-copy, as mig-send offers it: none, right after round 0 (--postcopy), or once the
  // policy finds that pre-copy cannot converge (--postcopy-ram, with no operator to ask).
  enum class Postcopy { off, after_round_0, on_no_progress } postcopy = Postcopy::off;
};

struct SimulatedMigration {
  double total_ms = 0;
  double downtime_ms = 0;
  std::uint32_t rounds = 0;  // including the final, paused round
  std::uint64_t bytes_sent = 0;
  std::uint64_t guest_bytes = 0;
  std::vector<RoundStats> round_table;  // pre-copy rounds, as a real run prints them
  StopReason stop_reason = StopReason::none;
  std::string policy, stop_rule;
  bool aborted = false;  // the policy gave up: a real run would fail and resume the source
  // After a switch to post-copy: what the source would report, but for what a trace cannot
  // tell (fault latencies, zero-filled pages, each vCPU's blocktime).
  std::optional<PostcopyStats> postcopy;
};

// Throws std::invalid_argument for options it cannot model (no bandwidth, an empty trace).
SimulatedMigration simulate(const DirtyTrace& trace, const SimulatorOptions& options);

// What a page costs on the wire, as the engine sends it raw.
inline constexpr std::uint64_t kWirePageBytes = 4096 + 16;

}  // namespace mig::engine
