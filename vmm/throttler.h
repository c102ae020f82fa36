// Auto-converge's brake for a VMM that pauses and resumes its vCPUs as a whole: a helper
// thread holds them for a share of every 10 ms, so a guest that dirties memory faster than
// the link drains it slows down - every vCPU of it, whatever it does.
#pragma once

#include <functional>
#include <thread>

namespace mig::vmm {

class Throttler {
 public:
  Throttler(std::function<void()> pause, std::function<void()> resume)
      : pause_(std::move(pause)), resume_(std::move(resume)) {}
  // Holds the vCPUs for `share` (up to 0.99) of the time from now on; 0 stops.
  void set(double share);
  // Stops and joins the helper, which leaves the vCPUs running; at most one pause and resume
  // of them, never the rest of a period.
  void stop() { thread_ = std::jthread(); }

 private:
  std::function<void()> pause_, resume_;
  std::jthread thread_;  // last: stopped before the functions go
};

}  // namespace mig::vmm
