// The incoming address while a migration is under way. The receiver takes one migration at
// a time, but its address stays open: the source of this migration may come back on it
// (CommitRetry, after a broken connection at the switchover). So one thread keeps answering
// it. A second source's Hello is refused at once, in one line, instead of waiting unanswered
// in the backlog until its timeout; this migration's own returns are kept for it; anything
// else is closed. The migration in progress is not disturbed.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <utility>

#include "engine/incoming_migration.h"

namespace mig::engine {

class IncomingDoorman {
 public:
  // Starts answering through `accept` for the migration of `session`.
  IncomingDoorman(ReceiverOptions::Accept accept, std::uint64_t session);
  ~IncomingDoorman();  // stops answering (within one poll) and joins
  IncomingDoorman(const IncomingDoorman&) = delete;
  IncomingDoorman& operator=(const IncomingDoorman&) = delete;

  // The next connection of this session that asked about the commit, and what it asked;
  // throws transport::PeerError naming `waiting_for` if none came by `deadline`, and
  // transport::Interrupted once accepting was interrupted (the receiver quits).
  std::pair<transport::Stream, wire::CommitRetry> take_commit_retry(std::chrono::steady_clock::time_point deadline,
                                                                     const char* waiting_for);

 private:
  void run();
  void answer(transport::Stream stream);

  const ReceiverOptions::Accept accept_;
  const std::uint64_t session_;
  std::mutex mutex_;
  std::condition_variable arrived_;
  std::deque<std::pair<transport::Stream, wire::CommitRetry>> retries_;
  bool stopping_ = false;
  bool interrupted_ = false;
  std::thread thread_;  // last: it uses everything above
};

}  // namespace mig::engine
