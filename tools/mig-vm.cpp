// mig-vm: run a guest under mig's VMM, optionally with a QMP control socket, and report its
// heartbeats; or measure its dirty-page rate.
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <chrono>
#include <optional>
#include <thread>

#include "control/qmp_server.h"
#include "tools/cli.h"
#include "tools/vm_options.h"
#include "vmm/kvm_vm.h"

using namespace mig;
using namespace std::chrono;

namespace {

// Like `virsh domdirtyrate-calc`, through the same command the QMP socket offers.
double measure_dirty_rate_mbps(control::Domain& domain, double seconds) {
  domain.calc_dirty_rate(seconds);
  for (;;) {
    const auto info = domain.query_dirty_rate();
    if (info["status"] == "measured") return info["dirty-rate"].get<double>();
    if (info["status"] != "measuring") throw std::runtime_error("the dirty-rate measurement failed");
    std::this_thread::sleep_for(milliseconds(20));
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mig-vm: run a multiboot guest under mig's VMM and report its heartbeats"};
  tools::add_version_flag(app, "mig-vm");
  tools::VmOptions vm_options;
  vm_options.add_to(app);
  double run_for = -1, dirty_rate_window = 0;
  std::string qmp;
  app.add_option("--run-for", run_for, "seconds to run before printing statistics and exiting (default 5; with --qmp, until quit)");
  app.add_option("--dirty-rate", dirty_rate_window, "measure the dirty-page rate over this many seconds, once the guest is ready")
      ->check(CLI::Range(0.1, 60.0));
  app.add_option("--qmp", qmp, "a QMP control socket at unix:PATH (mode 0600): watch, stop, migrate the guest");
  CLI11_PARSE(app, argc, argv);

  tools::ControlSignals signals;
  try {
    const std::string qmp_path = qmp.empty() ? "" : control::qmp_socket_path(qmp);
    if (run_for < 0 && qmp.empty()) run_for = 5;
    auto vm = std::make_unique<vmm::KvmVm>(tools::boot_machine(vm_options));
    fmt::print("mig-vm: guest memory: {}\n", kvm::describe_page_size(vm_options.memory.options()));
    kvm::Machine& machine = vm->machine();
    control::Domain domain(tools::migratable(std::move(vm), vm_options));
    const auto quit_on_signal = signals.on_terminate([&domain] { domain.quit(); });
    std::optional<control::QmpServer> server;
    if (!qmp_path.empty()) server.emplace(domain, qmp_path);
    const auto started = steady_clock::now();
    if (dirty_rate_window > 0) {
      if (!machine.probe().wait_ready(seconds(60))) throw std::runtime_error("guest did not report ready within 60 s");
      fmt::print("dirty rate: {:.1f} MB/s over {:.2f} s\n", measure_dirty_rate_mbps(domain, dirty_rate_window), dirty_rate_window);
    }
    tools::run_guest(domain, machine, run_for < 0 ? -1 : std::max(0.0, run_for - duration<double>(steady_clock::now() - started).count()));
    machine.pause();
    tools::print_heartbeat_stats(machine.probe(), stdout);
    if (auto failure = machine.failure()) {
      fmt::print(stderr, "mig-vm: guest failed: {}\n", *failure);
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    fmt::print(stderr, "mig-vm: {}\n", e.what());
    return 1;
  }
}
