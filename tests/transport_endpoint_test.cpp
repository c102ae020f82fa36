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

TEST_CASE("a peer trickling a frame a byte at a time is given up at the frame's deadline - not kept alive by each byte") {
  int fds[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
  mig::transport::Stream receiver{mig::UniqueFd(fds[0])};
  mig::UniqueFd peer(fds[1]);
  receiver.set_timeout(500ms);
  // Each byte comes well within the silence timeout; the 16-byte header takes 3.2 s in all.
  auto trickle = std::async(std::launch::async, [&] {
    mig::wire::FrameHeader header;
    header.type = static_cast<std::uint16_t>(mig::wire::MessageType::round_end);
    header.length = 4;
    const auto* bytes = reinterpret_cast<const char*>(&header);
    for (std::size_t i = 0; i < sizeof header; ++i) {
      if (::send(peer.get(), bytes + i, 1, MSG_NOSIGNAL) != 1) return;
      std::this_thread::sleep_for(200ms);
    }
  });
  const auto start = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH(receiver.read_header(), Contains("too slowly"));
  CHECK(std::chrono::steady_clock::now() - start < 1500ms);
  ::shutdown(peer.get(), SHUT_RDWR);
  trickle.get();
}
