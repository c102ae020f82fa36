// mig-sim: predicts a migration from a dirty trace (engine/simulator.h), for links and guests
// this machine does not have; and makes traces from workload words.
#include <fmt/core.h>

#include <charconv>
#include <filesystem>
#include <iostream>
#include <optional>
#include <vector>

#include "control/json.h"
#include "engine/simulator.h"
#include "tools/cli.h"

using namespace mig;

namespace {

// "25Gbit", "500Mbit" (bits per second, decimal), "3GB", "400MB" (bytes per second, decimal),
// or a plain number of bytes per second.
double parse_rate(const std::string& text) {
  double value = 0;
  const auto* end = text.data() + text.size();
  const auto [rest, error] = std::from_chars(text.data(), end, value);
  const std::string unit(rest, end);
  const std::pair<const char*, double> units[] = {{"", 1},          {"Gbit", 1e9 / 8}, {"Mbit", 1e6 / 8},
                                                  {"Kbit", 1e3 / 8}, {"GB", 1e9},       {"MB", 1e6}, {"KB", 1e3}};
  for (const auto& [name, scale] : units)
    if (error == std::errc{} && value > 0 && unit == name) return value * scale;
  throw std::invalid_argument("'" + text + "' is not a rate like 25Gbit or 400MB (per second)");
}

// When every page of the guest had been written (or held data when the trace began): a
// synthetic guest's fill, after which it is ready; where a migration of it starts is
// counted from there.
std::optional<double> seconds_until_all_written(const engine::DirtyTrace& t) {
  std::vector<bool> written(t.pages, false);
  std::uint64_t count = 0;
  const auto mark = [&](std::uint64_t page) { count += !written[page]; written[page] = true; };
  for (auto page : t.populated) mark(page);
  if (count == t.pages) return 0.0;
  for (std::size_t f = 0; f < t.frames.size(); ++f) {
    for (auto page : t.frames[f]) mark(page);
    if (count == t.pages) return static_cast<double>(f + 1) * static_cast<double>(t.interval.count()) / 1e6;
  }
  return std::nullopt;
}

void print_trace_info(const std::string& path, const engine::DirtyTrace& t) {
  // Pages written per interval, summed: per vCPU named, then those no vCPU is named for.
  std::vector<std::uint64_t> writes(t.vcpus + 1, 0);
  for (std::size_t f = 0; f < t.frames.size(); ++f)
    for (std::size_t i = 0; i < t.frames[f].size(); ++i) {
      const auto writer = t.writer(f, i);
      ++writes[writer == engine::kNoVcpu ? t.vcpus : writer];
    }
  const auto MBps = [&](std::uint64_t pages) { return t.seconds() > 0 ? static_cast<double>(pages * engine::kPageSize) / t.seconds() / 1e6 : 0.0; };
  std::uint64_t total = 0;
  for (auto w : writes) total += w;
  fmt::print("{}: {} ({} bytes)\n  workload: {}\n  guest {:.0f} MiB, {} pages populated; {} intervals of {} ms = {:g} s\n"
             "  {:.1f} MB/s dirtied on average (pages written per interval, summed)\n",
             path, t.frames.size() ? "a dirty trace" : "an empty dirty trace", std::filesystem::file_size(path), t.workload,
             static_cast<double>(t.guest_bytes()) / (1 << 20), t.populated.size(), t.frames.size(),
             static_cast<double>(t.interval.count()) / 1000, t.seconds(), MBps(total));
  if (const auto all = seconds_until_all_written(t)) fmt::print("  every page written by {:.2f} s\n", *all);
  if (t.vcpus == 0) {
    fmt::print("  names no vCPU (recorded without dirty rings): dirty-limit replays without its brake\n");
    return;
  }
  for (unsigned v = 0; v < t.vcpus; ++v) fmt::print("  vCPU {}: {:.1f} MB/s\n", v, MBps(writes[v]));
  fmt::print("  no vCPU named (the VMM's writes): {:.1f} MB/s\n", MBps(writes[t.vcpus]));
}

// A real run's post-copy fields, less those a trace cannot tell.
nlohmann::json postcopy_json(const std::optional<engine::PostcopyStats>& p) {
  if (!p) return nullptr;
  auto json = control::to_json(*p);
  for (const char* unknown : {"recoveries", "pages_zero_filled", "fault_latency", "postcopy-vcpu-blocktime"}) json.erase(unknown);
  return json;
}

nlohmann::json to_json(const engine::SimulatedMigration& m) {
  nlohmann::json rounds = nlohmann::json::array();
  for (const auto& r : m.round_table) rounds.push_back(control::to_json(r));
  return {{"total_ms", m.total_ms},       {"downtime_ms", m.downtime_ms}, {"rounds", m.rounds},
          {"bytes_sent", m.bytes_sent},   {"guest_bytes", m.guest_bytes}, {"policy", m.policy},
          {"stop_reason", engine::to_string(m.stop_reason)},              {"stop_rule", m.stop_rule},
          {"aborted", m.aborted},         {"postcopy", postcopy_json(m.postcopy)},
          {"round_table", rounds}};
}

struct Flags {
  std::string trace_path, synthesize, output, policy_spec = "mig", bandwidth = "1Gbit", pause_bandwidth, max_bandwidth;
  engine::SimulatorOptions o;
  double interval_ms = 10;
  bool json = false, info = false, postcopy = false, postcopy_ram = false;

