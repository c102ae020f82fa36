// bench-vmm: what the VMM core costs on this host. Prints one line per measurement.
//   dirty-log round (KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG) for 256 MiB, 1 GiB, 4 GiB
//   pause latency of a guest spinning at CPL3
//   how fast each workload dirties memory
//   huge pages against 4 KiB pages: populating guest memory, a guest writing under dirty
//   logging, a dirty-log round, and whether dirty logging splits huge pages
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "kvm/machine.h"

using namespace mig;
using namespace std::chrono;

namespace {

struct Percentiles {
  double median, p99, max;
};
Percentiles percentiles(std::vector<double> samples) {
  std::sort(samples.begin(), samples.end());
  return {samples[samples.size() / 2], samples[samples.size() * 99 / 100], samples.back()};
}

double fetch_all_ms(kvm::Vm& vm, std::vector<std::vector<std::uint64_t>>& bitmaps) {
  const auto start = steady_clock::now();
  for (std::size_t s = 0; s < vm.slot_count(); ++s) vm.fetch_and_clear_dirty_log(s, bitmaps[s]);
  return duration<double, std::milli>(steady_clock::now() - start).count();
}

std::vector<std::vector<std::uint64_t>> bitmaps_for(const kvm::Vm& vm) {
  std::vector<std::vector<std::uint64_t>> bitmaps;
  for (std::size_t s = 0; s < vm.slot_count(); ++s) bitmaps.emplace_back((vm.slot_pages(s) + 63) / 64);
  return bitmaps;
}

std::unique_ptr<kvm::Machine> boot(const std::string& image, std::uint64_t mem, unsigned vcpus, const std::string& cmdline,
                                   bool huge_pages = true) {
  kvm::MachineConfig config;
  config.memory.transparent_huge_pages = huge_pages;
  config.layout = kvm::pc_memory_layout(mem);
  config.vcpus = vcpus;
  auto machine = kvm::Machine::create(config);
  machine->boot(kvm::read_multiboot_file(image), cmdline);
  machine->start();
  if (!machine->probe().wait_ready(seconds(120))) throw std::runtime_error("guest not ready");
  return machine;
}

void bench_dirty_log_rounds(const std::string& image) {
  for (std::uint64_t mib : {256ull, 1024ull, 4096ull}) {
    kvm::MachineConfig config;
    config.layout = kvm::pc_memory_layout(mib << 20);
    auto machine = kvm::Machine::create(config);  // no guest: the cost of the log alone
    auto& vm = machine->vm();
    auto bitmaps = bitmaps_for(vm);
    vm.set_dirty_logging(true);
    std::vector<double> samples;
    for (int i = 0; i < 50; ++i) samples.push_back(fetch_all_ms(vm, bitmaps));
    auto p = percentiles(samples);
    fmt::print("dirty-log round, {:>4} MiB, clean log:            median {:.3f} ms  p99 {:.3f} ms  max {:.3f} ms (50 rounds)\n",
               mib, p.median, p.p99, p.max);
  }
  for (std::uint64_t mib : {256ull, 1024ull}) {
    auto machine = boot(image, mib << 20, 1, fmt::format("mode=random rate=0 wss={}M fill=zero", mib / 2));
    auto& vm = machine->vm();
    auto bitmaps = bitmaps_for(vm);
    vm.set_dirty_logging(true);
    std::vector<double> samples;
    std::uint64_t pages = 0;
    for (int i = 0; i < 20; ++i) {
      std::this_thread::sleep_for(50ms);
      samples.push_back(fetch_all_ms(vm, bitmaps));
      for (auto& b : bitmaps)
        for (auto w : b) pages += static_cast<std::uint64_t>(__builtin_popcountll(w));
    }
    auto p = percentiles(samples);
    fmt::print("dirty-log round, {:>4} MiB, guest writing ({:>5} pages/round): median {:.3f} ms  p99 {:.3f} ms  max {:.3f} ms (20 rounds)\n",
               mib, pages / 20, p.median, p.p99, p.max);
  }
}

void bench_pause(const std::string& image) {
  for (auto [vcpus, mode] : {std::pair{1u, "spin"}, {2u, "spin"}, {4u, "spin"}, {1u, "idle"}}) {
    auto machine = boot(image, 128ull << 20, vcpus, fmt::format("mode={} hb=1 cpus={}", mode, vcpus));
    std::vector<double> samples;
    for (int i = 0; i < 200; ++i) {
      const auto start = steady_clock::now();
      machine->pause();
      samples.push_back(duration<double, std::micro>(steady_clock::now() - start).count());
      machine->resume();
      std::this_thread::sleep_for(2ms);
    }
    auto p = percentiles(samples);
    fmt::print("pause latency, {} vCPU(s) {}: median {:.0f} us  p99 {:.0f} us  max {:.0f} us (200 pauses)\n", vcpus,
               std::string(mode) == "spin" ? "spinning at CPL3" : "halted between heartbeats", p.median, p.p99, p.max);
  }
}

void bench_workloads(const std::string& image) {
  for (const char* workload : {"mode=random rate=0", "mode=hotcold rate=0", "mode=sweep rate=0",
                               "mode=random rate=100", "mode=random rate=400"}) {
    auto machine = boot(image, 512ull << 20, 1, fmt::format("{} wss=256M", workload));
    auto& vm = machine->vm();
    auto bitmaps = bitmaps_for(vm);
    vm.set_dirty_logging(true);
    fetch_all_ms(vm, bitmaps);
    std::vector<double> rates;
    bool saturated = false;  // every working-set page dirty in a window: the rate is a floor
    for (int i = 0; i < 5; ++i) {
      const auto start = steady_clock::now();
      std::this_thread::sleep_for(200ms);
      fetch_all_ms(vm, bitmaps);
      std::uint64_t pages = 0;
      for (auto& b : bitmaps)
        for (auto w : b) pages += static_cast<std::uint64_t>(__builtin_popcountll(w));
      rates.push_back(static_cast<double>(pages * kvm::kPageSize) / 1e6 /
                      duration<double>(steady_clock::now() - start).count());
      saturated = saturated || pages >= (256ull << 20) / kvm::kPageSize;
    }
    auto [lo, hi] = std::minmax_element(rates.begin(), rates.end());
    fmt::print("dirty rate under logging, {:<22} wss=256M: median {}{:.0f} MB/s (min {:.0f}, max {:.0f}; 5 x 200 ms){}\n",
               workload, saturated ? ">= " : "", percentiles(rates).median, *lo, *hi,
               saturated ? ": the whole working set was dirty within a window, so this is a floor" : "");
  }
}

// A counter from /proc/vmstat, e.g. thp_split_pmd.
std::uint64_t vmstat(const std::string& name) {
  std::ifstream file("/proc/vmstat");
  std::string key;
  std::uint64_t value = 0;
  while (file >> key >> value)
    if (key == name) return value;
  return 0;
}

// This process's memory on transparent huge pages, in MiB.
std::uint64_t anon_huge_MiB() {
  std::ifstream file("/proc/self/smaps_rollup");
  for (std::string line; std::getline(file, line);)
    if (line.rfind("AnonHugePages:", 0) == 0) return std::stoull(line.substr(14)) >> 10;
  return 0;
}

void bench_huge_pages(const std::string& image) {
  for (bool huge : {true, false}) {
    const char* label = huge ? "huge pages" : "4 KiB pages";
    // Three in a row: the first takes memory the host has had free a while, the later ones
    // reuse what the one before just gave back (on a VM host the two differ a lot).
    std::vector<double> fill_ms;
    for (int i = 0; i < 3; ++i) {
      auto memory = kvm::GuestMemory::create(kvm::pc_memory_layout(1ull << 30),
                                             {.backing = kvm::MemoryBacking::anonymous, .transparent_huge_pages = huge,
                                              .hugetlbfs_dir = {}, .huge_pages_after_fill = false});
      const auto start = steady_clock::now();
      memory.populate();
      fill_ms.push_back(duration<double, std::milli>(steady_clock::now() - start).count());
    }
    fmt::print("populate 1 GiB, {:<11}: {:.0f}, {:.0f}, {:.0f} ms (three in a row)\n", label, fill_ms[0], fill_ms[1], fill_ms[2]);

    const std::uint64_t splits_before = vmstat("thp_split_pmd");
    auto machine = boot(image, 512ull << 20, 1, "mode=random rate=0 wss=256M fill=random", huge);
    const std::uint64_t huge_before = anon_huge_MiB();
    auto& vm = machine->vm();
    auto bitmaps = bitmaps_for(vm);
    vm.set_dirty_logging(true);
    fetch_all_ms(vm, bitmaps);
    std::vector<double> rates, rounds;
    for (int i = 0; i < 10; ++i) {
      const auto start = steady_clock::now();
      std::this_thread::sleep_for(100ms);
      rounds.push_back(fetch_all_ms(vm, bitmaps));
      std::uint64_t pages = 0;
      for (auto& b : bitmaps)
        for (auto w : b) pages += static_cast<std::uint64_t>(__builtin_popcountll(w));
      rates.push_back(static_cast<double>(pages * kvm::kPageSize) / 1e6 / duration<double>(steady_clock::now() - start).count());
    }
    fmt::print("guest writing flat out under dirty logging, {:<11}: median {:.0f} MB/s of pages; dirty-log round median "
               "{:.3f} ms; this process on huge pages {} MiB before logging, {} MiB after; thp_split_pmd +{}\n",
               label, percentiles(rates).median, percentiles(rounds).median, huge_before, anon_huge_MiB(),
               vmstat("thp_split_pmd") - splits_before);
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench-vmm: dirty-log round cost, pause latency, guest dirty rates"};
  std::string image = MIG_GUEST_IMAGE;
  app.add_option("--kernel", image, "workload guest image");
  CLI11_PARSE(app, argc, argv);
  try {
    bench_dirty_log_rounds(image);
    bench_pause(image);
    bench_workloads(image);
    bench_huge_pages(image);
  } catch (const std::exception& e) {
    fmt::print(stderr, "bench-vmm: {}\n", e.what());
    return 1;
  }
}
