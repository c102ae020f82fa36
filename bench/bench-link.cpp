// bench-link: the raw loopback link that every migration ratio is taken against.
//
// For each stream count, every send size between populated buffers at distinct addresses,
// best first; then iperf3's default for one stream, where iperf3 is installed. With --spin,
// a thread busy-waits throughout, as a spinning guest's vCPU does during a migration.
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <optional>

#include "bench/link.h"

using namespace mig;

int main(int argc, char** argv) {
  CLI::App app{"bench-link: raw loopback TCP between populated buffers, one stream and N"};
  std::uint64_t bytes = 1ull << 30;
  std::vector<unsigned> stream_counts = {1, 2};
  bool spin = false, json = false;
  app.add_option("--bytes", bytes, "bytes per measurement, over all streams")->transform(CLI::AsSizeValue(false));
  app.add_option("--streams", stream_counts, "stream counts to measure")->delimiter(',');
  app.add_flag("--spin", spin, "keep one thread busy-waiting meanwhile, as a spinning guest vCPU does");
  app.add_flag("--json", json, "one JSON object per line instead of text");
  CLI11_PARSE(app, argc, argv);
  try {
    std::optional<bench::Spinner> load;
    if (spin) load.emplace();
    for (const auto& s : bench::measure_link(bytes, stream_counts)) {
      if (json)
        fmt::print("{{\"streams\": {}, \"send_bytes\": {}, \"MBps\": {:.0f}}}\n", s.streams, s.send_bytes, s.Bps / 1e6);
      else
        fmt::print("{} stream(s), {:>5} KiB sends: {:6.0f} MB/s\n", s.streams, s.send_bytes >> 10, s.Bps / 1e6);
    }
    const auto iperf = bench::iperf3_Bps(bytes);
    if (json)
      fmt::print("{{\"iperf3_MBps\": {}}}\n", iperf ? fmt::format("{:.0f}", *iperf / 1e6) : "null");
    else if (iperf)
      fmt::print("iperf3, 1 stream, its default 128 KiB writes: {:6.0f} MB/s\n", *iperf / 1e6);
    else
      fmt::print("iperf3: not installed or did not run\n");
  } catch (const std::exception& e) {
    fmt::print(stderr, "bench-link: {}\n", e.what());
    return 1;
  }
}
