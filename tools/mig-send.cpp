// mig-send: run a guest, then live-migrate it to a mig-recv waiting in incoming mode.
#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <signal.h>

#include <chrono>

#include "tools/migration_cli.h"
#include "tools/vm_options.h"

using namespace mig;
using namespace std::chrono;

int main(int argc, char** argv) {
  CLI::App app{"mig-send: run a guest and live-migrate it to a waiting mig-recv"};
  tools::VmOptions vm_options;
  vm_options.add_to(app);
  tools::SendOptions send_options;
  send_options.add_to(app, "--to", true);
  double after = -1;
  double run_for = -1;
  std::string stats_json;
  app.add_option("--after", after,
                 "migrate this many seconds after the guest reports ready (or after boot, for guests without the "
                 "probe); without it, migrate on SIGUSR1");
  app.add_option("--run-for", run_for, "if the migration fails, keep running the guest this long (seconds from start) before exiting; default: until SIGINT/SIGTERM");
  app.add_option("--stats-json", stats_json, "write the migration's statistics here");
  CLI11_PARSE(app, argc, argv);

  tools::block_control_signals();
  const auto started = steady_clock::now();
  std::unique_ptr<tools::KvmVm> vm;
  try {
    vm = std::make_unique<tools::KvmVm>(tools::boot_machine(vm_options));
  } catch (const std::exception& e) {
    fmt::print(stderr, "mig-send: {}\n", e.what());
    return tools::kExitSetupError;
  }
  if (after >= 0) {
    const bool ready = vm->machine().probe().wait_ready(seconds(60));
    if (!ready) fmt::print(stderr, "mig-send: the guest did not report ready; --after counts from boot\n");
  }
  auto seconds_left = [&](double limit) {
    return limit < 0 ? -1.0 : std::max(0.0, limit - duration<double>(steady_clock::now() - started).count());
  };
  const auto ready_at = steady_clock::now();
  double migrate_at = after < 0 ? -1 : after + duration<double>(ready_at - started).count();

  engine::MigrationStats last;
  last.error = "not migrated";
  for (;;) {
    const int sig = tools::wait_for_signal(migrate_at < 0 ? seconds_left(run_for) : seconds_left(migrate_at));
    if (sig == SIGINT || sig == SIGTERM || (sig == 0 && migrate_at < 0)) break;  // or --run-for expired
    if (auto failure = vm->machine().failure()) {
      fmt::print(stderr, "mig-send: guest failed before migration: {}\n", *failure);
      return tools::kExitGuestFailed;
    }
    last = tools::migrate_to(*vm, send_options);
    fmt::print(stderr, "mig-send: {}\n", tools::summary_line(last));
    if (last.status == "completed") {
      tools::write_stats_json(stats_json, "source", last, nullptr);
      return tools::kExitMigrated;
    }
    if (last.status == "handoff-unknown") {
      tools::write_stats_json(stats_json, "source", last, nullptr);
      fmt::print(stderr, "mig-send: the destination may be running the guest; the source was not resumed\n");
      return tools::kExitHandoffUnknown;
    }
    // Failed: the guest runs on here. SIGUSR1 tries again; --run-for or a signal ends it.
    fmt::print(stderr, "mig-send: the guest keeps running here; send SIGUSR1 to retry\n");
    tools::write_stats_json(stats_json, "source", last, &vm->machine());
    migrate_at = -1;
  }
  // The heartbeat summary now covers the time the guest ran on after any failure.
  vm->machine().pause();
  tools::write_stats_json(stats_json, "source", last, &vm->machine());
  return tools::kExitMigrationFailed;
}
