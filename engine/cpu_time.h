// CPU time (user + system) that one side of a migration spends, summed over its threads.
// Counted per thread (getrusage RUSAGE_THREAD) around each piece of work, not per process: a
// VMM runs its guest's vCPU threads in the same process, and their time is the guest's.
#pragma once

#include <atomic>
#include <cstdint>

namespace mig::engine {

// The calling thread's CPU time so far, in nanoseconds.
std::uint64_t thread_cpu_ns();

class CpuTime {
 public:
  // Adds what the calling thread spends from construction to destruction.
  class Scope {
   public:
    explicit Scope(CpuTime& total) : total_(total), start_(thread_cpu_ns()) {}
    ~Scope() { total_.ns_ += thread_cpu_ns() - start_; }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    CpuTime& total_;
    std::uint64_t start_;
  };

  // Every finished Scope, plus the calling thread's time since `own_start` (a thread_cpu_ns()
  // taken by the thread that drives the migration, whose scope has not ended yet).
  double seconds(std::uint64_t own_start) const {
    return static_cast<double>(ns_.load() + thread_cpu_ns() - own_start) / 1e9;
  }

 private:
  std::atomic<std::uint64_t> ns_{0};
};

}  // namespace mig::engine
