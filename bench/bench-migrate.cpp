// bench-migrate: live migration of a large guest over loopback, against the raw link.
//
// Measures in one run: (1) the raw link (bench/link.h: the best of a few send sizes between
// populated buffers, over as many streams as the migration uses, under the same load), (2)
// migrations of a guest with a random-filled working set, idle and dirtying at fractions of
// the link rate. Prints one line per migration and, with --json, one JSON object per line
// with every --stats-json field of both sides plus the baseline.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <chrono>
#include <fstream>
#include <future>
#include <nlohmann/json.hpp>
#include <thread>

#include "bench/link.h"
#include "control/json.h"
#include "engine/incoming_migration.h"
#include "engine/source_migration.h"
#include "transport/endpoint.h"
#include "vmm/kvm_vm.h"

using namespace mig;
using namespace std::chrono;

namespace {

struct Run {
  engine::MigrationStats sent;
  engine::IncomingStats received;
};

// `make_vm` builds the destination VM (KvmVm::factory, possibly prepared while waiting).
Run migrate_once(vmm::KvmVm& source, const engine::SenderOptions& options, bool zerocopy,
                 const engine::VmFactory& make_vm) {
  transport::Listener listener(transport::Endpoint::parse("tcp:127.0.0.1:0"));
  auto receiver = std::async(std::launch::async, [&] {
    auto stream = listener.accept();
    engine::ReceiverOptions receiver_options;
    receiver_options.accept_channel = [&listener](std::chrono::milliseconds timeout) { return listener.accept(timeout); };
    auto r = engine::IncomingMigration(stream, make_vm, receiver_options).run();
    return r.stats;  // the destination VM is dropped here: the bench only needs the numbers
  });
  auto open = [&listener, zerocopy] {
    auto s = transport::connect(transport::Endpoint::parse(listener.endpoint()));
    if (zerocopy) s.enable_zerocopy(transport::Stream::ZeroCopy::always);
    return s;
  };
  auto stream = open();
  engine::SenderOptions with_channels = options;
  with_channels.open_channel = open;
  auto sent = engine::SourceMigration(source, stream, with_channels).run();
  return {sent, receiver.get()};
}

struct Settings {
  std::string image = MIG_GUEST_IMAGE, json_path, fill = "random";
  std::uint64_t mem = 2ull << 30, wss = 1ull << 30;
  std::vector<int> link_percents = {0, 25, 50, 75};
  double downtime_ms = 30;
  bool zerocopy = false, prepare = false, no_plan = false, spin = false, small_pages = false, big = false;
  unsigned parallel = 1;
};

// Source and destination each hold the working set, plus room for everything else.
void require_host_memory(std::uint64_t wss) {
  const auto host = static_cast<std::uint64_t>(::sysconf(_SC_PHYS_PAGES)) * static_cast<std::uint64_t>(::sysconf(_SC_PAGE_SIZE));
  if (2 * wss + (4ull << 30) > host)
    throw std::runtime_error(fmt::format("a {} GiB working set needs about {} GiB of host memory; this host has {} GiB",
                                         wss >> 30, (2 * wss >> 30) + 4, host >> 30));
}

// The raw link over as many streams as the migration uses, under the same load.
bench::LinkSample measure_baseline(const Settings& settings) {
  std::optional<bench::Spinner> load;  // the spinning guest's counterpart
  if (settings.spin) load.emplace();
  const auto baseline =
      bench::best(bench::measure_link(std::min<std::uint64_t>(settings.wss, 1ull << 30), {settings.parallel}), settings.parallel);
  fmt::print("raw loopback TCP, {} stream(s) between populated buffers{}: {:.0f} MB/s (best of {} KiB sends)\n",
             settings.parallel, settings.spin ? ", one core kept busy" : "", baseline.Bps / 1e6, baseline.send_bytes >> 10);
  return baseline;
}

std::string guest_cmdline(const Settings& settings, int percent, std::uint64_t rate_mbps) {
  if (percent == 0)
    return fmt::format("mode={} wss={}M fill={} hb=1", settings.spin ? "spin" : "idle", settings.wss >> 20, settings.fill);
  return fmt::format("mode=random rate={} wss={}M fill={} hb=1", rate_mbps, settings.wss >> 20, settings.fill);
}

std::unique_ptr<kvm::Machine> boot_source(const Settings& settings, const kvm::MemoryOptions& memory,
                                          const std::string& cmdline) {
  kvm::MachineConfig config;
  config.layout = kvm::pc_memory_layout(settings.mem);
  config.memory = memory;
  auto machine = kvm::Machine::create(config);
  machine->boot(kvm::read_multiboot_file(settings.image), cmdline);
  machine->start();
  if (!machine->probe().wait_ready(seconds(120))) throw std::runtime_error("guest not ready");
  std::this_thread::sleep_for(seconds(1));
  return machine;
}

// What the guest really dirtied during pre-copy, in MB/s (round 0 excluded: it sends everything).
double dirtied_MBps(const engine::MigrationStats& s) {
  double dirtied = 0, seconds = 0;
  for (std::size_t i = 1; i < s.round_table.size(); ++i) {
    dirtied += static_cast<double>(s.round_table[i].dirty_pages * engine::kPageSize);
    seconds += s.round_table[i].duration_s;
  }
  return seconds > 0 ? dirtied / seconds / 1e6 : 0.0;
}

void print_row(const Run& run, int percent, std::uint64_t rate_mbps, double raw_ms) {
  const auto& s = run.sent;
  fmt::print("{:>3}% of link ({:>4} MB/s asked, {:>4.0f} MB/s dirtied): {} total {:7.1f} ms  sent {:6.1f} MB  {:6.0f} MB/s = {:.2f} of raw link "
             "(raw transfer of the same bytes: {:.1f} ms = {:.2f}x)  rounds {:2} ({})  downtime {:6.2f} ms  guest saw {} ms  "
             "CPU s/GiB source {:.2f} destination {:.2f}  verified {}\n",
             percent, rate_mbps, dirtied_MBps(s), engine::to_string(s.status), s.total_ms, static_cast<double>(s.bytes_sent) / 1e6,
             s.throughput_MBps, raw_ms / s.total_ms, raw_ms, s.total_ms / raw_ms, s.rounds, engine::to_string(s.stop_reason),
             s.downtime_ms, s.guest ? fmt::format("{:6.2f}", s.guest->gap_ms) : "n/a", engine::per_GiB(s.cpu_s, s.bytes_sent),
             engine::per_GiB(run.received.cpu_s, run.received.bytes_received), s.verified);
  if (s.status != engine::MigrationStatus::completed) fmt::print("  error: {}\n", s.error);
}

nlohmann::json row_json(const Run& run, int percent, const std::string& cmdline, const bench::LinkSample& baseline,
                        unsigned streams, double raw_ms) {
  auto j = control::to_json(run.sent);
  j["link_percent"] = percent;
  j["guest_cmdline"] = cmdline;
  j["destination"] = control::to_json(run.received);
  j["raw_link_MBps"] = baseline.Bps / 1e6;
  j["raw_link_streams"] = streams;
  j["raw_link_send_bytes"] = baseline.send_bytes;
  j["raw_same_bytes_ms"] = raw_ms;
  j["ratio_to_raw_link"] = raw_ms / run.sent.total_ms;
  return j;
}

// Guest memory on each side, chosen once: the destination's as mig-recv chooses it.
struct Memories {
  kvm::MemoryOptions source, destination;
};

Memories memories(const Settings& settings) {
  kvm::MemoryOptions wanted;
  wanted.transparent_huge_pages = !settings.small_pages;
  return {wanted, vmm::KvmVm::incoming_memory(wanted).options};
}

// One migration at `percent` of the link, printed and (with --json) appended.
void run_point(const Settings& settings, const Memories& memory, const bench::LinkSample& baseline, int percent,
               std::ofstream& json) {
  const auto rate_mbps = static_cast<std::uint64_t>(baseline.Bps / 1e6 * percent / 100);
  const std::string cmdline = guest_cmdline(settings, percent, rate_mbps);
  // The destination is built first, so that a prepared one is populated while it waits.
  const auto make_destination =
      vmm::KvmVm::factory("", memory.destination,
                          settings.prepare ? std::optional(vmm::KvmVm::pc_shape(settings.mem, 1)) : std::nullopt);
  vmm::KvmVm source(boot_source(settings, memory.source, cmdline));
  engine::SenderOptions options;
  options.policy.downtime_target_ms = settings.downtime_ms;
  options.page_plan = !settings.no_plan;
  options.channels = settings.parallel;
  const auto run = migrate_once(source, options, settings.zerocopy, make_destination);
  const double raw_ms = static_cast<double>(run.sent.bytes_sent) / baseline.Bps * 1000;
  print_row(run, percent, rate_mbps, raw_ms);
  if (json.is_open()) json << row_json(run, percent, cmdline, baseline, settings.parallel, raw_ms).dump() << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench-migrate: live migration over loopback against the raw link"};
  Settings settings;
  app.add_option("--kernel", settings.image);
  app.add_option("--mem", settings.mem)->transform(CLI::AsSizeValue(false));
  app.add_option("--wss", settings.wss)->transform(CLI::AsSizeValue(false));
  app.add_option("--fill", settings.fill);
  app.add_option("--rates", settings.link_percents, "guest dirty rates as percent of the measured link rate; 0 = idle")
      ->delimiter(',');
  app.add_option("--downtime-ms", settings.downtime_ms);
  app.add_flag("--zerocopy", settings.zerocopy);
  app.add_flag("--small-pages", settings.small_pages, "4 KiB pages on both sides, no transparent huge pages");
  app.add_flag("--spin", settings.spin,
               "the idle guest busy-waits between heartbeats instead of halting (as a busy host's guest does)");
  app.add_flag("--prepare", settings.prepare, "populate the destination's memory while it waits (mig-recv --expect-mem)");
  app.add_flag("--no-page-plan", settings.no_plan, "do not announce round 0's pages to the receiver");
  app.add_option("--parallel", settings.parallel, "page channels");
  app.add_option("--json", settings.json_path, "append one JSON object per migration");
  app.add_flag("--big", settings.big,
               "the big-guest point: a 64 GiB guest with a 32 GiB working set (needs about 70 GiB of host memory)");
  CLI11_PARSE(app, argc, argv);
  if (settings.big) {
    settings.mem = 64ull << 30;
    settings.wss = 32ull << 30;
  }
  try {
    require_host_memory(settings.wss);
    const auto baseline = measure_baseline(settings);
    const auto memory = memories(settings);
    std::ofstream json;
    if (!settings.json_path.empty()) json.open(settings.json_path, std::ios::app);
    for (int percent : settings.link_percents) run_point(settings, memory, baseline, percent, json);
  } catch (const std::exception& e) {
    fmt::print(stderr, "bench-migrate: {}\n", e.what());
    return 1;
  }
}
