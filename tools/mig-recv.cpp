// mig-recv: wait in incoming mode, receive a migrating guest, and run it (and optionally
// migrate it onward once it runs).
#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <signal.h>

#include <chrono>

#include "tools/migration_cli.h"
#include "tools/vm_options.h"

using namespace mig;

int main(int argc, char** argv) {
  CLI::App app{"mig-recv: wait for a migrating guest, restore it and run it"};
  std::string listen, serial, stats_json;
  double run_for = -1, then_after = 0.5;
  std::uint64_t expect_mem = 0;
  unsigned expect_vcpus = 1;
  bool memfd = false;
  tools::SendOptions onward;
  app.add_option("--listen", listen, "where to wait for the source: tcp:HOST:PORT (port 0 picks a free one) or unix:PATH (same host; with a memfd-backed source, memory is handed over instead of copied)")->required();
  app.add_option("--serial", serial, "where the guest's COM1 output goes: a file, a FIFO, or - for stdout");
  app.add_option("--run-for", run_for, "run the received guest this many seconds, then exit; default: until SIGINT/SIGTERM");
  app.add_option("--stats-json", stats_json, "write the incoming migration's statistics here (and the onward one's to FILE.onward)");
  app.add_flag("--memfd", memfd, "back guest memory with memfd");
  app.add_option("--expect-mem", expect_mem,
                 "build the VM for a guest of this size while waiting, with its memory populated, so receiving "
                 "pays no page faults (like QEMU's -incoming with -m); a different incoming shape is still accepted")
      ->transform(CLI::AsSizeValue(false));
  app.add_option("--expect-vcpus", expect_vcpus, "with --expect-mem: the vCPU count to prepare for")->default_val(1);
  onward.add_to(app, "--then-send-to", false);
  app.add_option("--then-after", then_after, "with --then-send-to: seconds to run the guest here before sending it on")
      ->default_val(0.5);
  CLI11_PARSE(app, argc, argv);

  tools::block_control_signals();
  std::optional<transport::Listener> listener;
  try {
    listener.emplace(transport::Endpoint::parse(listen));
  } catch (const std::exception& e) {
    fmt::print(stderr, "mig-recv: {}\n", e.what());
    return tools::kExitSetupError;
  }
  // Tests and scripts read the actual port from this line (it matters with port 0).
  fmt::print("mig-recv: listening on {}\n", listener->endpoint());
  std::fflush(stdout);

  const auto backing = memfd ? kvm::MemoryBacking::memfd : kvm::MemoryBacking::anonymous;
  engine::ReceiveResult result;
  try {
    // Built (and with --expect-mem, populated) now, while nobody has connected yet.
    const auto factory = tools::KvmVm::factory(
        serial, backing, expect_mem > 0 ? std::optional(tools::KvmVm::pc_shape(expect_mem, expect_vcpus)) : std::nullopt);
    auto stream = listener->accept();
    engine::ReceiverOptions receiver_options;
    receiver_options.accept_channel = [&listener] { return listener->accept(); };
    result = engine::receive(stream, factory, receiver_options);
  } catch (const std::exception& e) {
    result.stats.error = e.what();
  }
  if (result.stats.status != "completed") {
    fmt::print(stderr, "mig-recv: migration failed: {}\n", result.stats.error);
    tools::write_stats_json(stats_json, "destination", result.stats, nullptr);
    return tools::kExitMigrationFailed;
  }
  auto& vm = static_cast<tools::KvmVm&>(*result.vm);
  fmt::print(stderr, "mig-recv: {}\n", tools::receive_summary_line(result.stats));
  tools::write_stats_json(stats_json, "destination", result.stats, nullptr);

  if (!onward.to.empty()) {
    tools::wait_for_signal(then_after);
    const auto stats = tools::migrate_to(vm, onward);
    fmt::print(stderr, "mig-recv: onward: {}\n", tools::summary_line(stats));
    tools::write_stats_json(stats_json.empty() ? "" : stats_json + ".onward", "source", stats, nullptr);
    if (stats.status == "completed") return tools::kExitMigrated;
    if (stats.status == "handoff-unknown") return tools::kExitHandoffUnknown;
    fmt::print(stderr, "mig-recv: the guest keeps running here\n");
  }
  const int sig = tools::wait_for_signal(run_for);
  (void)sig;
  vm.machine().pause();
  tools::print_heartbeat_stats(vm.machine().probe(), stdout);
  tools::write_stats_json(stats_json, "destination", result.stats, &vm.machine());
  if (auto failure = vm.machine().failure()) {
    fmt::print(stderr, "mig-recv: guest failed: {}\n", *failure);
    return tools::kExitGuestFailed;
  }
  return tools::kExitMigrated;
}
