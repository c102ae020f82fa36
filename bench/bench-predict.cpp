// bench-predict: what mig-sim says beyond this machine. One dirty trace (recorded with
// --record-trace, or synthesized from words) stands for guests of 64 to 512 GiB, migrated over
// 1, 10, 25 and 100 Gbit/s links, with every registered convergence policy side by side.
//
// The construction, as mig-sim's --guest-scale K states it: a guest K times the traced one
// whose every traced-size part behaves like the traced guest, so memory and dirty rate both
// grow K times. K = guest size / traced size; the default workload is 1 GiB dirtying 25 MB/s
// (hot and cold) from 2 vCPUs, so a 512 GiB guest dirties 12.8 GB/s, about a 100 Gbit/s
// link, from 1024 vCPUs (which dirty-limit caps one by one).
//
// The sender reads ahead of the link by what TCP's send buffer holds, 4 MiB by default
// (Linux's default largest, tcp_wmem's third value), as in the validation (bench/validate-sim.py).
//
//   bench-predict [--trace FILE | --workload WORDS] [--latency MS] [--read-ahead-bytes N] [--json rows.json]
// bench/plot.py predictions ROWS.json OUT.png draws the rows.
#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <fstream>

#include "engine/simulator.h"

using namespace mig;

namespace {

struct Link {
  const char* name;
  double bytes_per_second;
};
constexpr Link kLinks[] = {{"1Gbit", 1e9 / 8}, {"10Gbit", 10e9 / 8}, {"25Gbit", 25e9 / 8}, {"100Gbit", 100e9 / 8}};
constexpr std::uint64_t kGuestGiB[] = {64, 128, 256, 512};

std::uint64_t trace_bytes(const engine::DirtyTrace& trace) { return trace.pages * engine::kPageSize; }

struct Setting {
  double latency_ms = 0.05;
  double read_ahead_bytes = 4 << 20;
};

nlohmann::json predict(const engine::DirtyTrace& trace, const Link& link, std::uint64_t guest_gib, const std::string& policy,
                       const Setting& setting) {
  engine::SimulatorOptions o;
  o.bandwidth_Bps = link.bytes_per_second;
  o.latency_ms = setting.latency_ms;
  o.read_ahead_bytes = setting.read_ahead_bytes;
  o.guest_scale = static_cast<unsigned>((guest_gib << 30) / trace_bytes(trace));
  o.policy = engine::PolicyRegistry::global().make(policy, o.convergence);
  const auto m = engine::simulate(trace, o);
  return {{"workload", trace.workload}, {"link", link.name}, {"link_Bps", link.bytes_per_second}, {"guest_gib", guest_gib},
          {"guest_scale", o.guest_scale}, {"policy", policy}, {"total_ms", m.total_ms}, {"downtime_ms", m.downtime_ms},
          {"rounds", m.rounds}, {"bytes_sent", m.bytes_sent}, {"stop_rule", m.stop_rule}, {"aborted", m.aborted}};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench-predict: mig-sim's predictions for 64-512 GiB guests on 1-100 Gbit/s links, every policy side by side"};
  std::string trace_path, workload = "hotcold:rate=25M,wss=256M,mem=1G,seconds=60,vcpus=2", json_path;
  Setting setting;
  app.add_option("--trace", trace_path, "a recorded dirty trace (mig-vm --record-trace)")->check(CLI::ExistingFile);
  app.add_option("--workload", workload, "otherwise a synthesized one (mig-sim --synthesize's words)");
  app.add_option("--latency", setting.latency_ms, "one-way latency in ms (default 0.05)")->check(CLI::Range(0.0, 1000.0));
  app.add_option("--read-ahead-bytes", setting.read_ahead_bytes,
                 "how far the sender reads ahead of the link, as mig-sim's option (default 4 MiB: TCP's send buffer)")
      ->check(CLI::Range(0.0, 1e12));
  app.add_option("--json", json_path, "write every row here");
  CLI11_PARSE(app, argc, argv);
  try {
    const auto trace = trace_path.empty() ? engine::synthesize_trace(workload) : engine::read_trace(trace_path);
    if ((64ull << 30) % trace_bytes(trace) != 0) throw std::invalid_argument("the traced guest's size must divide 64 GiB");
    fmt::print("{} ({} MiB traced, scaled to each guest size)\n", trace.workload, trace_bytes(trace) >> 20);
    fmt::print("{:<8} {:>5} {:<15} {:>11} {:>11} {:>6} {:>9}  {}\n", "link", "GiB", "policy", "total s", "downtime ms",
               "rounds", "sent GiB", "stop rule");
    nlohmann::json rows = nlohmann::json::array();
    for (const auto& link : kLinks)
      for (auto gib : kGuestGiB)
        for (const auto& [policy, summary] : engine::PolicyRegistry::global().list()) {
          const auto row = predict(trace, link, gib, policy, setting);
          fmt::print("{:<8} {:>5} {:<15} {:>11.1f} {:>11.1f} {:>6} {:>9.1f}  {}{}\n", link.name, gib, policy,
                     row["total_ms"].get<double>() / 1e3, row["downtime_ms"].get<double>(), row["rounds"].get<unsigned>(),
                     row["bytes_sent"].get<double>() / (1ull << 30), row["stop_rule"].get<std::string>(),
                     row["aborted"].get<bool>() ? " (gives up)" : "");
          rows.push_back(row);
        }
    if (!json_path.empty())
      std::ofstream(json_path) << nlohmann::json{{"latency_ms", setting.latency_ms},
                                                 {"read_ahead_bytes", setting.read_ahead_bytes},
                                                 {"rows", rows}}.dump(1)
                               << "\n";
    return 0;
  } catch (const std::exception& e) {
    fmt::print(stderr, "bench-predict: {}\n", e.what());
    return 1;
  }
}
