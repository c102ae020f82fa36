// bench-tracking: the dirty bitmap against per-vCPU dirty rings, on the synthetic guest.
//   per round: what one fetch of the whole guest's dirty pages costs the migration, by guest
//   size and dirty rate (a bitmap is scanned whole; rings cost what was dirtied)
//   for the guest: how fast its vCPUs write fresh pages flat out with each tracker, and with
//   none
//   the brakes: the dirty rate a throttle of s leaves the guest, against the (1 - s) of it
//   that the policies and mig-sim assume
// This measures mig's software trackers (vmm/soft_dirty_rings.h, GuestMemory's write log), not
// KVM's: the write-protection faults and ring-full exits of a real guest are not in it.
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <thread>
#include <vector>

#include "vmm/synthetic_vm.h"

using namespace mig;
using namespace std::chrono;

namespace {

constexpr unsigned kVcpus = 2;

vmm::DirtyTracking tracking_of(bool rings) {
  vmm::DirtyTracking t;
  if (rings) t.kind = vmm::DirtyTracking::Kind::ring;
  return t;
}

std::unique_ptr<vmm::SyntheticVm> boot(std::uint64_t mem, double dirty_MBps, bool rings) {
  auto vm = vmm::SyntheticVm::boot(mem, kVcpus, {}, {dirty_MBps, 0}, {}, tracking_of(rings));
  if (!vm->probe().wait_ready(seconds(120))) throw std::runtime_error("the synthetic guest did not fill its memory");
  return vm;
}

// One fetch of every region, as the engine does at a round boundary: its time and the pages found.
std::pair<double, std::uint64_t> fetch_all(vmm::SyntheticVm& vm) {
  std::uint64_t pages = 0;
  const auto start = steady_clock::now();
  for (std::size_t r = 0; r < vm.memory_regions().size(); ++r) {
    std::vector<std::uint64_t> bitmap((vm.memory_regions()[r].size / engine::kPageSize + 63) / 64);
    vm.fetch_dirty_log(r, bitmap);
    for (auto word : bitmap) pages += static_cast<std::uint64_t>(__builtin_popcountll(word));
  }
  return {duration<double, std::milli>(steady_clock::now() - start).count(), pages};
}

void round_cost(std::uint64_t mem, double dirty_MBps, bool rings, int rounds) {
  auto vm = boot(mem, dirty_MBps, rings);
  vm->start_dirty_log();
  std::vector<double> ms;
  std::uint64_t pages = 0;
  for (int i = 0; i < rounds; ++i) {
    std::this_thread::sleep_for(milliseconds(100));
    const auto [took, found] = fetch_all(*vm);
    ms.push_back(took);
    pages += found;
  }
  std::sort(ms.begin(), ms.end());
  fmt::print("round cost   {:>6} MiB  {:>5.0f} MB/s  {:<6}  fetch median {:7.3f} ms  max {:7.3f} ms  ({} pages a round)\n",
             mem >> 20, dirty_MBps, rings ? "rings" : "bitmap", ms[ms.size() / 2], ms.back(), pages / static_cast<std::uint64_t>(rounds));
}

// The guest flat out on memory it has filled: pages written per second per vCPU over `time`.
void guest_cost(std::uint64_t mem, const char* tracker, bool rings, bool logging, milliseconds time) {
  auto vm = boot(mem, 0, rings);
  if (logging) vm->start_dirty_log();
  const auto passes = [&] {
    std::uint64_t total = 0;
    for (const auto& hb : vm->probe().snapshot()) total += hb.sweep_passes;
    return total;
  };
  const auto before = passes();
  const auto start = steady_clock::now();
  std::uint64_t harvested = 0;
  while (steady_clock::now() - start < time) {
    std::this_thread::sleep_for(milliseconds(100));
    if (logging) harvested += fetch_all(*vm).second;  // rounds go on meanwhile, so pages are re-armed
  }
  const double seconds = duration<double>(steady_clock::now() - start).count();
  const double pages_per_vcpu = static_cast<double>(passes() - before) * static_cast<double>(mem / engine::kPageSize / kVcpus) / kVcpus;
  fmt::print("guest writes {:>6} MiB  {:<17} {:8.0f} pages/s per vCPU (whole passes; {} pages harvested)\n", mem >> 20, tracker,
             pages_per_vcpu / seconds, harvested);
}

// A 256 MiB guest sweeping `dirty_MBps`, throttled by each share in turn: its dirty rate
// over `time`, against (1 - share) of `dirty_MBps`.
void throttle_accuracy(double dirty_MBps, milliseconds time) {
  auto vm = boot(256ull << 20, dirty_MBps, false);
  vm->start_dirty_log();
  for (double share : {0.0, 0.2, 0.3, 0.5, 0.7}) {
    vm->set_throttle(share);
    std::this_thread::sleep_for(milliseconds(100));
    fetch_all(*vm);
    const auto start = steady_clock::now();
    std::this_thread::sleep_for(time);
    const auto [took, pages] = fetch_all(*vm);
    const double MBps = static_cast<double>(pages * engine::kPageSize) / duration<double>(steady_clock::now() - start).count() / 1e6;
    fmt::print("throttle     {:>3.0f} %  {:>5.0f} MB/s swept: {:6.1f} MB/s dirtied, {:.3f} of (1 - s) of the rate\n", share * 100,
               dirty_MBps, MBps, MBps / ((1 - share) * dirty_MBps));
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench-tracking: the dirty bitmap against per-vCPU dirty rings (synthetic guest)"};
  std::vector<std::uint64_t> sizes_mib = {256, 1024, 4096};
  std::vector<double> rates = {10, 100};
  int rounds = 20;
  app.add_option("--mem-mib", sizes_mib, "guest sizes, MiB");
  app.add_option("--rates", rates, "dirty rates, MB/s");
  app.add_option("--rounds", rounds, "fetches per measurement, 100 ms apart")->check(CLI::Range(1, 1000));
  CLI11_PARSE(app, argc, argv);
  try {
    for (auto mib : sizes_mib)
      for (double rate : rates)
        for (bool rings : {false, true}) round_cost(mib << 20, rate, rings, rounds);
    for (auto mib : sizes_mib) {
      guest_cost(mib << 20, "no tracking", true, false, seconds(2));
      guest_cost(mib << 20, "bitmap", false, true, seconds(2));
      guest_cost(mib << 20, "rings", true, true, seconds(2));
    }
    throttle_accuracy(150, milliseconds(400));
  } catch (const std::exception& e) {
    fmt::print(stderr, "bench-tracking: {}\n", e.what());
    return 1;
  }
}
