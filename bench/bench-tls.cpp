// bench-tls: what TLS costs mig's transport. Page batches (1 MiB frames gathered from 4 KiB
// pages scattered over a populated buffer, as guest memory sends them) go through Stream,
// plaintext and then TLS (x509), on 1 and 2 channels, in the same run; the ratio is TLS over
// the best plaintext on the same channel count. Each measurement ends when the receiver has
// read everything. Prints a table, or JSON rows with --json.
//   bench-tls [--gib N] [--repeats N] [--json]                  both ends here, over loopback
//   bench-tls --serve HOST:PORT --creds DIR                      the receiving end, elsewhere
//   bench-tls --to HOST:PORT --creds DIR [--gib N] [--repeats N] the sending end, to it
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
#include <thread>

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

// One channel's sending side: `frames` page batches, then a RoundEnd whose RoundAck says that
// all of them were read at the other end.
void send_frames(transport::Stream& stream, const Mapping& memory, std::uint64_t frames) {
  const std::vector<std::byte> head(16);
  for (std::uint64_t f = 0; f < frames; ++f)
    stream.send_gathered(wire::MessageType::page_batch, head, batch(memory, f), transport::PageMemory::guest);
  stream.send(wire::RoundEnd{0});
  stream.receive<wire::RoundAck>();
}

// One channel's receiving side: batches scattered into `memory` until the RoundEnd.
void receive_frames(transport::Stream& stream, const Mapping& memory) {
  std::vector<std::byte> head(16);
  for (std::uint64_t f = 0;; ++f) {
    const auto header = stream.read_header();
    if (header.type == static_cast<std::uint16_t>(wire::MessageType::round_end)) {
      stream.read_payload(header);
      stream.send(wire::RoundAck{0});
      return;
    }
    stream.read_exact(head);
    auto pages = batch(memory, f);
    stream.read_scatter(pages);
  }
}

// Bytes per second of page data sent on `senders` together, each carrying `bytes / channels`.
double send_Bps(std::vector<transport::Stream>& senders, std::uint64_t bytes) {
  std::vector<Mapping> sources;
  for (std::size_t i = 0; i < senders.size(); ++i) sources.push_back(populated(0x5a));
  const std::uint64_t frames = bytes / senders.size() / (kBatchPages * kPage);
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::future<void>> work;
  for (std::size_t c = 0; c < senders.size(); ++c)
    work.push_back(std::async(std::launch::async, [&, c] { send_frames(senders[c], sources[c], frames); }));
  for (auto& w : work) w.get();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return static_cast<double>(frames * senders.size() * kBatchPages * kPage) / seconds;
}

// Receives every connection `listener` accepts, each on a thread of its own, for ever.
[[noreturn]] void serve(transport::Listener& listener) {
  for (;;) {
    auto stream = std::make_shared<transport::Stream>(listener.accept());
    std::thread([stream] {
      const auto sink = populated(0);
      try {
        for (;;) receive_frames(*stream, sink);
      } catch (const std::exception&) {  // the sender closed
      }
    }).detach();
  }
}

// The sender's end of one configuration: `channels` connections to `endpoint`.
double measure_to(const transport::Endpoint& endpoint, unsigned channels, std::uint64_t bytes, const transport::TlsContext* tls) {
  std::vector<transport::Stream> senders;
  for (unsigned i = 0; i < channels; ++i) senders.push_back(transport::connect(endpoint, tls));
  return send_Bps(senders, bytes);
}

