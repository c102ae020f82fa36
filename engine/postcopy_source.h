// The source's side of post-copy, after the switchover. The guest is paused here for good,
// and every page the destination lacks goes to it exactly once: at once, on the post-copy
// channel, when a vCPU there waits on it (a request); otherwise in the background on the
// main channel, starting next to the last page requested, because a guest that faulted on
// one page tends to want its neighbours next.
#pragma once

#include <atomic>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>

#include "engine/control.h"
#include "engine/page_hashes.h"
#include "engine/page_sender.h"
#include "transport/stream.h"

namespace mig::engine {

class PostcopySource {
 public:
  // `unsent`: the pages not valid at the destination. Pages go as round `round`; answers to
  // requests record their hashes as PageHashes channel `urgent_slot`, background pages as 0.
  PostcopySource(std::span<const MemoryRegion> regions, Bitmaps unsent, PageHashes& hashes, MigrationControl& control,
                 std::uint32_t round, unsigned urgent_slot);
  ~PostcopySource() { stop_serving(); }
  PostcopySource(const PostcopySource&) = delete;
  PostcopySource& operator=(const PostcopySource&) = delete;

  // Answers the requests arriving on `urgent`, on a thread of its own, until stop_serving().
  void serve(transport::Stream& urgent);
  // Sends every page not yet sent on `bulk`. Returns once each has left on one channel or the
  // other; throws when the link breaks.
  void push_rest(transport::Stream& bulk);
  // Stops answering requests; returns why serving ended early, if it did (a broken link, a
  // request for a page outside guest memory or asked for twice).
  std::optional<std::string> stop_serving();
  // After a reconnect: the destination still lacks `missing`, so those pages count as neither
  // sent nor requested, whatever was in flight when the link broke.
  void resend(const Bitmaps& missing);

  std::uint64_t pages_needed() const { return pages_needed_; }
  std::uint64_t requests() const { return requests_; }
  std::uint64_t pages_urgent() const { return pages_urgent_; }
  std::uint64_t pages_background() const { return pages_background_; }

 private:
  void answer_requests(transport::Stream& urgent);
  std::optional<std::pair<std::size_t, std::uint64_t>> next_unsent(std::size_t region, std::uint64_t page) const;

  std::span<const MemoryRegion> regions_;
  Bitmaps needed_;  // not valid at the destination at the switchover; never changes
  Bitmaps unsent_, requested_;
  PageHashes& hashes_;
  MigrationControl& control_;
  const std::uint32_t round_;
  const unsigned urgent_slot_;
  const std::uint64_t pages_needed_;
  transport::Stream* urgent_ = nullptr;
  std::thread serving_;
  std::mutex answering_;  // held while a request's page is claimed and sent
  std::optional<std::string> serving_error_;
  std::atomic<bool> stopping_{false};
  // The page after the last one requested (page_key): where pushing goes on.
  std::atomic<std::uint64_t> push_from_{0};
  std::atomic<bool> request_moved_push_{false};
  std::atomic<std::uint64_t> requests_{0}, pages_urgent_{0}, pages_background_{0};
};

}  // namespace mig::engine
