// Endpoints, connecting and listening: names, socket permissions, timeouts, interruption.
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <future>
#include <thread>

#include "transport/endpoint.h"

using mig::transport::Endpoint;
using mig::transport::Listener;
using Catch::Matchers::Contains;
using namespace std::chrono_literals;

namespace {
std::string socket_path(const char* name) { return "/tmp/mig-endpoint-test-" + std::to_string(::getpid()) + "-" + name; }
}  // namespace

TEST_CASE("tcp endpoints parse - and others are refused with the expected form") {
  using mig::transport::Endpoint;
  auto e = Endpoint::parse("tcp:127.0.0.1:4444");
  CHECK(e.host == "127.0.0.1");
  CHECK(e.port == 4444);
  for (const char* bad : {"127.0.0.1:4444", "tcp:4444", "tcp:host:", "tcp:host:99999", "tcp:host:12ab", "udp:h:1", "unix:"})
    CHECK_THROWS_WITH(Endpoint::parse(bad), Contains("tcp:HOST:PORT or unix:PATH"));
  CHECK(Endpoint::parse("unix:/tmp/x.sock").unix_path == "/tmp/x.sock");
  CHECK(Endpoint::parse("unix:/tmp/x.sock").to_string() == "unix:/tmp/x.sock");
}

TEST_CASE("a unix listener's socket is mode 0600 - a stale file is replaced and a live one refused") {
  const auto path = socket_path("live");
  {
    // What a killed process leaves behind: a bound socket file nobody listens on.
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    REQUIRE(::bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0);
    ::close(fd);
  }
  Listener listener(Endpoint::parse("unix:" + path));
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK_THROWS_WITH(Listener(Endpoint::parse("unix:" + path)), Contains("another process is listening"));
  auto client = std::async(std::launch::async, [&] { return mig::transport::connect(Endpoint::parse("unix:" + path)); });
  auto accepted = listener.accept(2s);
  CHECK(accepted.can_pass_fds());
  client.get();
}

TEST_CASE("accept gives up after its timeout - and interrupt() ends a wait at once") {
  Listener listener(Endpoint::parse("tcp:127.0.0.1:0"));
  CHECK_THROWS_AS(listener.accept(50ms), mig::transport::PeerError);
  auto waiting = std::async(std::launch::async, [&] { return listener.accept(); });
  std::this_thread::sleep_for(50ms);
  listener.interrupt();
  CHECK_THROWS_AS(waiting.get(), mig::transport::Interrupted);
}

namespace {

// A receiving Stream and a raw peer that sends `chunk` bytes of a frame of `length` payload
// bytes every `every`, until it has sent `total` bytes (header included) or the stream goes.
struct Trickle {
  int fds[2] = {-1, -1};
  std::unique_ptr<mig::transport::Stream> receiver;
  mig::UniqueFd peer;
  std::future<void> sending;

  Trickle(std::uint64_t length, std::size_t chunk, std::chrono::milliseconds every, std::size_t total) {
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
    receiver = std::make_unique<mig::transport::Stream>(mig::UniqueFd(fds[0]));
    peer = mig::UniqueFd(fds[1]);
    mig::wire::FrameHeader header;
    header.type = static_cast<std::uint16_t>(mig::wire::MessageType::round_end);
    header.length = length;
    std::vector<char> bytes(sizeof header + length);
    std::memcpy(bytes.data(), &header, sizeof header);
    sending = std::async(std::launch::async, [this, bytes = std::move(bytes), chunk, every, total] {
      for (std::size_t sent = 0; sent < std::min(total, bytes.size()); sent += chunk) {
        if (::send(peer.get(), bytes.data() + sent, std::min(chunk, bytes.size() - sent), MSG_NOSIGNAL) < 0) return;
        std::this_thread::sleep_for(every);
      }
    });
  }
  ~Trickle() {
    ::shutdown(peer.get(), SHUT_RDWR);
    sending.get();
  }
  // Reads the frame whole; how long that took, or threw.
  std::chrono::milliseconds read_frame() {
    const auto start = std::chrono::steady_clock::now();
    const auto header = receiver->read_header();
    receiver->read_payload(header);
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start);
  }
};

std::chrono::milliseconds since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start);
}

}  // namespace

TEST_CASE("a peer trickling a frame a byte at a time is given up within the timeout - not kept alive by each byte") {
  // Each byte comes well within the silence timeout; the 16-byte header would take 3.2 s.
  Trickle trickle(4, 1, 200ms, 1000);
  trickle.receiver->set_timeout(500ms);
  const auto start = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH(trickle.receiver->read_header(), Contains("too slowly"));
  CHECK(since(start) < 1500ms);
}

TEST_CASE("a large frame trickled under the floor rate fails within a window - not after its length at the floor") {
  // 1 MiB at 10 KB/s: the floor (16 KiB/s) would give it over a minute as a whole.
  Trickle trickle(1 << 20, 1000, 100ms, 1 << 20);
  trickle.receiver->set_timeout(500ms);
  const auto start = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH(trickle.read_frame(), Contains("too slowly (under 16 KiB/s)"));
  CHECK(since(start) < 1500ms);
}

TEST_CASE("a frame arriving slowly but above the floor rate is read whole") {
  // 64 KiB at 32 KiB/s takes 2 s, four times the timeout.
  Trickle trickle(64 << 10, 4096, 125ms, 1 << 20);
  trickle.receiver->set_timeout(500ms);
  CHECK(trickle.read_frame() >= 1500ms);
}

TEST_CASE("a peer that goes silent mid-frame is noticed after the timeout, counted from its last byte") {
  Trickle trickle(1 << 20, 64 << 10, 50ms, 256 << 10);  // a quarter of the frame, in 200 ms
  trickle.receiver->set_timeout(600ms);
  const auto start = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH(trickle.read_frame(), Contains("stopped responding"));
  // The last byte came about 150 ms in: a blocking read timed per call would take twice the
  // timeout from there.
  CHECK(since(start) >= 600ms);
  CHECK(since(start) < 1100ms);
}

TEST_CASE("a sender whose peer stops reading gives up after the timeout") {
  int fds[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
  mig::transport::Stream sender{mig::UniqueFd(fds[0])};
  mig::UniqueFd never_reads(fds[1]);
  sender.set_timeout(500ms);
  const std::vector<std::byte> big(8 << 20);
  const auto start = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH(sender.send_frame(mig::wire::MessageType::round_end, big), Contains("send: the peer stopped responding"));
  CHECK(since(start) >= 500ms);
  CHECK(since(start) < 1500ms);
}
