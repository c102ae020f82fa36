// bench-sim: how well mig-sim predicts real migrations. Each workload is a dirty trace; the
// real run migrates a VM that writes the trace's pages into its memory in real time (a
// replaying VM, in this process) through the real engine over TCP loopback, and the
// simulator replays the same trace, under mig's policy and xen's, and with post-copy right
// after round 0. Per link, an idle guest's migration first calibrates the simulator (the
// engine's page throughput, set-up and restore times); the workloads are then predicted,
// never fitted.
//
//   bench-sim [--repeats 3] [--json rows.json]
#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <fstream>
#include <future>
#include <mutex>
#include <thread>

#include "common/page_allocator.h"
#include "engine/incoming_migration.h"
#include "engine/pages.h"
#include "engine/simulator.h"
#include "engine/source_migration.h"
#include "transport/endpoint.h"

using namespace mig;
using namespace std::chrono_literals;

namespace {

// A VM whose guest writes a trace's pages into its memory, interval by interval, while it
// runs; slowed by the throttle as a CPU-bound guest would be. Its state says where in the
// trace the guest is, so that after a switch to post-copy it goes on at the destination,
// which then asks for the pages it writes before they come.
class ReplayingVm final : public engine::MigratableVm {
 public:
  // A source: the guest runs from now.
  static std::unique_ptr<ReplayingVm> running(const engine::DirtyTrace& trace) {
    return std::unique_ptr<ReplayingVm>(new ReplayingVm(&trace, trace.pages, false));
  }
  // A destination, paused until the migration resumes it; with a trace, its guest then
  // goes on from where the arriving state says it was.
  static std::unique_ptr<ReplayingVm> arriving(const engine::DirtyTrace* trace, std::uint64_t pages) {
    return std::unique_ptr<ReplayingVm>(new ReplayingVm(trace, pages, true));
  }
  ~ReplayingVm() override {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    if (thread_.joinable()) thread_.join();
  }

  unsigned vcpu_count() const override { return 1; }
  std::vector<engine::MemoryRegion> memory_regions() const override {
    return {{0, memory_.size(), const_cast<std::byte*>(memory_.data())}};
  }
  void populated_pages(std::size_t, std::span<std::uint64_t> bitmap) override {
    std::fill(bitmap.begin(), bitmap.end(), 0);
    if (trace_)
      for (auto page : trace_->populated) bitmap[page / 64] |= 1ull << (page % 64);
  }
  void start_dirty_log() override { set(logging_, true); }
  void stop_dirty_log() override { set(logging_, false); }
  void fetch_dirty_log(std::size_t, std::span<std::uint64_t> bitmap) override {
    std::lock_guard lock(mutex_);
    std::copy(dirty_.begin(), dirty_.end(), bitmap.begin());
    std::fill(dirty_.begin(), dirty_.end(), 0);
  }
  // Re-arming waits for the engine, as KVM's manual protection lets it (and mig-sim models).
  void fetch_dirty_log_unarmed(std::size_t, std::span<std::uint64_t> bitmap) override {
    std::lock_guard lock(mutex_);
    std::copy(dirty_.begin(), dirty_.end(), bitmap.begin());
  }
  void rearm_dirty_pages(std::size_t, std::uint64_t first_page, std::span<const std::uint64_t> pages) override {
    std::lock_guard lock(mutex_);
    engine::clear_pages(dirty_, first_page, pages);
  }
  bool set_throttle(double share) override {
    std::lock_guard lock(mutex_);
    throttle_ = share;
    return true;
  }
  void pause() override { set(paused_, true); }
  void resume() override { set(paused_, false); }
  std::vector<engine::StateSection> save_state() override {
    std::lock_guard lock(mutex_);
    std::vector<std::byte> state(4096);
    std::memcpy(state.data(), &trace_time_, sizeof trace_time_);
    return {{"replay", 1, std::move(state)}};
  }
  void restore_state(const std::vector<engine::StateSection>& sections) override {
    std::lock_guard lock(mutex_);
    std::memcpy(&trace_time_, sections.at(0).data.data(), sizeof trace_time_);
  }

 private:
  ReplayingVm(const engine::DirtyTrace* trace, std::uint64_t pages, bool paused)
      : trace_(trace), memory_(pages * engine::kPageSize), dirty_((pages + 63) / 64), paused_(paused) {
    if (!trace_) return;
    // A running guest's populated pages hold data; an arriving one's come over the wire.
    if (!paused)
      for (auto page : trace_->populated) std::memset(&memory_[page * engine::kPageSize], 0x5a, 64);
    thread_ = std::thread([this] { replay(); });
  }

