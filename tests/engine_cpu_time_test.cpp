// CPU time per migration side: counted per thread, so busy threads outside it are not.
#include <catch2/catch.hpp>
#include <chrono>
#include <thread>

#include "engine/cpu_time.h"
#include "engine/stats.h"

using namespace mig;
using namespace std::chrono;

namespace {
// Burns `cpu` of the calling thread's own CPU time.
void burn(nanoseconds cpu) {
  const std::uint64_t until = engine::thread_cpu_ns() + static_cast<std::uint64_t>(cpu.count());
  while (engine::thread_cpu_ns() < until) {
  }
}
}  // namespace

TEST_CASE("CPU time adds up the scoped threads and nothing else") {
  engine::CpuTime total;
  const std::uint64_t own_start = engine::thread_cpu_ns();
  std::thread counted([&] {
    engine::CpuTime::Scope scope(total);
    burn(40ms);
  });
  std::thread not_counted([] { burn(200ms); });  // a vCPU thread, say
  counted.join();
  not_counted.join();
  burn(20ms);  // the driving thread's own share
  const double seconds = total.seconds(own_start);
  CHECK(seconds >= 0.060);
  CHECK(seconds < 0.150);  // far below the 0.26 s burnt in all
}

TEST_CASE("CPU seconds per GiB") {
  CHECK(engine::per_GiB(0.5, 1ull << 30) == Approx(0.5));
  CHECK(engine::per_GiB(0.5, 1ull << 29) == Approx(1.0));
  CHECK(engine::per_GiB(0.5, 0) == 0);
}
