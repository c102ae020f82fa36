// bench-tls: what TLS costs mig's transport. Page batches (1 MiB frames gathered from 4 KiB
// pages scattered over a populated buffer, as guest memory sends them) go through Stream over
// loopback, plaintext and then TLS (x509), on 1 and 2 channels, in the same run; the ratio is
// TLS over plaintext on the same channel count. Prints a table, or JSON rows with --json.
//   bench-tls [--gib N] [--repeats N] [--json]
#include <sys/mman.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <future>

#include "transport/endpoint.h"

using namespace mig;

namespace {

constexpr std::size_t kPage = 4096, kBatchPages = 256, kBufferBytes = 64 << 20;

Mapping populated(unsigned char fill) {
  auto m = Mapping::map(kBufferBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0, "mmap");
  for (std::size_t i = 0; i < m.size(); ++i) m.data()[i] = static_cast<std::byte>(fill + i * 13);
  return m;
}

// Every other page of the buffer, so no two pages of a batch are adjacent.
std::vector<iovec> batch(const Mapping& memory, std::size_t index) {
  std::vector<iovec> pages;
  const std::size_t batches = kBufferBytes / kPage / 2 / kBatchPages;
  const std::size_t first = (index % batches) * kBatchPages * 2;
  for (std::size_t p = 0; p < kBatchPages; ++p) pages.push_back({memory.data() + (first + 2 * p) * kPage, kPage});
  return pages;
}

// Bytes per second through `channels` connections, each carrying `bytes / channels`.
double transfer_Bps(std::uint64_t bytes, unsigned channels, const transport::TlsContext* client,
                    std::shared_ptr<const transport::TlsContext> server) {
  transport::Listener listener(transport::Endpoint::parse("tcp:127.0.0.1:0"), {server, transport::kHandshakeTimeout, {}});
  std::vector<transport::Stream> senders, receivers;
  std::vector<Mapping> sources, sinks;
  for (unsigned i = 0; i < channels; ++i) {
    auto accepted = std::async(std::launch::async, [&] { return listener.accept(std::chrono::seconds(10)); });
    senders.push_back(transport::connect(transport::Endpoint::parse(listener.endpoint()), client));
    receivers.push_back(accepted.get());
    sources.push_back(populated(0x5a));
    sinks.push_back(populated(0));
  }
  const std::uint64_t frames = bytes / channels / (kBatchPages * kPage);
  const std::vector<std::byte> head(16);
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::future<void>> work;
  for (unsigned c = 0; c < channels; ++c) {
    work.push_back(std::async(std::launch::async, [&, c] {
      for (std::uint64_t f = 0; f < frames; ++f)
        senders[c].send_gathered(wire::MessageType::page_batch, head, batch(sources[c], f), transport::PageMemory::guest);
    }));
    work.push_back(std::async(std::launch::async, [&, c] {
      std::vector<std::byte> got_head(head.size());
      for (std::uint64_t f = 0; f < frames; ++f) {
        receivers[c].read_header();
        receivers[c].read_exact(got_head);
        auto pages = batch(sinks[c], f);
        receivers[c].read_scatter(pages);
      }
    }));
  }
  for (auto& w : work) w.get();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return static_cast<double>(frames * channels * kBatchPages * kPage) / seconds;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench-tls: TLS against plaintext through mig's Stream, 1 and 2 channels, loopback"};
  double gib = 2;
  unsigned repeats = 3;
  bool json = false;
  app.add_option("--gib", gib, "data per measurement, GiB")->check(CLI::Range(0.1, 64.0));
  app.add_option("--repeats", repeats, "measurements per configuration; each is reported")->check(CLI::Range(1u, 20u));
  app.add_flag("--json", json, "one JSON object per measurement");
  CLI11_PARSE(app, argc, argv);

  std::signal(SIGPIPE, SIG_IGN);  // as mig's tools do
  const std::string creds = "/tmp/bench-tls-" + std::to_string(::getpid());
  if (std::system((std::string(MIG_SOURCE_DIR) + "/scripts/make-tls-creds.sh " + creds).c_str()) != 0) return 1;
  transport::TlsCredentials x509;
  x509.x509_dir = creds;
  const auto server = transport::TlsContext::load(x509, transport::TlsRole::server);
  const auto client = transport::TlsContext::load(x509, transport::TlsRole::client);
  const auto bytes = static_cast<std::uint64_t>(gib * double(1ull << 30));
  if (!json) fmt::print("{:>8} {:>9} {:>6}  {:>10}  {:>8}\n", "channels", "security", "repeat", "GB/s", "vs plain");
  for (unsigned channels : {1u, 2u}) {
    double best_plain = 0;
    for (const bool tls : {false, true}) {
      for (unsigned r = 0; r < repeats; ++r) {
        const double Bps = tls ? transfer_Bps(bytes, channels, client.get(), server) : transfer_Bps(bytes, channels, nullptr, nullptr);
        if (!tls) best_plain = std::max(best_plain, Bps);
        const double ratio = Bps / best_plain;
        if (json)
          fmt::print("{}\n", nlohmann::json{{"channels", channels}, {"security", tls ? "tls" : "plaintext"}, {"repeat", r},
                                            {"GBps", Bps / 1e9}, {"ratio_to_best_plaintext", tls ? ratio : 1.0}}
                                 .dump());
        else
          fmt::print("{:>8} {:>9} {:>6}  {:>10.2f}  {:>8}\n", channels, tls ? "tls" : "plaintext", r, Bps / 1e9,
                     tls ? fmt::format("{:.2f}", ratio) : "");
        std::fflush(stdout);
      }
    }
  }
  std::filesystem::remove_all(creds);
  return 0;
}
