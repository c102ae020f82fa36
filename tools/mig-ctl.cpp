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

#include <functional>
#include <thread>
#include <tuple>
#include <vector>

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

void follow_events(control::QmpClient& client) {
  try {
    while (auto event = client.next_event(std::nullopt)) {
      fmt::print("{}\n", event->dump());
      std::fflush(stdout);
    }
  } catch (const std::runtime_error&) {
    // The guest's process ended: so does its event stream.
  }
}

// What a subcommand does once its arguments are parsed and the socket is connected.
using Action = std::function<void(control::QmpClient&)>;

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mig-ctl: control a running mig guest through its QMP socket"};
  tools::add_version_flag(app, "mig-ctl");
  app.require_subcommand(1);
  std::string socket;
  app.add_option("socket", socket, "the guest's control socket, unix:PATH")->required();
  std::vector<std::pair<CLI::App*, Action>> commands;
  auto command = [&](const char* name, const char* help, Action action) {
    return commands.emplace_back(app.add_subcommand(name, help), std::move(action)).first;
  };

  bool json = false;
  command("info", "the migration's progress or result, like `info migrate`", [&json](control::QmpClient& client) {
    const auto reply = client.execute("query-migrate");
    json ? fmt::print("{}\n", reply.dump(2)) : print_info(reply);
  })->add_flag("--json", json, "print query-migrate's reply as it is");
  std::string endpoint;
  tools::MigrateFlags flags;
  auto* migrate = command("migrate", "start migrating the guest to ENDPOINT (returns at once; follow with info)",
                          [&](control::QmpClient& client) { client.execute("migrate", flags.arguments(endpoint)); });
  migrate->add_option("endpoint", endpoint, "tcp:HOST:PORT or unix:PATH of a waiting mig-recv")->required();
  flags.add_to(*migrate);
  std::string parameter, value;
  auto* set = command("set", "change a migration parameter, also of the migration in progress", [&](control::QmpClient& client) {
    client.execute("migrate-set-parameters", {{parameter == "bandwidth" ? "max-bandwidth" : "downtime-limit", std::stoull(value)}});
  });
  set->add_option("parameter", parameter, "downtime-ms or bandwidth")->required()->check(CLI::IsMember({"downtime-ms", "bandwidth"}));
  tools::size_option(set->add_option("value", value, "milliseconds, or bytes per second (K/M/G suffixes)")->required());
  double seconds = 1;
  command("dirty-rate", "measure how fast the guest dirties memory", [&seconds](control::QmpClient& client) {
    fmt::print("dirty rate: {:.0f} MB/s over {:.2f} s\n", measure_dirty_rate(client, seconds), seconds);
  })->add_option("seconds", seconds, "measuring time")->check(CLI::Range(0.1, 60.0));
  command("status", "the guest's run state", [](control::QmpClient& client) {
    fmt::print("{}\n", client.execute("query-status")["status"].get<std::string>());
  });
  for (const auto& [name, qmp, help] : {std::tuple{"cancel", "migrate_cancel", "cancel the migration in progress; the guest runs on here"},
                                         std::tuple{"postcopy", "migrate-start-postcopy", "switch the migration in progress to post-copy"},
                                         std::tuple{"stop", "stop", "pause the guest"}, std::tuple{"cont", "cont", "resume the guest"},
                                         std::tuple{"quit", "quit", "stop the guest and end its process"}})
    command(name, help, [qmp = std::string(qmp)](control::QmpClient& client) { client.execute(qmp); });
  command("events", "print events as they come, one JSON object a line", follow_events);
  CLI11_PARSE(app, argc, argv);

  try {
    control::QmpClient client(control::qmp_socket_path(socket));
    for (const auto& [subcommand, action] : commands)
      if (subcommand->parsed()) action(client);
    return 0;
  } catch (const control::QmpError& e) {
    fmt::print(stderr, "mig-ctl: {}\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    fmt::print(stderr, "mig-ctl: {}\n", e.what());
    return 1;
  }
}
