// mig-send: live-migrate a guest to a mig-recv waiting in incoming mode. Either a guest that
// already runs under another process (--vm unix:QMP_SOCKET, as `virsh migrate --live`), or
// one this process boots itself and then migrates (the form benchmarks use).
#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <unistd.h>

#include <chrono>
#include <optional>
#include <thread>

#include "control/json.h"
#include "control/qmp_client.h"
#include "control/qmp_server.h"
#include "tools/cli.h"
#include "tools/vm_options.h"
#include "vmm/kvm_vm.h"

using namespace mig;
using namespace std::chrono;

namespace {

bool is_finished(const nlohmann::json& info) {
  const auto status = info.value("status", "");
  return status == "completed" || status == "failed" || status == "cancelled" || status == "handoff-unknown";
}

// --check: the destination's answer to the pre-flight check (migrate's dry-run reply), as an
// exit code.
int report_check(const std::function<nlohmann::json()>& ask) {
  nlohmann::json answer;
  try {
    answer = ask();
  } catch (const std::exception& e) {
    fmt::print(stderr, "mig-send: {}\n", e.what());
    return tools::kExitMigrationFailed;
  }
  const auto channels = answer.value("channels", 1u);
  const auto how = answer.value("shared-memory", false)
                       ? std::string(", its memory handed over")
                       : fmt::format(", on {} channel{}{}", channels, channels == 1 ? "" : "s",
                                     answer.value("postcopy", false) ? ", with post-copy" : "");
  fmt::print("mig-send: the destination would take this guest{} (a dry run: nothing else was sent)\n", how);
  return tools::kExitMigrated;
}

// --vm: drives the migration of another process's guest through its QMP socket, polling
// query-migrate as an orchestrator does. A signal cancels it. A guest that moved has no
// business on the source any more, so the source is told to quit, as libvirt does.
int migrate_running_vm(const std::string& socket, const nlohmann::json& arguments, const std::string& stats_json,
                       bool verbose, tools::ControlSignals& signals) {
  control::QmpClient source(control::qmp_socket_path(socket));
  if (arguments.value("dry-run", false)) return report_check([&] { return source.execute("migrate", arguments); });
  source.execute("migrate", arguments);
  const bool tty = ::isatty(STDOUT_FILENO);
  bool cancel_sent = false;
  nlohmann::json info;
  for (;;) {
    info = source.execute("query-migrate");
    if (tty) fmt::print("\r{}", tools::progress_line(info));
    if (verbose && !tty) fmt::print("{}\n", tools::progress_line(info));
    std::fflush(stdout);
    if (is_finished(info)) break;
    if (signals.terminating() && !cancel_sent) {
      source.execute("migrate_cancel");
      cancel_sent = true;
    }
    signals.wait(0.1);
  }
  if (tty) fmt::print("\n");
  fmt::print(stderr, "mig-send: {}\n", tools::summary_line(info));
  if (verbose) fmt::print("{}", tools::round_table_text(info["mig"].value("stats", nlohmann::json::object()).value("round_table", nlohmann::json::array())));
  tools::write_stats_json(stats_json, info["mig"].value("stats", info));
  const auto status = info.value("status", "");
  if (status == "completed") {
    try {
      source.execute("quit");
    } catch (const std::exception&) {
      // It may close the socket before the reply arrives.
    }
  }
  if (status == "handoff-unknown")
    fmt::print(stderr, "mig-send: the destination may be running the guest; the source was not resumed\n");
  return tools::exit_code_for(status);
}

struct BootedGuest {
  tools::VmOptions vm;
  double after = -1, run_for = -1;
  std::string qmp;
};

// When to migrate, in seconds from `started`: --after, counted from the guest's ready
// report (or from now, for a guest without the probe); never (-1) without --after.
double migration_time(const BootedGuest& options, const vmm::HostedVm& guest, const tools::ControlSignals& signals,
                      steady_clock::time_point started) {
  if (options.after < 0) return -1;
  bool ready = false;
  // A guest without mig's probe never reports: the wait ends at 60 s, or earlier at --run-for.
  const auto run_out = [&] { return options.run_for >= 0 && duration<double>(steady_clock::now() - started).count() >= options.run_for; };
  for (int i = 0; i < 600 && !ready && !signals.terminating() && !run_out(); ++i) ready = guest.probe().wait_ready(milliseconds(100));
  if (!ready) fmt::print(stderr, "mig-send: the guest did not report ready; --after counts from boot\n");
  return options.after + duration<double>(steady_clock::now() - started).count();
}

// One migration, reported on stderr and in the stats file. Returns the exit code when it is
// final - the guest left, or may have - and nothing while the guest runs on here.
std::optional<int> migrate_once(control::Domain& domain, const nlohmann::json& arguments, const std::string& stats_json,
                                nlohmann::json& stats, tools::WorkMeter* work = nullptr) {
  if (arguments.value("dry-run", false))
    return report_check(
        [&] { return control::to_json(domain.check_destination(control::parse_migrate_arguments(arguments, domain.parameters()))); });
  try {
    domain.migrate(control::parse_migrate_arguments(arguments, domain.parameters()));
  } catch (const std::exception& e) {
    fmt::print(stderr, "mig-send: {}\n", e.what());
    return std::nullopt;
  }
  domain.wait_migration();
  const auto info = domain.query_migrate();
  if (::isatty(STDOUT_FILENO)) fmt::print("\n");
  fmt::print(stderr, "mig-send: {}\n", tools::summary_line(info));
  stats = info["mig"]["stats"];
  if (work) stats.update(work->report(stats));
  const auto status = info.value("status", "");
  if (status == "completed" || status == "handoff-unknown") tools::write_stats_json(stats_json, stats);
  if (status == "completed") return tools::kExitMigrated;
  if (status == "handoff-unknown") {
    fmt::print(stderr, "mig-send: the destination may be running the guest; the source was not resumed\n");
    return tools::kExitHandoffUnknown;
  }
  if (!stats["postcopy"].is_null()) {
    // Failed after a post-copy switchover: the guest ran at the destination.
    tools::write_stats_json(stats_json, stats);
    fmt::print(stderr, "mig-send: post-copy did not finish; the guest must not run here again\n");
    return tools::kExitHandoffUnknown;
  }
  fmt::print(stderr, "mig-send: the guest keeps running here; send SIGUSR1 to retry\n");
  return std::nullopt;
}

// Boots the guest, migrates it --after seconds after it reports ready (or on SIGUSR1), and
// keeps it running here when the migration fails: SIGUSR1 then retries.
int boot_and_migrate(const BootedGuest& options, const nlohmann::json& arguments, const std::string& stats_json,
                     tools::ControlSignals& signals) {
  const auto started = steady_clock::now();
  std::unique_ptr<vmm::HostedVm> vm;
  std::optional<std::string> qmp_path;
  try {
    if (!options.qmp.empty()) qmp_path = control::qmp_socket_path(options.qmp);
    vm = tools::boot_guest(options.vm);
    fmt::print("mig-send: guest memory: {}\n", kvm::describe_page_size(options.vm.memory.options()));
    std::fflush(stdout);  // the guest is up and SIGUSR1 is handled: a script may wait for this line
  } catch (const std::exception& e) {
    fmt::print(stderr, "mig-send: {}\n", e.what());
    return tools::kExitSetupError;
  }
  vmm::HostedVm& guest = *vm;
  control::Domain domain(tools::migratable(std::move(vm), options.vm));
  const auto quit_on_signal = signals.on_terminate([&domain] { domain.quit(); });
  std::optional<control::QmpServer> server;
  if (qmp_path) server.emplace(domain, *qmp_path);
  // A post-copy whose link broke waits for the operator: say so, and how to go on.
  domain.subscribe([&domain](const control::Event& event) {
    if (event.name == "MIGRATION" && event.data.value("status", "") == "postcopy-paused")
      fmt::print(stderr, "mig-send: {}\n", domain.query_migrate().value("error-desc", "post-copy paused"));
  });
  if (::isatty(STDOUT_FILENO))
    domain.subscribe([&domain](const control::Event& event) {
      if (event.name == "MIGRATION_PASS") fmt::print("\r{}", tools::progress_line(domain.query_migrate()));
      std::fflush(stdout);
    });
  auto seconds_until = [&](double limit) {
    return limit < 0 ? -1.0 : std::max(0.0, limit - duration<double>(steady_clock::now() - started).count());
  };
  nlohmann::json stats = {{"status", "failed"}, {"error", "not migrated"}};
  double migrate_at = migration_time(options, guest, signals, started);
  tools::WorkMeter work(guest.probe());  // the guest's pace before the migration: from ready on
  for (;; migrate_at = -1) {
    const auto signal = signals.wait(seconds_until(migrate_at < 0 ? options.run_for : migrate_at));
    if (signal == tools::ControlSignals::Signal::terminate || (signal == tools::ControlSignals::Signal::none && migrate_at < 0))
      break;  // a signal, or --run-for ran out
    if (auto failure = guest.failure()) {
      fmt::print(stderr, "mig-send: guest failed before migration: {}\n", *failure);
      return tools::kExitGuestFailed;
    }
    work.migration_started();
    if (const auto exit_code = migrate_once(domain, arguments, stats_json, stats, &work)) return *exit_code;
    work.migration_failed();
  }
  // The heartbeat summary covers the time the guest ran on after any failure.
  guest.pause();
  stats.update(tools::guest_report(guest));
  tools::write_stats_json(stats_json, stats);
  return tools::kExitMigrationFailed;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mig-send: live-migrate a guest to a waiting mig-recv - one that runs already (--vm), or one it boots"};
  tools::add_version_flag(app, "mig-send");
  BootedGuest booted;
  booted.vm.add_to(app);
  std::string to, vm_socket, stats_json;
  bool verbose = false;
  tools::MigrateFlags flags;
  app.add_option("--to", to, "destination in incoming mode: tcp:HOST:PORT or unix:PATH")->required();
  app.add_option("--vm", vm_socket, "migrate the guest of another mig process through its QMP socket, unix:PATH, instead of booting one");
  app.add_flag("--verbose", verbose, "with --vm: print a progress line per poll even when stdout is not a terminal");
  app.add_option("--after", booted.after,
                 "migrate this many seconds after the guest reports ready (or after boot, for guests without the "
                 "probe); without it, migrate on SIGUSR1")
      ->check(CLI::Range(0.0, 1e9));
  app.add_option("--run-for", booted.run_for, "if the migration fails, keep running the guest this long (seconds from start) before exiting; default: until SIGINT/SIGTERM")
      ->check(CLI::Range(0.0, 1e9));
  app.add_option("--stats-json", stats_json, "write the migration's statistics here");
  app.add_option("--qmp", booted.qmp, "a QMP control socket for the booted guest, unix:PATH");
  flags.add_to(app);
  CLI11_PARSE(app, argc, argv);
  if (vm_socket.empty() == !booted.vm.defines_guest()) {
    fmt::print(stderr, "mig-send: give either --vm unix:PATH (a running guest), or --kernel IMAGE or --synthetic-guest MBPS (start one)\n");
    return tools::kExitSetupError;
  }
  const auto arguments = flags.arguments(to);
  try {
    control::parse_migrate_arguments(arguments, {});  // every mistake before anything starts
  } catch (const std::exception& e) {
    fmt::print(stderr, "mig-send: {}\n", e.what());
    return tools::kExitSetupError;
  }
  tools::ControlSignals signals;
  try {
    if (!vm_socket.empty()) return migrate_running_vm(vm_socket, arguments, stats_json, verbose, signals);
  } catch (const std::exception& e) {
    fmt::print(stderr, "mig-send: {}\n", e.what());
    return tools::kExitSetupError;
  }
  return boot_and_migrate(booted, arguments, stats_json, signals);
}
