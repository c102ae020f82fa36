// The destination's side of post-copy. From the switchover on, guest memory traps every
// absent page (userfaultfd, missing mode). A fault on a page the source still holds becomes
// a request on the post-copy channel, and the vCPU sleeps in the kernel until the page is
// installed; a fault on a page that was never sent is filled with zeros here. Pages arrive
// both as answers and in the background, and each is installed exactly once.
//
// When the link breaks, nothing here fails: a vCPU that touches a missing page simply waits,
// which pauses the guest page by page, and connect() after a recovery asks again for every
// page still waited on.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "engine/page_receiver.h"
#include "engine/page_sender.h"
#include "engine/stats.h"
#include "engine/userfault.h"

namespace mig::engine {

class PostcopyDestination final : public PageInstaller {
 public:
  // Traps absent pages of all of guest memory, then drops `needed`, whose contents here are
  // stale: from here on each of them is installed from the source's copy, or waited for.
  // Throws ProtocolError when `needed` does not fit the memory, and with the reason when the
  // memory cannot be trapped.
  PostcopyDestination(MigratableVm& vm, std::vector<MemoryRegion> regions, PageHashes& hashes, Bitmaps needed);
  ~PostcopyDestination() override;
  PostcopyDestination(const PostcopyDestination&) = delete;
  PostcopyDestination& operator=(const PostcopyDestination&) = delete;

  // Requests go out on `urgent`, and the answers on it are installed, until disconnect().
  // `urgent_slot` is the PageHashes channel for them. Asks again for every page still waited on.
  void connect(transport::Stream& urgent, unsigned urgent_slot);
  // Stops using the post-copy channel; returns why it failed, if it did before.
  std::optional<std::string> disconnect();

  void install(unsigned hash_slot, std::size_t region, std::uint64_t page, const std::byte* data) override;

  // Blocks until every needed page is installed (true), or `timeout` passes.
  bool wait_installed(std::chrono::milliseconds timeout);
  // The needed pages not installed yet.
  Bitmaps missing() const;
  // Guest memory stops trapping; call once every page is installed.
  void finish();

  PostcopyStats stats() const;

 private:
  struct Waiting {
    std::chrono::steady_clock::time_point since;  // the first fault on the page
    std::vector<std::pair<int, std::chrono::steady_clock::time_point>> threads;
  };
  void handle_faults();
  void on_fault(const Fault& fault);
  void request(std::size_t region, std::uint64_t page);  // with mutex_ held
  void receive_answers(transport::Stream& urgent, unsigned urgent_slot);

  MigratableVm& vm_;
  const std::vector<MemoryRegion> regions_;
  PageHashes& hashes_;
  Bitmaps needed_, installed_;
  Userfault userfault_;
  std::uint64_t pages_needed_ = 0;

  mutable std::mutex mutex_;
  std::condition_variable all_installed_;
  std::uint64_t installed_count_ = 0;
  std::unordered_map<std::uint64_t, Waiting> waiting_;  // by page_key
  transport::Stream* urgent_ = nullptr;  // null while disconnected
  std::optional<std::string> link_error_;
  std::uint64_t requests_ = 0, zero_filled_ = 0;
  std::vector<double> latencies_ms_;
  std::vector<double> vcpu_blocktime_ms_;
  double blocktime_ms_ = 0;

  std::atomic<bool> stopping_{false};
  std::thread fault_thread_, answer_thread_;
};

}  // namespace mig::engine
