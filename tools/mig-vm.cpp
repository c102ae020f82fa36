// mig-vm: run a guest under mig's VMM, optionally with a QMP control socket, and report its
// heartbeats; or measure its dirty-page rate.
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <unistd.h>

#include <chrono>
#include <iostream>
#include <optional>
#include <thread>

#include "control/qmp_server.h"
#include "kvm/cpu_model.h"
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

// --print-cpu and --common-cpu: CPU models instead of a guest.
struct CpuModelModes {
  bool print_host = false;
  std::vector<std::string> common;

  void add_to(CLI::App& app) {
    auto* print_flag = app.add_flag("--print-cpu", print_host, "print this host's CPU model (for --cpu and --common-cpu) and exit");
    app.add_option("--common-cpu", common,
                   "print the CPU model that every one of these hosts' models (files from --print-cpu, oldest host first) "
                   "can give a guest, and exit")
        ->check(CLI::ExistingFile)
        ->excludes(print_flag);
  }
  bool asked() const { return print_host || !common.empty(); }
  // This host's model, named after the host, or the common model of the files given.
  int run() const {
    try {
      if (print_host) {
        char host[256] = {};
        ::gethostname(host, sizeof host - 1);
        kvm::write_cpu_model(std::cout, kvm::host_cpu_model(host, kvm::KvmSystem::open().supported_cpuid()));
      } else {
        std::vector<kvm::CpuModel> hosts;
        for (const auto& path : common) hosts.push_back(kvm::read_cpu_model(path));
        kvm::write_cpu_model(std::cout, kvm::common_cpu_model(hosts));
      }
      return 0;
    } catch (const std::exception& e) {
      fmt::print(stderr, "mig-vm: {}\n", e.what());
      return 1;
    }
  }
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mig-vm: run a multiboot guest under mig's VMM (or a synthetic guest) and report its heartbeats"};
  tools::add_version_flag(app, "mig-vm");
  tools::VmOptions vm_options;
  vm_options.add_to(app);
  CpuModelModes cpu_models;
  cpu_models.add_to(app);
  double run_for = -1, dirty_rate_window = 0;
  std::string qmp;
  app.add_option("--run-for", run_for, "seconds to run before printing statistics and exiting (default 5; with --qmp, until quit)");
  app.add_option("--dirty-rate", dirty_rate_window, "measure the dirty-page rate over this many seconds, once the guest is ready")
      ->check(CLI::Range(0.1, 60.0));
  app.add_option("--qmp", qmp, "a QMP control socket at unix:PATH (mode 0600): watch, stop, migrate the guest");
  CLI11_PARSE(app, argc, argv);

  if (cpu_models.asked()) return cpu_models.run();
  if (!vm_options.defines_guest()) {
    fmt::print(stderr, "mig-vm: --kernel or --synthetic-guest is required (or --print-cpu, --common-cpu)\n");
    return 1;
  }
  tools::ControlSignals signals;
  try {
    const std::string qmp_path = qmp.empty() ? "" : control::qmp_socket_path(qmp);
    if (run_for < 0 && qmp.empty()) run_for = 5;
    auto vm = tools::boot_guest(vm_options);
    fmt::print("mig-vm: guest memory: {}\n", kvm::describe_page_size(vm_options.memory.options()));
    vmm::HostedVm& guest = *vm;
    control::Domain domain(tools::migratable(std::move(vm), vm_options));
    const auto quit_on_signal = signals.on_terminate([&domain] { domain.quit(); });
    std::optional<control::QmpServer> server;
    if (!qmp_path.empty()) server.emplace(domain, qmp_path);
    const auto started = steady_clock::now();
    if (dirty_rate_window > 0) {
      if (!guest.probe().wait_ready(seconds(60))) throw std::runtime_error("guest did not report ready within 60 s");
      fmt::print("dirty rate: {:.1f} MB/s over {:.2f} s\n", measure_dirty_rate_mbps(domain, dirty_rate_window), dirty_rate_window);
    }
    tools::run_guest(domain, guest, run_for < 0 ? -1 : std::max(0.0, run_for - duration<double>(steady_clock::now() - started).count()));
    guest.pause();
    tools::print_heartbeat_stats(guest.probe(), stdout);
    if (auto failure = guest.failure()) {
      fmt::print(stderr, "mig-vm: guest failed: {}\n", *failure);
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    fmt::print(stderr, "mig-vm: {}\n", e.what());
    return 1;
  }
}