  void add_to(CLI::App& app) {
    app.add_option("trace", trace_path, "the dirty trace to replay")->check(CLI::ExistingFile);
    app.add_option("--policy", policy_spec, "NAME[:key=value,...] (default mig)")
        ->check(tools::parses_with([](const std::string& spec) { engine::PolicyRegistry::global().make(spec); }));
    app.add_option("--bandwidth", bandwidth, "the link, e.g. 25Gbit or 3GB (per second; default 1Gbit)")
        ->check(tools::parses_with(parse_rate));
    app.add_option("--pause-bandwidth", pause_bandwidth, "the final round's rate, which mig does not limit (default: --bandwidth)")
        ->check(tools::parses_with(parse_rate));
    app.add_option("--max-bandwidth", max_bandwidth,
                   "the sender's limit, mig-send's --bandwidth: a token bucket on pre-copy page data over the link (default: none)")
        ->check(tools::parses_with(parse_rate));
    app.add_option("--latency", o.latency_ms, "one-way latency in ms (default 0.05)")->check(CLI::Range(0.0, 10000.0));
    app.add_option("--read-ahead-bytes", o.read_ahead_bytes,
                   "how far the sender reads ahead of the link: the send buffer and link queues (default 0)")
        ->check(CLI::Range(0.0, 1e12));
    auto* after_round_0 = app.add_flag("--postcopy", postcopy, "as mig-send --postcopy: switch to post-copy once round 0 is done");
    app.add_flag("--postcopy-ram", postcopy_ram,
                 "as mig-send --postcopy-ram: switch to post-copy when the policy finds pre-copy cannot converge")
        ->excludes(after_round_0);
    app.add_option("--channels", o.channels, "parallel channels (they share the bandwidth)")->check(CLI::Range(1u, 16u));
    app.add_option("--guest-scale", o.guest_scale, "a guest K times the trace's: K copies side by side")->check(CLI::Range(1u, 1u << 16));
    app.add_option("--downtime-ms", o.convergence.downtime_target_ms, "the downtime target (default 30)")->check(CLI::Range(0.0, 1e7));
    app.add_option("--max-iterations", o.convergence.max_rounds, "at most this many pre-copy rounds (default 30)")->check(CLI::Range(1u, 1000u));
    app.add_option("--setup-ms", o.setup_ms, "connecting and the handshake, beyond round trips (default 1)")->check(CLI::Range(0.0, 1e6));
    app.add_option("--restore-ms", o.restore_ms, "verify, restore and resume at the destination (default 1)")->check(CLI::Range(0.0, 1e6));
    app.add_option("--trace-start", o.trace_start_s, "seconds into the trace where the migration starts (default 0)")
        ->check(CLI::Range(0.0, 1e6));
    app.add_flag("--json", json, "one JSON object: total_ms, downtime_ms, rounds, bytes_sent, round_table, ...");
    app.add_flag("--info", info, "describe the trace instead of replaying it");
    app.add_option("--synthesize", synthesize, "write a trace of WORKLOAD (random|sweep|hotcold:rate=,wss=,mem=,seconds=,...) to --output");
    app.add_option("--output", output, "where --synthesize writes");
    app.add_option("--interval-ms", interval_ms, "--synthesize: the trace's interval (default 10)")->check(CLI::Range(0.1, 10000.0));
  }
};

void write_synthetic_trace(const Flags& f) {
  if (f.output.empty()) throw std::invalid_argument("--synthesize needs --output");
  const auto trace = engine::synthesize_trace(f.synthesize, std::chrono::microseconds(static_cast<long>(f.interval_ms * 1000)));
  engine::write_trace(f.output, trace);
  print_trace_info(f.output, trace);
}

void predict(Flags f, const engine::DirtyTrace& trace) {
  f.o.bandwidth_Bps = parse_rate(f.bandwidth);
  if (!f.pause_bandwidth.empty()) f.o.pause_bandwidth_Bps = parse_rate(f.pause_bandwidth);
  if (!f.max_bandwidth.empty()) f.o.bandwidth_limit_Bps = parse_rate(f.max_bandwidth);
  using Postcopy = engine::SimulatorOptions::Postcopy;
  f.o.postcopy = f.postcopy ? Postcopy::after_round_0 : f.postcopy_ram ? Postcopy::on_no_progress : Postcopy::off;
  f.o.policy = engine::PolicyRegistry::global().make(f.policy_spec, f.o.convergence);
  const auto m = engine::simulate(trace, f.o);
  const auto result = to_json(m);
  if (f.json) {
    fmt::print("{}\n", result.dump());
    return;
  }
  fmt::print("{}", tools::round_table_text(result["round_table"]));
  fmt::print("predicted: {} in {:.1f} ms, {} rounds, {:.1f} MB sent, downtime {:.2f} ms; {} ({})\n",
             m.aborted ? "gave up (the source runs on)" : "migrated", m.total_ms, m.rounds,
             static_cast<double>(m.bytes_sent) / 1e6, m.downtime_ms, m.policy, m.stop_rule);
  if (const auto& p = m.postcopy)
    fmt::print("post-copy: switched at {:.1f} ms; {} pages after it, {} requested by the guest's writes (reads are not in a "
               "trace), blocktime {:.1f} ms; every page there {:.1f} ms after the source heard the guest run\n",
               p->switchover_ms, p->pages_needed, p->requests, p->blocktime_ms, p->postcopy_ms);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mig-sim: predict a migration from a dirty trace (mig-vm/mig-send --record-trace, or --synthesize)"};
  tools::add_version_flag(app, "mig-sim");
  Flags flags;
  flags.add_to(app);
  CLI11_PARSE(app, argc, argv);
  try {
    if (!flags.synthesize.empty()) {
      write_synthetic_trace(flags);
      return 0;
    }
    if (flags.trace_path.empty()) throw std::invalid_argument("give a trace to replay (or --synthesize)");
    const auto trace = engine::read_trace(flags.trace_path);
    if (flags.info)
      print_trace_info(flags.trace_path, trace);
    else
      predict(flags, trace);
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "mig-sim: " << e.what() << "\n";
    return 1;
  }
}
