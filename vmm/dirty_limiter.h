// Dirty-limit (QEMU 8.1's per-vCPU dirty-rate cap): the rule every VMM here enforces it by,
// and the helper that enforces it for a VMM whose vCPUs it can hold one by one (kvm::Machine,
// counting from KVM's dirty rings).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace mig::vmm {

// A vCPU may have dirtied, since its pacing began, what the cap allows in that time. One
// that dirtied less than it could earns at most kCredit of catching up: beyond that the
// pacing starts afresh, so that time spent computing or idle does not buy a burst later.
// A new cap starts it afresh too.
struct DirtyPacing {
  using Clock = std::chrono::steady_clock;
  static constexpr std::chrono::milliseconds kCredit{10};

  double pages_per_s = 0;
  Clock::time_point since;
  std::uint64_t dirtied_then = 0;  // the vCPU's count when the pacing began

  // Until when a vCPU that has dirtied `dirtied` pages in all must be held under `limit`
  // (pages per second): `now` or earlier when it may go on at once.
  Clock::time_point hold_until(double limit, std::uint64_t dirtied, Clock::time_point now);
};

// Every 10 ms a helper thread reads how many pages each vCPU has dirtied and holds back each
// one that is ahead of the cap, until the cap catches up. A vCPU is caught at most one period
// late: between two looks it dirties at its own pace.
class DirtyLimiter {
 public:
  using Clock = DirtyPacing::Clock;
  // `dirtied()`: per vCPU, the pages it has dirtied in all; `hold(vcpu, until)` keeps one out
  // of the guest until then. Both are called from the helper thread.
  DirtyLimiter(std::function<std::vector<std::uint64_t>()> dirtied, std::function<void(unsigned, Clock::time_point)> hold)
      : dirtied_(std::move(dirtied)), hold_(std::move(hold)) {}

  // Caps each vCPU at `pages_per_s` from now on; 0 lifts the cap and stops the helper.
  void set(double pages_per_s);
  // One look, at `now`, under cap `pages_per_s`: what the helper does every period (tests
  // call it directly).
  void look(double pages_per_s, Clock::time_point now);

 private:
  std::function<std::vector<std::uint64_t>()> dirtied_;
  std::function<void(unsigned, Clock::time_point)> hold_;
  std::vector<DirtyPacing> pacing_;  // per vCPU; the helper's, or a test's
  std::jthread thread_;              // last: stopped before the rest goes
};

}  // namespace mig::vmm
