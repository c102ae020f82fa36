// The source side: pre-copy rounds, stop-and-copy, verification, and the handoff.
#pragma once

#include <chrono>
#include <functional>

#include "engine/convergence.h"
#include "engine/stats.h"
#include "engine/vm.h"
#include "transport/stream.h"

namespace mig::engine {

struct SenderOptions {
  ConvergencePolicy policy;
  bool offline = false;  // pause first and copy everything once: a cold migration
  bool verify = true;    // page-hash verification at completion
  bool dedup = true;     // skip a dirty page whose contents equal its last-sent version
  // Skip never-touched pages in round 0 (found without faulting them in) and zero pages the
  // receiver already holds as zero. Off: every page is read and sent, for measuring the gain.
  bool skip_zero_pages = true;
  // Bytes per second for pre-copy page data; 0 = unlimited. The paused final round is not
  // limited: by then the downtime is what matters. The convergence estimate uses the
  // bandwidth measured under the limit, so it stays on the safe side.
  double bandwidth_limit = 0;
  int compress_level = 0;  // zstd level for page batches; 0 = off
  // Pages kept to delta-encode against (XBZRLE-style); 0 = off. Pages enter the cache when
  // resent after round 0, which is when a page shows it is being rewritten.
  std::size_t delta_cache_pages = 0;
  // Hand guest memory over instead of copying it when the VM can share it and the stream
  // is a UNIX socket (same host).
  bool share_memory = true;
  // Tell the receiver which pages round 0 carries, so it can back them with memory ahead of
  // the stream instead of faulting on each page as it lands.
  bool page_plan = true;
  // Connections for page data. Each carries the pages of its share of guest memory (by
  // address, see wire::kChannelChunkPages) on its own thread. `open_channel` connects one
  // more to the same receiver; needed when channels > 1.
  unsigned channels = 1;
  std::function<transport::Stream()> open_channel;
  std::chrono::milliseconds peer_timeout{10000};
  std::chrono::milliseconds handover_wait{2000};  // for the guest-observed downtime report
  // Called after each pre-copy round with the round and the guest's size in bytes.
  std::function<void(const RoundStats&, std::uint64_t guest_bytes)> on_round;
};

// Migrates `vm` to the receiver at the other end of `stream`.
//
// Never throws for a failed migration; the outcome is in stats.status:
//   completed        the destination runs the guest; `vm` stays paused and must not run again.
//   failed           something went wrong before the handoff; `vm` runs again (it was resumed
//                    if this call paused it), dirty logging is off, stats.error says why.
//   handoff-unknown  the connection broke after Commit was sent and before Running came back:
//                    the destination may be running the guest, so `vm` stays paused.
MigrationStats migrate(MigratableVm& vm, transport::Stream& stream, const SenderOptions& options);

}  // namespace mig::engine
