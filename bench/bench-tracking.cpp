// bench-tracking: the dirty bitmap against per-vCPU dirty rings, on the synthetic guest or,
// with --vm kvm, on the workload guest under KVM (mode=sweep on 2 vCPUs).
//   per round: what one fetch of the whole guest's dirty pages costs the migration, by guest
//   size and dirty rate (a bitmap is scanned whole; rings cost what was dirtied)
//   for the guest: how fast its vCPUs write fresh pages flat out with each tracker, and with
//   none
//   the brakes: the dirty rate a throttle of s leaves the guest, against the (1 - s) of it
//   that the policies and mig-sim assume; and the rate each vCPU dirties under a dirty limit,
//   against the cap (rings only)
// On the synthetic guest this measures mig's software trackers (vmm/soft_dirty_rings.h,
// GuestMemory's write log): the write-protection faults and ring-full exits of a KVM guest are
// only in --vm kvm.
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <thread>
#include <vector>

#include "kvm/multiboot.h"
#include "vmm/kvm_vm.h"
#include "vmm/synthetic_vm.h"

using namespace mig;
using namespace std::chrono;

namespace {

constexpr unsigned kVcpus = 2;

bool on_kvm = false;  // --vm kvm

vmm::DirtyTracking tracking_of(bool rings) {
  vmm::DirtyTracking t;
  if (rings) t.kind = vmm::DirtyTracking::Kind::ring;
  return t;
}

// The bytes the guest's vCPUs sweep between them: the synthetic guest's whole memory; the
// workload guest's working set, which leaves room below it for its kernel and tables.
std::uint64_t swept_bytes(std::uint64_t mem) { return on_kvm ? mem - (16ull << 20) : mem; }

std::unique_ptr<vmm::HostedVm> boot_kvm(std::uint64_t mem, double dirty_MBps, bool rings) {
  kvm::MachineConfig config;
  config.layout = kvm::pc_memory_layout(mem);
  config.vcpus = kVcpus;
  config.dirty_ring_entries = rings ? tracking_of(true).ring_entries : 0;
  auto machine = kvm::Machine::create(config);
  machine->boot(kvm::read_multiboot_file(MIG_GUEST_IMAGE),
                fmt::format("mode=sweep rate={:.0f} wss={}M cpus={} hb=1", dirty_MBps, swept_bytes(mem) >> 20, kVcpus));
  machine->start();
  return std::make_unique<vmm::KvmVm>(std::move(machine));
}

// Flat out, the workload guest's sweep has no fill before it: its first pass is what fills
// memory, and what follows writes filled pages, as the synthetic guest's does once ready.
void wait_first_pass(const vmm::HostedVm& vm) {
  const auto first_pass_done = [&] {
    for (const auto& hb : vm.probe().snapshot())
      if (hb.sweep_passes == 0) return false;
    return true;
  };
  for (auto until = steady_clock::now() + seconds(120); !first_pass_done();) {
    if (steady_clock::now() > until) throw std::runtime_error("the workload guest did not finish its first pass");
    std::this_thread::sleep_for(milliseconds(10));
  }
}

std::unique_ptr<vmm::HostedVm> boot(std::uint64_t mem, double dirty_MBps, bool rings) {
  auto vm = on_kvm ? boot_kvm(mem, dirty_MBps, rings)
                   : std::unique_ptr<vmm::HostedVm>(vmm::SyntheticVm::boot(mem, kVcpus, {}, {dirty_MBps, 0}, {}, tracking_of(rings)));
  if (!vm->probe().wait_ready(seconds(120))) throw std::runtime_error("the guest did not get ready");
  if (on_kvm && dirty_MBps == 0) wait_first_pass(*vm);
  return vm;
}

// One fetch of every region, as the engine does at a round boundary: its time and the pages found.
std::pair<double, std::uint64_t> fetch_all(vmm::HostedVm& vm) {
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
// With tracking, the pages harvested: a sweep writes each page once a pass, and each fetch
// re-arms what it found, so every write that paid a fault is counted (whole passes come too
// seldom there: a 1 GiB guest made none in 2 s on PVM). Without it, whole passes, of which a
// guest that pays no fault makes many.
void guest_cost(std::uint64_t mem, const char* tracker, bool rings, bool logging, milliseconds time) {
  auto vm = boot(mem, 0, rings);
  if (logging) {
    vm->start_dirty_log();
    std::this_thread::sleep_for(milliseconds(100));
    fetch_all(*vm);  // the pages of the pass under way when logging began
  }
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
    if (logging) harvested += fetch_all(*vm).second;
  }
  const double seconds = duration<double>(steady_clock::now() - start).count();
  const double pages = logging ? static_cast<double>(harvested)
                               : static_cast<double>(passes() - before) * static_cast<double>(swept_bytes(mem) / engine::kPageSize / kVcpus);
  fmt::print("guest writes {:>6} MiB  {:<17} {:10.0f} pages/s per vCPU ({})\n", mem >> 20, tracker, pages / kVcpus / seconds,
             logging ? "pages harvested" : "whole passes");
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

// Pages each vCPU dirtied since the last fetch, from the rings.
std::vector<std::uint64_t> fetch_by_vcpu(vmm::HostedVm& vm) {
  std::vector<std::uint64_t> pages(kVcpus);
  for (std::size_t r = 0; r < vm.memory_regions().size(); ++r) {
    const std::size_t words = (vm.memory_regions()[r].size / engine::kPageSize + 63) / 64;
    std::vector<std::uint64_t> unnamed(words);
    std::vector<std::vector<std::uint64_t>> bitmaps(kVcpus, std::vector<std::uint64_t>(words));
    std::vector<std::span<std::uint64_t>> spans(bitmaps.begin(), bitmaps.end());
    vm.fetch_dirty_log_by_vcpu(r, unnamed, spans);
    for (unsigned v = 0; v < kVcpus; ++v)
      for (auto word : bitmaps[v]) pages[v] += static_cast<std::uint64_t>(__builtin_popcountll(word));
  }
  return pages;
}

// A 256 MiB guest sweeping `dirty_MBps` with rings, each vCPU capped by dirty-limit in turn:
// the rate each vCPU dirtied over `time`, against the cap. A synthetic vCPU checks its cap at
// every 1 ms heartbeat; on KVM the limiter looks every 10 ms, so a vCPU may run past its cap
// until the next look, and low caps are where that would show.
void dirty_limit_accuracy(double dirty_MBps, milliseconds time) {
  auto vm = boot(256ull << 20, dirty_MBps, true);
  vm->start_dirty_log();
  for (double cap_MBps : {30.0, 10.0, 3.0, 1.0}) {
    if (!vm->set_vcpu_dirty_limit(cap_MBps * 1e6)) throw std::runtime_error("this guest cannot take a dirty limit");
    std::this_thread::sleep_for(milliseconds(200));
    fetch_by_vcpu(*vm);
    const auto start = steady_clock::now();
    std::this_thread::sleep_for(time);
    const auto pages = fetch_by_vcpu(*vm);
    const double seconds = duration<double>(steady_clock::now() - start).count();
    std::string rates;
    for (auto p : pages) rates += fmt::format(" {:6.2f}", static_cast<double>(p * engine::kPageSize) / seconds / 1e6);
    fmt::print("dirty-limit  {:>5.1f} MB/s per vCPU, {:>5.0f} MB/s swept: dirtied per vCPU{} MB/s\n", cap_MBps, dirty_MBps, rates);
  }
  vm->set_vcpu_dirty_limit(0);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench-tracking: the dirty bitmap against per-vCPU dirty rings"};
  std::vector<std::uint64_t> sizes_mib = {256, 1024, 4096};
  std::vector<double> rates = {10, 100};
  int rounds = 20;
  app.add_option("--mem-mib", sizes_mib, "guest sizes, MiB");
  app.add_option("--rates", rates, "dirty rates, MB/s");
  app.add_option("--rounds", rounds, "fetches per measurement, 100 ms apart")->check(CLI::Range(1, 1000));
  std::string vm_kind = "synthetic";
  app.add_option("--vm", vm_kind, "the synthetic guest, or the workload guest on KVM")
      ->check(CLI::IsMember({"synthetic", "kvm"}))
      ->default_str("synthetic");
  CLI11_PARSE(app, argc, argv);
  on_kvm = vm_kind == "kvm";
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
    dirty_limit_accuracy(150, milliseconds(1000));
  } catch (const std::exception& e) {
    fmt::print(stderr, "bench-tracking: {}\n", e.what());
    return 1;
  }
}
