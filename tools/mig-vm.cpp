// mig-vm: run a guest locally and report its heartbeats, or measure its dirty-page rate.
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <chrono>
#include <thread>
#include <vector>

#include "tools/vm_options.h"

namespace {

using namespace std::chrono;

// Like `virsh domdirtyrate-calc`: count the pages written during a window under dirty logging.
double measure_dirty_rate_mbps(mig::kvm::Machine& machine, double seconds) {
  auto& vm = machine.vm();
  std::vector<std::vector<std::uint64_t>> bitmaps;
  for (std::size_t s = 0; s < vm.slot_count(); ++s) bitmaps.emplace_back((vm.slot_pages(s) + 63) / 64);
  vm.set_dirty_logging(true);
  const auto start = steady_clock::now();
  std::this_thread::sleep_for(duration<double>(seconds));
  std::uint64_t pages = 0;
  for (std::size_t s = 0; s < vm.slot_count(); ++s) {
    vm.fetch_and_clear_dirty_log(s, bitmaps[s]);
    for (auto word : bitmaps[s]) pages += static_cast<std::uint64_t>(__builtin_popcountll(word));
  }
  const double elapsed = duration<double>(steady_clock::now() - start).count();
  vm.set_dirty_logging(false);
  return static_cast<double>(pages * mig::kvm::kPageSize) / 1e6 / elapsed;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mig-vm: run a multiboot guest under mig's VMM and report its heartbeats"};
  mig::tools::VmOptions vm_options;
  vm_options.add_to(app);
  double run_for = 5;
  double dirty_rate_window = 0;
  app.add_option("--run-for", run_for, "seconds to run before printing statistics and exiting")->default_val(5);
  app.add_option("--dirty-rate", dirty_rate_window, "measure the dirty-page rate over this many seconds, once the guest is ready");
  CLI11_PARSE(app, argc, argv);

  try {
    auto machine = mig::tools::boot_machine(vm_options);
    const auto started = steady_clock::now();
    if (dirty_rate_window > 0) {
      if (!machine->probe().wait_ready(seconds(60))) throw std::runtime_error("guest did not report ready within 60 s");
      fmt::print("dirty rate: {:.1f} MB/s over {:.2f} s\n", measure_dirty_rate_mbps(*machine, dirty_rate_window),
                 dirty_rate_window);
    }
    const auto deadline = started + duration<double>(run_for);
    while (steady_clock::now() < deadline && !machine->failure()) std::this_thread::sleep_for(milliseconds(20));
    machine->pause();
    mig::tools::print_heartbeat_stats(machine->probe(), stdout);
    if (auto failure = machine->failure()) {
      fmt::print(stderr, "mig-vm: guest failed: {}\n", *failure);
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    fmt::print(stderr, "mig-vm: {}\n", e.what());
    return 1;
  }
}