  void set(bool& flag, bool value) {
    std::lock_guard lock(mutex_);
    flag = value;
  }

  // Ten steps per interval, each writing the trace's writes whose moment has come.
  void replay() {
    const auto step = trace_->interval / 10;
    auto next = std::chrono::steady_clock::now();
    std::uint64_t value = 1;
    for (;;) {
      next += step;
      std::this_thread::sleep_until(next);
      std::lock_guard lock(mutex_);
      if (stopping_) return;
      if (paused_) continue;
      const double until = trace_time_ + 0.1 * (1 - throttle_);
      engine::for_each_write(*trace_, trace_time_, until, [&](std::uint64_t page, double) {
        ++value;
        std::memcpy(&memory_[page * engine::kPageSize + (value % 512) * 8], &value, sizeof value);
        if (logging_) dirty_[page / 64] |= 1ull << (page % 64);
      });
      trace_time_ = until;
    }
  }

  const engine::DirtyTrace* trace_;
  GuestBytes memory_;
  std::mutex mutex_;
  std::vector<std::uint64_t> dirty_;
  bool logging_ = false, paused_, stopping_ = false;
  double throttle_ = 0;
  double trace_time_ = 0;  // in intervals
  std::thread thread_;
};

struct Link {
  std::string name;
  double limit_Bps = 0;  // the engine's bandwidth limit; 0: loopback as it comes
};

// What a pair migrates under: a policy, and whether post-copy takes over right after round 0
// (mig-send --postcopy).
struct Mode {
  std::string policy;
  bool postcopy = false;
  std::string label() const { return postcopy ? policy + ", post-copy" : policy; }
};

engine::MigrationStats migrate(const engine::DirtyTrace& trace, const Link& link, const Mode& mode) {
  const auto vm = ReplayingVm::running(trace);
  std::this_thread::sleep_for(200ms);  // the guest has been running a while
  transport::Listener listener(transport::Endpoint::parse("tcp:127.0.0.1:0"));
  auto receiver = std::async(std::launch::async, [&] {
    auto stream = listener.accept(10s);
    engine::ReceiverOptions options;
    options.accept_channel = [&](std::chrono::milliseconds timeout) { return listener.accept(timeout); };
    // In post-copy the guest goes on at the destination, and asks for the pages it writes
    // before they come.
    auto factory = [&](const engine::VmShape& shape) {
      return ReplayingVm::arriving(mode.postcopy ? &trace : nullptr, shape.regions.at(0).size / engine::kPageSize);
    };
    return engine::IncomingMigration(stream, factory, options).run().stats;
  });
  const auto endpoint = transport::Endpoint::parse(listener.endpoint());
  auto stream = transport::connect(endpoint);
  engine::SenderOptions options;
  options.bandwidth_limit = link.limit_Bps;
  options.policy_plugin = engine::PolicyRegistry::global().make(mode.policy, options.policy);
  options.open_channel = [endpoint] { return transport::connect(endpoint); };
  options.handover_wait = 0ms;
  options.postcopy = mode.postcopy;
  if (mode.postcopy) options.postcopy_after_s = 0;
  auto stats = engine::SourceMigration(*vm, stream, options).run();
  stream = transport::Stream(UniqueFd());
  const auto received = receiver.get();
  if (stats.status != engine::MigrationStatus::completed) throw std::runtime_error("a real migration failed: " + stats.error);
  // The guest's waiting is measured where it runs.
  if (stats.postcopy && received.postcopy) stats.postcopy->blocktime_ms = received.postcopy->blocktime_ms;
  return stats;
}

// The simulator's costs on this link, from an idle guest's migration.
// The median of `repeats` runs, each value on its own.
engine::SimulatorOptions calibrate(const Link& link, std::uint64_t pages, unsigned repeats, nlohmann::json& report) {
  engine::DirtyTrace idle = engine::synthesize_trace("random:rate=0,mem=" + std::to_string(pages * engine::kPageSize) + ",seconds=10");
  std::vector<double> bandwidth, setup, downtime;
  for (unsigned i = 0; i < repeats; ++i) {
    const auto stats = migrate(idle, link, {"mig"});
    bandwidth.push_back(stats.round_table.at(0).bandwidth_Bps);
    setup.push_back(stats.setup_ms);
    downtime.push_back(stats.downtime_ms);
  }
  for (auto* v : {&bandwidth, &setup, &downtime}) std::sort(v->begin(), v->end());
  const auto median = [](const std::vector<double>& v) { return v[v.size() / 2]; };
  engine::SimulatorOptions o;
  o.latency_ms = 0.02;
  o.bandwidth_Bps = median(bandwidth);
  o.setup_ms = median(setup);
  o.restore_ms = median(downtime);
  // The guest ran 200 ms before the migration began, and through its set-up.
  o.trace_start_s = 0.2 + o.setup_ms / 1000;
  o.state_bytes = 4096;
  report = {{"link", link.name}, {"bandwidth_MBps", o.bandwidth_Bps / 1e6}, {"setup_ms", o.setup_ms}, {"restore_ms", o.restore_ms}};
  return o;
}

void print_rounds(const std::vector<engine::RoundStats>& real, const std::vector<engine::RoundStats>& sim) {
  fmt::print("  round | real: sent skipped dirty ms | sim: sent skipped dirty ms\n");
  for (std::size_t i = 0; i < std::max(real.size(), sim.size()); ++i) {
    auto cells = [&](const std::vector<engine::RoundStats>& t) {
      if (i >= t.size()) return std::string(30, ' ');
      return fmt::format("{:7} {:7} {:7} {:6.1f}", t[i].pages_sent, t[i].pages_skipped, t[i].dirty_pages, t[i].duration_s * 1000);
    };
    fmt::print("  {:5} | {} | {}\n", i, cells(real), cells(sim));
  }
}

double error_pct(double predicted, double real) { return real > 0 ? (predicted - real) / real * 100 : 0; }

// One figure of every repeat, sorted.
template <typename Get>
std::vector<double> sorted(const std::vector<engine::MigrationStats>& runs, Get get) {
  std::vector<double> v;
  for (const auto& r : runs) v.push_back(static_cast<double>(get(r)));
  std::sort(v.begin(), v.end());
  return v;
}

// A post-copy pair's second line: after the switch, the real guest went on at the
// destination and asked for the pages it wrote before the push brought them.
nlohmann::json compare_postcopy(const std::vector<engine::MigrationStats>& runs, const engine::PostcopyStats& sim) {
  const auto postcopy = [](const engine::MigrationStats& r) -> const engine::PostcopyStats& {
    if (!r.postcopy) throw std::runtime_error("a real migration did not switch to post-copy");
    return *r.postcopy;
  };
  const auto requests = sorted(runs, [&](const auto& r) { return postcopy(r).requests; });
  const auto blocktime = sorted(runs, [&](const auto& r) { return postcopy(r).blocktime_ms; });
  const auto after = sorted(runs, [&](const auto& r) { return postcopy(r).postcopy_ms; });
  fmt::print("  post-copy, real (min-max) / sim: requests {:.0f}-{:.0f} / {}, blocktime {:.1f}-{:.1f} / {:.1f} ms, "
             "every page there {:.1f}-{:.1f} / {:.1f} ms after the source heard the guest run\n",
             requests.front(), requests.back(), sim.requests, blocktime.front(), blocktime.back(), sim.blocktime_ms,
             after.front(), after.back(), sim.postcopy_ms);
  return {{"real_requests", requests}, {"real_blocktime_ms", blocktime}, {"real_postcopy_ms", after},
          {"sim_requests", sim.requests}, {"sim_blocktime_ms", sim.blocktime_ms}, {"sim_postcopy_ms", sim.postcopy_ms}};
}

// One pair's line in the table, and its row for --json: each real figure as sorted repeats.
nlohmann::json compare(const std::string& workload, const Link& link, const std::string& policy,
                       const std::vector<engine::MigrationStats>& runs, const engine::SimulatedMigration& sim) {
  const auto total = sorted(runs, [](const auto& r) { return r.total_ms; });
  const auto bytes = sorted(runs, [](const auto& r) { return r.bytes_sent; });
  const auto rounds = sorted(runs, [](const auto& r) { return r.rounds; });
  const auto downtime = sorted(runs, [](const auto& r) { return r.downtime_ms; });
  const double median_total = total[total.size() / 2], median_bytes = bytes[bytes.size() / 2];
  fmt::print("| {} | {} | {} | {:.0f} ({:.0f}-{:.0f}) / {:.0f} | {:+.1f} % | {:.1f} / {:.1f} | {:+.1f} % | {:.0f}-{:.0f} / {} | {:.2f}-{:.2f} / {:.2f} |\n",
             workload.substr(0, workload.find(',')), link.name, policy, median_total, total.front(), total.back(),
             sim.total_ms, error_pct(sim.total_ms, median_total), median_bytes / 1e6,
             static_cast<double>(sim.bytes_sent) / 1e6, error_pct(static_cast<double>(sim.bytes_sent), median_bytes),
             rounds.front(), rounds.back(), sim.rounds, downtime.front(), downtime.back(), sim.downtime_ms);
  nlohmann::json row = {{"workload", workload}, {"link", link.name}, {"policy", policy},
                        {"real_total_ms", total}, {"real_bytes", bytes}, {"real_rounds", rounds}, {"real_downtime_ms", downtime},
                        {"sim_total_ms", sim.total_ms}, {"sim_bytes", sim.bytes_sent}, {"sim_rounds", sim.rounds},
                        {"sim_downtime_ms", sim.downtime_ms}};
  if (sim.postcopy) row.update(compare_postcopy(runs, *sim.postcopy));
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench-sim: mig-sim's predictions against real migrations of the same traces"};
  unsigned repeats = 3;
  std::string json_path, only;
  bool show_rounds = false;
  app.add_option("--repeats", repeats, "real migrations per pair")->check(CLI::Range(1u, 20u));
  app.add_option("--only", only, "only the workloads that start with this (random, hotcold, sweep)");
  app.add_flag("--show-rounds", show_rounds, "print each pair's rounds, real (first repeat) beside predicted");
  app.add_option("--json", json_path, "write every row here");
  CLI11_PARSE(app, argc, argv);

  const std::uint64_t pages = (64ull << 20) / engine::kPageSize;
  const std::vector<std::string> workloads = {"random:rate=50M,wss=32M,mem=64M,seconds=30",
                                              "hotcold:rate=200M,wss=48M,mem=64M,seconds=30",
                                              "sweep:rate=100M,wss=16M,mem=64M,seconds=30"};
  const std::vector<Link> links = {{"loopback", 0}, {"loopback at 1 Gbit/s", 125e6}};
  const std::vector<Mode> modes = {{"mig"}, {"xen"}, {"mig", true}};
  nlohmann::json rows = nlohmann::json::array(), calibrations = nlohmann::json::array();

  fmt::print("| workload | link | policy | total ms real (min-max) / sim | err | MB real / sim | err | rounds real / sim | downtime ms real / sim |\n");
  fmt::print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
  double unlimited_Bps = 0;  // the first link's: loopback as it comes, which the second limits
  for (const auto& link : links) {
    nlohmann::json calibration;
    auto sim_options = calibrate(link, pages, repeats, calibration);
    if (link.limit_Bps == 0) unlimited_Bps = sim_options.bandwidth_Bps;
    // A limited link is loopback under the engine's own limit, which mig-sim models as the
    // engine applies it (a token bucket, starting full); the final round goes unlimited.
    sim_options.bandwidth_Bps = unlimited_Bps;
    sim_options.bandwidth_limit_Bps = link.limit_Bps;
    calibrations.push_back(calibration);
    for (const auto& workload : workloads) {
      if (workload.rfind(only, 0) != 0) continue;
      const auto trace = engine::synthesize_trace(workload);
      for (const auto& mode : modes) {
        std::vector<engine::MigrationStats> runs;
        for (unsigned i = 0; i < repeats; ++i) runs.push_back(migrate(trace, link, mode));
        sim_options.policy = engine::PolicyRegistry::global().make(mode.policy, sim_options.convergence);
        sim_options.postcopy = mode.postcopy ? engine::SimulatorOptions::Postcopy::after_round_0 : engine::SimulatorOptions::Postcopy::off;
        const auto sim = engine::simulate(trace, sim_options);
        rows.push_back(compare(workload, link, mode.label(), runs, sim));
        if (show_rounds) print_rounds(runs.front().round_table, sim.round_table);
        std::fflush(stdout);
      }
    }
  }
  fmt::print("\ncalibration (an idle 64 MiB guest per link): {}\n", calibrations.dump());
  if (!json_path.empty())
    std::ofstream(json_path) << nlohmann::json{{"guest", "(64 MiB guest, " + std::to_string(repeats) + " repeats)"},
                                               {"calibration", calibrations},
                                               {"rows", rows}}.dump(1)
                             << "\n";
  return 0;
}
