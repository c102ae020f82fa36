// mig-ctl: a thin command line over a QMP control socket, in the spirit of virsh.
//
//   mig-ctl unix:PATH info [--json]          like `info migrate`
//   mig-ctl unix:PATH migrate ENDPOINT [options]
//   mig-ctl unix:PATH cancel
//   mig-ctl unix:PATH set downtime-ms N | set bandwidth RATE
//   mig-ctl unix:PATH dirty-rate SECONDS
//   mig-ctl unix:PATH status | stop | cont | quit
//   mig-ctl unix:PATH events                 follows the event stream
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <thread>

#include "control/qmp_client.h"
#include "control/qmp_server.h"
#include "tools/cli.h"

using namespace mig;

namespace {

void print_info(const nlohmann::json& info) {
  if (info.empty()) return fmt::print("no migration\n");
  fmt::print("status: {}\n", info.value("status", ""));
  if (info.contains("error-desc")) fmt::print("error: {}\n", info["error-desc"].get<std::string>());
  fmt::print("total time: {} ms\n", info.value("total-time", 0));
  if (info.contains("expected-downtime")) fmt::print("expected downtime: {} ms\n", info["expected-downtime"].get<std::int64_t>());
  if (info.contains("downtime")) fmt::print("downtime: {} ms\n", info["downtime"].get<std::int64_t>());
  const auto ram = info.value("ram", nlohmann::json::object());
  for (const char* field : {"transferred", "remaining", "total"})
    if (ram.contains(field)) fmt::print("{}: {:.1f} MiB\n", field, ram[field].get<double>() / (1 << 20));
  if (ram.contains("dirty-sync-count")) fmt::print("dirty syncs: {}\n", ram["dirty-sync-count"].get<std::uint64_t>());
  if (ram.contains("mbps")) fmt::print("throughput: {:.1f} Mbit/s\n", ram["mbps"].get<double>());
  if (info.contains("cpu-throttle-percentage")) fmt::print("throttle: {} %\n", info["cpu-throttle-percentage"].get<unsigned>());
  const auto own = info.value("mig", nlohmann::json::object());
  if (own.contains("phase")) fmt::print("phase: {}\n", own["phase"].get<std::string>());
  if (own.contains("guest-downtime-ms") && own["guest-downtime-ms"].is_number())
    fmt::print("guest saw: {:.2f} ms\n", own["guest-downtime-ms"].get<double>());
  if (own.contains("verified")) fmt::print("verified: {}\n", own["verified"].get<bool>());
}

double measure_dirty_rate(control::QmpClient& client, double seconds) {
  client.execute("calc-dirty-rate", {{"calc-time", seconds}});
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  for (;;) {
    const auto info = client.execute("query-dirty-rate");
    if (info["status"] == "measured") return info["dirty-rate"].get<double>();
    if (info["status"] != "measuring") throw std::runtime_error("the dirty-rate measurement failed");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mig-ctl: control a running mig guest through its QMP socket"};
  app.require_subcommand(1);
  std::string socket;
  app.add_option("socket", socket, "the guest's control socket, unix:PATH")->required();
  bool json = false;
  auto* info = app.add_subcommand("info", "the migration's progress or result, like `info migrate`");
  info->add_flag("--json", json, "print query-migrate's reply as it is");
  std::string endpoint;
  tools::MigrateFlags flags;
  auto* migrate = app.add_subcommand("migrate", "start migrating the guest to ENDPOINT (returns at once; follow with info)");
  migrate->add_option("endpoint", endpoint, "tcp:HOST:PORT or unix:PATH of a waiting mig-recv")->required();
  flags.add_to(*migrate);
  auto* cancel = app.add_subcommand("cancel", "cancel the migration in progress; the guest runs on here");
  std::string parameter, value;
  auto* set = app.add_subcommand("set", "change a migration parameter, also of the migration in progress");
  set->add_option("parameter", parameter, "downtime-ms or bandwidth")->required()->check(CLI::IsMember({"downtime-ms", "bandwidth"}));
  tools::size_option(set->add_option("value", value, "milliseconds, or bytes per second (K/M/G suffixes)")->required());
  double seconds = 1;
  auto* dirty = app.add_subcommand("dirty-rate", "measure how fast the guest dirties memory");
  dirty->add_option("seconds", seconds, "measuring time")->check(CLI::Range(0.1, 60.0));
  auto* status = app.add_subcommand("status", "the guest's run state");
  auto* stop = app.add_subcommand("stop", "pause the guest");
  auto* cont = app.add_subcommand("cont", "resume the guest");
  auto* quit = app.add_subcommand("quit", "stop the guest and end its process");
  auto* events = app.add_subcommand("events", "print events as they come, one JSON object a line");
  CLI11_PARSE(app, argc, argv);

  try {
    control::QmpClient client(control::qmp_socket_path(socket));
    if (*info) {
      const auto reply = client.execute("query-migrate");
      json ? fmt::print("{}\n", reply.dump(2)) : print_info(reply);
    } else if (*migrate) {
      client.execute("migrate", flags.arguments(endpoint));
    } else if (*cancel) {
      client.execute("migrate_cancel");
    } else if (*set) {
      client.execute("migrate-set-parameters",
                     {{parameter == "bandwidth" ? "max-bandwidth" : "downtime-limit", std::stoull(value)}});
    } else if (*dirty) {
      fmt::print("dirty rate: {:.0f} MB/s over {:.2f} s\n", measure_dirty_rate(client, seconds), seconds);
    } else if (*status) {
      fmt::print("{}\n", client.execute("query-status")["status"].get<std::string>());
    } else if (*stop) {
      client.execute("stop");
    } else if (*cont) {
      client.execute("cont");
    } else if (*quit) {
      client.execute("quit");
    } else if (*events) {
      try {
        while (auto event = client.next_event(std::nullopt)) {
          fmt::print("{}\n", event->dump());
          std::fflush(stdout);
        }
      } catch (const std::runtime_error&) {
        // The guest's process ended: so does its event stream.
      }
    }
    return 0;
  } catch (const control::QmpError& e) {
    fmt::print(stderr, "mig-ctl: {}\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    fmt::print(stderr, "mig-ctl: {}\n", e.what());
    return 1;
  }
}
