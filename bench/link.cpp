#include "bench/link.h"

#include <sys/mman.h>
#include <sys/socket.h>
#include <cstdlib>
#include <string>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <future>
#include <nlohmann/json.hpp>

#include "common/fd.h"
#include "transport/endpoint.h"

namespace mig::bench {

namespace {

constexpr std::size_t kBufferBytes = 64 << 20;

Mapping populated_buffer(unsigned char fill) {
  auto m = Mapping::map(kBufferBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0,
                        "mmap link buffer");
  std::memset(m.data(), fill, m.size());
  return m;
}

// One stream's sending side: `bytes` in `send_bytes` sends, cycling through its buffer.
void send_all(int fd, const Mapping& buffer, std::uint64_t bytes, std::size_t send_bytes) {
  for (std::uint64_t sent = 0, offset = 0; sent < bytes;) {
    const std::size_t n = std::min<std::uint64_t>({send_bytes, bytes - sent, kBufferBytes - offset});
    const ssize_t done = ::send(fd, buffer.data() + offset, n, MSG_NOSIGNAL);
    if (done <= 0) throw_errno("send");
    sent += static_cast<std::uint64_t>(done);
    offset = (offset + static_cast<std::uint64_t>(done)) % kBufferBytes;
  }
}

void receive_all(transport::Stream& stream, const Mapping& buffer, std::uint64_t bytes, std::size_t send_bytes) {
  for (std::uint64_t got = 0, offset = 0; got < bytes;) {
    const std::size_t n = std::min<std::uint64_t>({send_bytes, bytes - got, kBufferBytes - offset});
    stream.read_exact({buffer.data() + offset, n});
    got += n;
    offset = (offset + n) % kBufferBytes;
  }
}

}  // namespace

double raw_transfer_Bps(std::uint64_t bytes, unsigned streams, std::size_t send_bytes) {
  const std::uint64_t per_stream = bytes / streams;
  std::vector<Mapping> sources, sinks;
  for (unsigned i = 0; i < streams; ++i) {
    sources.push_back(populated_buffer(0x5a));
    sinks.push_back(populated_buffer(0));
  }
  transport::Listener listener(transport::Endpoint::parse("tcp:127.0.0.1:0"));
  std::vector<transport::Stream> senders;
  std::vector<transport::Stream> receivers;
  for (unsigned i = 0; i < streams; ++i) {
    senders.push_back(transport::connect(transport::Endpoint::parse(listener.endpoint())));
    receivers.push_back(listener.accept());
  }
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::future<void>> work;
  for (unsigned i = 0; i < streams; ++i) {
    work.push_back(std::async(std::launch::async, [&, i] { receive_all(receivers[i], sinks[i], per_stream, send_bytes); }));
    work.push_back(std::async(std::launch::async, [&, i] { send_all(senders[i].fd(), sources[i], per_stream, send_bytes); }));
  }
  for (auto& w : work) w.get();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return static_cast<double>(per_stream * streams) / seconds;
}

std::vector<LinkSample> measure_link(std::uint64_t bytes, const std::vector<unsigned>& stream_counts,
                                     const std::vector<std::size_t>& send_sizes) {
  std::vector<LinkSample> samples;
  for (unsigned streams : stream_counts) {
    const auto first = samples.size();
    for (std::size_t size : send_sizes) samples.push_back({streams, size, raw_transfer_Bps(bytes, streams, size)});
    std::sort(samples.begin() + static_cast<std::ptrdiff_t>(first), samples.end(),
              [](const LinkSample& a, const LinkSample& b) { return a.Bps > b.Bps; });
  }
  return samples;
}

LinkSample best(const std::vector<LinkSample>& samples, unsigned streams) {
  LinkSample found;
  for (const auto& s : samples)
    if (s.streams == streams && s.Bps > found.Bps) found = s;
  return found;
}

std::optional<double> iperf3_Bps(std::uint64_t bytes) {
  const unsigned port = 25201;
  const std::string server = "iperf3 -s -1 -p " + std::to_string(port) + " >/dev/null 2>&1 &";
  if (std::system("command -v iperf3 >/dev/null 2>&1") != 0 || std::system(server.c_str()) != 0) return std::nullopt;
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const std::string client = "iperf3 -J -c 127.0.0.1 -p " + std::to_string(port) + " -n " + std::to_string(bytes);
  FILE* out = ::popen(client.c_str(), "r");
  if (!out) return std::nullopt;
  std::string text;
  char chunk[4096];
  while (std::size_t n = std::fread(chunk, 1, sizeof chunk, out)) text.append(chunk, n);
  ::pclose(out);
  const auto report = nlohmann::json::parse(text, nullptr, false);
  if (report.is_discarded() || !report.contains("end")) return std::nullopt;
  return report["end"]["sum_received"]["bits_per_second"].get<double>() / 8;
}

Spinner::Spinner()
    : thread_([](std::stop_token stop) {
        while (!stop.stop_requested()) __builtin_ia32_pause();
      }) {}

}  // namespace mig::bench
