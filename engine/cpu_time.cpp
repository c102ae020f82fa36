#include "engine/cpu_time.h"

#include <sys/resource.h>

namespace mig::engine {

std::uint64_t thread_cpu_ns() {
  rusage usage{};
  ::getrusage(RUSAGE_THREAD, &usage);
  auto ns = [](const timeval& t) {
    return static_cast<std::uint64_t>(t.tv_sec) * 1'000'000'000u + static_cast<std::uint64_t>(t.tv_usec) * 1000u;
  };
  return ns(usage.ru_utime) + ns(usage.ru_stime);
}

}  // namespace mig::engine
