// The destination side: incoming mode. Builds a VM of the sender's shape, lets pages land
// straight in its memory, verifies, restores, and runs it once the source commits.
#pragma once

#include <chrono>
#include <memory>

#include "engine/stats.h"
#include "engine/vm.h"
#include "transport/stream.h"

namespace mig::engine {

struct ReceiverOptions {
  std::chrono::milliseconds peer_timeout{10000};
  std::chrono::milliseconds handover_wait{2000};
};

struct ReceiveResult {
  MigrationStats stats;  // from the receiver's side: bytes, pages, rounds, restore, resume
  std::unique_ptr<MigratableVm> vm;  // running when stats.status == "completed", else null
};

// Never throws for a failed migration: a malformed stream, a vanished or aborting source, a
// verification mismatch or a failed restore all give status "failed" with the reason in
// stats.error, and no VM. The peer is told why where the connection still allows it.
ReceiveResult receive(transport::Stream& stream, const VmFactory& make_vm, const ReceiverOptions& options);

}  // namespace mig::engine
