#include "engine/incoming_doorman.h"

#include "common/thread_name.h"

namespace mig::engine {

namespace {

// How often the thread looks up from accept to see whether it should stop.
constexpr std::chrono::milliseconds kPoll{100};
// A connection says what it wants at once; one that does not within this is closed.
constexpr std::chrono::milliseconds kOpeningWait{2000};

}  // namespace

IncomingDoorman::IncomingDoorman(ReceiverOptions::Accept accept, std::uint64_t session)
    : accept_(std::move(accept)), session_(session), thread_([this] { run(); }) {}

IncomingDoorman::~IncomingDoorman() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  thread_.join();
}

void IncomingDoorman::run() {
  name_this_thread("mig-doorman");
  for (;;) {
    {
      std::lock_guard lock(mutex_);
      if (stopping_) return;
    }
    const auto asked = std::chrono::steady_clock::now();
    try {
      answer(accept_(kPoll));
    } catch (const transport::Interrupted&) {  // the receiver quits: so does whoever waits for a retry
      std::lock_guard lock(mutex_);
      interrupted_ = true;
      arrived_.notify_all();
      return;
    } catch (const std::exception&) {  // nobody came within the poll, or a peer that failed the listener's checks
      // An accept that fails at once (no file descriptors left) must not spin: the poll is waited out.
      std::this_thread::sleep_until(asked + kPoll);
    }
  }
}

void IncomingDoorman::answer(transport::Stream stream) {
  stream.set_timeout(kOpeningWait);
  try {
    const auto header = stream.read_header();
    const auto payload = stream.read_payload(header);
    switch (static_cast<wire::MessageType>(header.type)) {
      case wire::MessageType::hello:
        stream.send(wire::Error{"this receiver is taking another migration; try again once it has finished"});
        return;
      case wire::MessageType::commit_retry:
        if (const auto retry = wire::decode<wire::CommitRetry>(payload); retry.session == session_) {
          std::lock_guard lock(mutex_);
          retries_.emplace_back(std::move(stream), retry);
          arrived_.notify_all();
        }
        return;
      default:
        return;  // not a source, not ours: closed
    }
  } catch (const std::exception&) {  // silent, slow or malformed: closed
  }
}

std::pair<transport::Stream, wire::CommitRetry> IncomingDoorman::take_commit_retry(std::chrono::steady_clock::time_point deadline,
                                                                                    const char* waiting_for) {
  std::unique_lock lock(mutex_);
  if (!arrived_.wait_until(lock, deadline, [&] { return !retries_.empty() || interrupted_; }))
    throw transport::PeerError(std::string(waiting_for) + " did not come in time");
  if (retries_.empty()) throw transport::Interrupted("the receiver was told to stop");
  auto next = std::move(retries_.front());
  retries_.pop_front();
  return next;
}

}  // namespace mig::engine
