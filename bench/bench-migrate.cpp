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

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench-migrate: live migration over loopback against the raw link"};
  std::string image = MIG_GUEST_IMAGE, json_path, fill = "random";
  std::uint64_t mem = 2ull << 30, wss = 1ull << 30;
  std::vector<int> link_percents = {0, 25, 50, 75};
  double downtime_ms = 30;
  bool zerocopy = false, prepare = false, no_plan = false, spin = false, small_pages = false;
  unsigned parallel = 1;
  bool big = false;
  app.add_option("--kernel", image);
  app.add_option("--mem", mem)->transform(CLI::AsSizeValue(false));
  app.add_option("--wss", wss)->transform(CLI::AsSizeValue(false));
  app.add_option("--fill", fill);
  app.add_option("--rates", link_percents, "guest dirty rates as percent of the measured link rate; 0 = idle")->delimiter(',');
  app.add_option("--downtime-ms", downtime_ms);
  app.add_flag("--zerocopy", zerocopy);
  app.add_flag("--small-pages", small_pages, "4 KiB pages on both sides, no transparent huge pages");
  app.add_flag("--spin", spin, "the idle guest busy-waits between heartbeats instead of halting (as a busy host's guest does)");
  app.add_flag("--prepare", prepare, "populate the destination's memory while it waits (mig-recv --expect-mem)");
  app.add_flag("--no-page-plan", no_plan, "do not announce round 0's pages to the receiver");
  app.add_option("--parallel", parallel, "page channels");
  app.add_option("--json", json_path, "append one JSON object per migration");
  app.add_flag("--big", big, "the big-guest point: a 64 GiB guest with a 32 GiB working set (needs about 70 GiB of host memory)");
  CLI11_PARSE(app, argc, argv);
  if (big) {
    mem = 64ull << 30;
    wss = 32ull << 30;
  }

  try {
    // Source and destination each hold the working set, plus room for everything else.
    if (const auto host = static_cast<std::uint64_t>(::sysconf(_SC_PHYS_PAGES)) * 4096; 2 * wss + (4ull << 30) > host)
      throw std::runtime_error(fmt::format("a {} GiB working set needs about {} GiB of host memory; this host has {} GiB",
                                           wss >> 30, (2 * wss >> 30) + 4, host >> 30));
    std::optional<bench::Spinner> load;  // the spinning guest's counterpart while the raw link is measured
    if (spin) load.emplace();
    const auto samples = bench::measure_link(std::min<std::uint64_t>(wss, 1ull << 30), {parallel});
    load.reset();
    const auto baseline = bench::best(samples, parallel);
    const double link = baseline.Bps;
    kvm::MemoryOptions memory;
    memory.transparent_huge_pages = !small_pages;
    fmt::print("raw loopback TCP, {} stream(s) between populated buffers{}: {:.0f} MB/s (best of {} KiB sends)\n", parallel,
               spin ? ", one core kept busy" : "", link / 1e6, baseline.send_bytes >> 10);
    std::ofstream json;
    if (!json_path.empty()) json.open(json_path, std::ios::app);
    for (int percent : link_percents) {
      const auto rate_mbps = static_cast<std::uint64_t>(link / 1e6 * percent / 100);
      const std::string cmdline = percent == 0 ? fmt::format("mode={} wss={}M fill={} hb=1", spin ? "spin" : "idle", wss >> 20, fill)
                                               : fmt::format("mode=random rate={} wss={}M fill={} hb=1", rate_mbps, wss >> 20, fill);
      // The destination is built first, so that a prepared one is populated while it waits.
      const auto make_destination = vmm::KvmVm::factory(
          "", vmm::KvmVm::incoming_memory(memory).options, prepare ? std::optional(vmm::KvmVm::pc_shape(mem, 1)) : std::nullopt);
      kvm::MachineConfig config;
      config.layout = kvm::pc_memory_layout(mem);
      config.memory = memory;
      auto machine = kvm::Machine::create(config);
      machine->boot(kvm::read_multiboot_file(image), cmdline);
      machine->start();
      if (!machine->probe().wait_ready(seconds(120))) throw std::runtime_error("guest not ready");
      std::this_thread::sleep_for(seconds(1));
      vmm::KvmVm source(std::move(machine));
      engine::SenderOptions options;
      options.policy.downtime_target_ms = downtime_ms;
      options.page_plan = !no_plan;
      options.channels = parallel;
      const auto run = migrate_once(source, options, zerocopy, make_destination);
      const auto& s = run.sent;
      const double raw_ms = static_cast<double>(s.bytes_sent) / link * 1000;
      // What the guest really dirtied during pre-copy (round 0 excluded: it sends everything).
      double dirtied = 0, seconds = 0;
      for (std::size_t i = 1; i < s.round_table.size(); ++i) {
        dirtied += static_cast<double>(s.round_table[i].dirty_pages * engine::kPageSize);
        seconds += s.round_table[i].duration_s;
      }
      const double source_cpu = engine::per_GiB(s.cpu_s, s.bytes_sent);
      const double destination_cpu = engine::per_GiB(run.received.cpu_s, run.received.bytes_received);
      fmt::print("{:>3}% of link ({:>4} MB/s asked, {:>4.0f} MB/s dirtied): {} total {:7.1f} ms  sent {:6.1f} MB  {:6.0f} MB/s = {:.2f} of raw link "
                 "(raw transfer of the same bytes: {:.1f} ms = {:.2f}x)  rounds {:2} ({})  downtime {:6.2f} ms  guest saw {} ms  "
                 "CPU s/GiB source {:.2f} destination {:.2f}  verified {}\n",
                 percent, rate_mbps, seconds > 0 ? dirtied / seconds / 1e6 : 0.0, engine::to_string(s.status), s.total_ms, static_cast<double>(s.bytes_sent) / 1e6, s.throughput_MBps,
                 raw_ms / s.total_ms, raw_ms, s.total_ms / raw_ms, s.rounds, engine::to_string(s.stop_reason), s.downtime_ms,
                 s.guest ? fmt::format("{:6.2f}", s.guest->gap_ms) : "n/a", source_cpu, destination_cpu, s.verified);
      if (s.status != engine::MigrationStatus::completed) fmt::print("  error: {}\n", s.error);
      if (json.is_open()) {
        auto j = control::to_json(s);
        j["link_percent"] = percent;
        j["guest_cmdline"] = cmdline;
        j["destination"] = control::to_json(run.received);
        j["raw_link_MBps"] = link / 1e6;
        j["raw_link_streams"] = parallel;
        j["raw_link_send_bytes"] = baseline.send_bytes;
        j["raw_same_bytes_ms"] = raw_ms;
        j["ratio_to_raw_link"] = raw_ms / s.total_ms;
        json << j.dump() << "\n";
      }
    }
  } catch (const std::exception& e) {
    fmt::print(stderr, "bench-migrate: {}\n", e.what());
    return 1;
  }
}