// Both ends here, over loopback.
double measure_loopback(unsigned channels, std::uint64_t bytes, const transport::TlsContext* client,
                        std::shared_ptr<const transport::TlsContext> server) {
  transport::Listener listener(transport::Endpoint::parse("tcp:127.0.0.1:0"), {server, transport::kHandshakeTimeout, {}});
  std::vector<transport::Stream> senders, receivers;
  for (unsigned i = 0; i < channels; ++i) {
    auto accepted = std::async(std::launch::async, [&] { return listener.accept(std::chrono::seconds(10)); });
    senders.push_back(transport::connect(transport::Endpoint::parse(listener.endpoint()), client));
    receivers.push_back(accepted.get());
  }
  std::vector<std::future<void>> receiving;
  for (auto& r : receivers)
    receiving.push_back(std::async(std::launch::async, [&r, sink = populated(0)] { receive_frames(r, sink); }));
  const double Bps = send_Bps(senders, bytes);
  for (auto& r : receiving) r.get();
  return Bps;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench-tls: TLS against plaintext through mig's Stream, 1 and 2 channels"};
  double gib = 2;
  unsigned repeats = 3;
  bool json = false;
  std::string serve_at, to, creds;
  app.add_option("--gib", gib, "data per measurement, GiB")->check(CLI::Range(0.1, 64.0));
  app.add_option("--repeats", repeats, "measurements per configuration; each is reported")->check(CLI::Range(1u, 20u));
  app.add_flag("--json", json, "one JSON object per measurement");
  app.add_option("--serve", serve_at, "be the receiving end on another host (or network namespace): HOST:PORT plaintext, HOST:PORT+1 TLS");
  app.add_option("--to", to, "be the sending end, to a --serve at HOST:PORT (default: both ends here, over loopback)");
  app.add_option("--creds", creds, "with --serve/--to: the x509 directory both ends use (scripts/make-tls-creds.sh)");
  CLI11_PARSE(app, argc, argv);

  std::signal(SIGPIPE, SIG_IGN);  // as mig's tools do
  const bool own_creds = creds.empty();
  if (own_creds) {
    creds = "/tmp/bench-tls-" + std::to_string(::getpid());
    if (std::system((std::string(MIG_SOURCE_DIR) + "/scripts/make-tls-creds.sh " + creds).c_str()) != 0) return 1;
  }
  transport::TlsCredentials x509;
  x509.x509_dir = creds;
  const auto server = transport::TlsContext::load(x509, transport::TlsRole::server);
  const auto client = transport::TlsContext::load(x509, transport::TlsRole::client);
  const auto at = [](const std::string& host_port, int offset) {
    auto e = transport::Endpoint::parse("tcp:" + host_port);
    e.port = static_cast<std::uint16_t>(e.port + offset);
    return e;
  };
  if (!serve_at.empty()) {
    transport::Listener plain(at(serve_at, 0)), secure(at(serve_at, 1), {server, transport::kHandshakeTimeout, {}});
    std::thread([&] { serve(plain); }).detach();
    serve(secure);
  }
  const auto bytes = static_cast<std::uint64_t>(gib * double(1ull << 30));
  if (!json) fmt::print("{:>8} {:>9} {:>6}  {:>10}  {:>8}\n", "channels", "security", "repeat", "GB/s", "vs plain");
  for (unsigned channels : {1u, 2u}) {
    double best_plain = 0;
    for (const bool tls : {false, true}) {
      for (unsigned r = 0; r < repeats; ++r) {
        const double Bps = to.empty() ? (tls ? measure_loopback(channels, bytes, client.get(), server)
                                             : measure_loopback(channels, bytes, nullptr, nullptr))
                                      : measure_to(at(to, tls ? 1 : 0), channels, bytes, tls ? client.get() : nullptr);
        if (!tls) best_plain = std::max(best_plain, Bps);
        const double ratio = Bps / best_plain;
        if (json)
          fmt::print("{}\n", nlohmann::json{{"channels", channels}, {"security", tls ? "tls" : "plaintext"}, {"repeat", r},
                                            {"GBps", Bps / 1e9}, {"ratio_to_best_plaintext", tls ? ratio : 1.0}}
                                 .dump());
        else
          fmt::print("{:>8} {:>9} {:>6}  {:>10.3f}  {:>8}\n", channels, tls ? "tls" : "plaintext", r, Bps / 1e9,
                     tls ? fmt::format("{:.2f}", ratio) : "");
        std::fflush(stdout);
      }
    }
  }
  if (own_creds) std::filesystem::remove_all(creds);
  return 0;
}
