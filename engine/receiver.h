// The destination side: incoming mode. Builds a VM of the sender's shape, lets pages land
// straight in its memory, verifies, restores, and runs it once the source commits.
#pragma once

#include <chrono>
#include <functional>
#include <memory>

#include "engine/stats.h"
#include "engine/vm.h"
#include "transport/stream.h"

namespace mig::engine {

struct ReceiverOptions {
  std::chrono::milliseconds peer_timeout{10000};
  std::chrono::milliseconds handover_wait{2000};
  // Accepts the next connection, for a sender that asks for parallel channels. Without it
  // the receiver accepts one channel and the sender falls back to it.
  std::function<transport::Stream()> accept_channel;
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
