// Authenticated streams: mutual TLS (x509 and PSK), who is refused and why, and unix-socket
// peer credentials. A refused peer never gets a frame through, and the listener waits on.
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <fmt/core.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <mutex>

#include "tests/tls_creds.h"
#include "transport/endpoint.h"

using namespace mig;
using namespace std::chrono_literals;
using Catch::Matchers::Contains;
using transport::TlsContext;
using transport::TlsRole;

namespace {

// A TLS listener on a free port that records every refusal.
struct SecureListener {
  std::mutex mutex;
  std::vector<std::string> refusals;
  transport::Listener listener;

  explicit SecureListener(std::shared_ptr<const TlsContext> tls, const std::string& endpoint = "tcp:127.0.0.1:0")
      : listener(transport::Endpoint::parse(endpoint), {std::move(tls), 2000ms, [this](const std::string& why) {
                                                           std::lock_guard lock(mutex);
                                                           refusals.push_back(why);
                                                         }}) {}
  transport::Endpoint endpoint() const { return transport::Endpoint::parse(listener.endpoint()); }
  std::vector<std::string> refused() {
    std::lock_guard lock(mutex);
    return refusals;
  }
};

std::shared_ptr<const TlsContext> server(const std::string& dir, std::vector<std::string> authz = {}) {
  auto credentials = test::x509(dir);
  credentials.authz = std::move(authz);
  return TlsContext::load(credentials, TlsRole::server);
}
std::shared_ptr<const TlsContext> client(const std::string& dir, const std::string& hostname = "") {
  auto credentials = test::x509(dir);
  credentials.hostname = hostname;
  return TlsContext::load(credentials, TlsRole::client);
}

// The accepted end answers one RoundAck to whoever got through, so a client learns whether
// the server let it in.
std::future<transport::Stream> accept_one(SecureListener& l) {
  return std::async(std::launch::async, [&l] {
    auto stream = l.listener.accept(10s);
    stream.set_timeout(2s);
    stream.send(wire::RoundAck{42});
    return stream;
  });
}

bool let_in(transport::Stream& client) {
  try {
    client.set_timeout(2s);
    return client.receive<wire::RoundAck>().round == 42;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

TEST_CASE("mutual TLS: frames with gathered pages arrive intact, and the stream says how it is protected") {
  SecureListener l(server(test::trusted_creds()));
  auto accepted = std::async(std::launch::async, [&] { return l.listener.accept(5s); });
  auto sender = transport::connect(l.endpoint(), client(test::trusted_creds()).get());
  auto receiver = accepted.get();
  CHECK(sender.security() != transport::StreamSecurity::plaintext);
  CHECK(receiver.security() != transport::StreamSecurity::plaintext);
  // Encrypting in user space leaves nothing to send zero-copy.
  if (sender.security() == transport::StreamSecurity::tls_user_space) CHECK_FALSE(sender.enable_zerocopy(transport::Stream::ZeroCopy::always));

  // 600 scattered pages (more than two coalesced writes) behind a small head.
  std::vector<std::byte> memory(600 * 4096);
  for (std::size_t i = 0; i < memory.size(); ++i) memory[i] = static_cast<std::byte>(i * 31 + i / 4096);
  std::vector<iovec> pages;
  for (std::size_t p = 600; p-- > 0;) pages.push_back({memory.data() + p * 4096, 4096});
  const std::vector<std::byte> head(16, std::byte{7});
  auto sending = std::async(std::launch::async, [&] {
    sender.send_gathered(wire::MessageType::page_batch, head, pages, transport::PageMemory::guest);
    sender.send(wire::RoundEnd{3});
  });
  const auto header = receiver.read_header();
  REQUIRE(header.length == head.size() + memory.size());
  const auto payload = receiver.read_payload(header);
  sending.get();
  CHECK(std::equal(head.begin(), head.end(), payload.begin()));
  bool same = true;
  for (std::size_t p = 0; p < 600; ++p)
    same = same && std::memcmp(payload.data() + 16 + p * 4096, memory.data() + (599 - p) * 4096, 4096) == 0;
  CHECK(same);
  CHECK(receiver.receive<wire::RoundEnd>().round == 3);
  CHECK(receiver.counters().bytes_received == sender.counters().bytes_sent);
}

TEST_CASE("a client without TLS, one the CA did not sign, and one the server cannot trust are refused - the listener waits on") {
  SecureListener l(server(test::trusted_creds()));
  auto accepted = accept_one(l);

  auto plaintext = transport::connect(l.endpoint());
  plaintext.send(wire::Hello{});
  CHECK_FALSE(let_in(plaintext));
  // Trusts our CA, but its own certificate comes from another one.
  const std::string mixed = "/tmp/mig-tls-test-" + std::to_string(::getpid()) + "/mixed";
  std::filesystem::create_directories(mixed);
  std::filesystem::copy_file(test::trusted_creds() + "/ca-cert.pem", mixed + "/ca-cert.pem", std::filesystem::copy_options::overwrite_existing);
  for (const char* f : {"client-cert.pem", "client-key.pem"})
    std::filesystem::copy_file(test::stranger_creds() + "/" + f, mixed + "/" + f, std::filesystem::copy_options::overwrite_existing);
  {
    auto unsigned_client = transport::connect(l.endpoint(), client(mixed).get());
    CHECK_FALSE(let_in(unsigned_client));
  }
  // A stranger does not trust our server either, and says so itself.
  CHECK_THROWS_WITH(transport::connect(l.endpoint(), client(test::stranger_creds()).get()), Contains("certificate"));

  auto trusted = transport::connect(l.endpoint(), client(test::trusted_creds()).get());
  CHECK(let_in(trusted));
  accepted.get();
  const auto refused = l.refused();
  REQUIRE(refused.size() == 3);
  for (const auto& why : refused) CHECK_THAT(why, Contains("refused a connection from 127.0.0.1:"));
  CHECK_THAT(refused[1], Contains("certificate"));
}

TEST_CASE("the client checks the server name - the host connected to by default, or the one it was given") {
  SecureListener l(server(test::trusted_creds()));
  auto accepted = accept_one(l);
  CHECK_THROWS_WITH(transport::connect(l.endpoint(), client(test::trusted_creds(), "db.example.org").get()), Contains("hostname mismatch"));
  auto named = transport::connect(l.endpoint(), client(test::trusted_creds(), "localhost").get());
  CHECK(let_in(named));
  accepted.get();
}

TEST_CASE("the authz list admits only the client subjects listed") {
  SECTION("not listed") {
    SecureListener l(server(test::trusted_creds(), {"CN=someone-else,O=mig test"}));
    auto accepted = std::async(std::launch::async, [&] { return l.listener.accept(1500ms); });
    auto c = transport::connect(l.endpoint(), client(test::trusted_creds()).get());
    CHECK_FALSE(let_in(c));
    CHECK_THROWS_AS(accepted.get(), transport::PeerError);
    REQUIRE(l.refused().size() == 1);
    CHECK_THAT(l.refused()[0], Contains("'CN=mig-source,O=mig test' is not in --tls-authz"));
  }
  SECTION("listed") {
    SecureListener l(server(test::trusted_creds(), {"CN=other,O=x", "CN=mig-source,O=mig test"}));
    auto accepted = accept_one(l);
    auto c = transport::connect(l.endpoint(), client(test::trusted_creds()).get());
    CHECK(let_in(c));
    accepted.get();
  }
}

TEST_CASE("a pre-shared key authenticates both ends - a wrong key or identity is refused") {
  const auto server_file = test::make_psk_file("server", "# identity:key\nmig-a:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n");
  transport::TlsCredentials server_psk;
  server_psk.psk_file = server_file;
  SecureListener l(TlsContext::load(server_psk, TlsRole::server));
  auto accepted = accept_one(l);
  const auto psk_client = [](const std::string& line) {
    transport::TlsCredentials c;
    c.psk_file = test::make_psk_file("client", line + "\n");
    return TlsContext::load(c, TlsRole::client);
  };
  for (const char* wrong : {"mig-a:ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
                            "mig-b:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"}) {
    try {
      auto c = transport::connect(l.endpoint(), psk_client(wrong).get());
      CHECK_FALSE(let_in(c));
    } catch (const transport::PeerError&) {
    }
  }
  auto right = transport::connect(l.endpoint(), psk_client("mig-a:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f").get());
  CHECK(let_in(right));
  CHECK(right.security() != transport::StreamSecurity::plaintext);
  accepted.get();
  CHECK(l.refused().size() == 2);
}

TEST_CASE("bad TLS credentials are refused in one line that names the file") {
  const std::string empty = "/tmp/mig-tls-test-" + std::to_string(::getpid()) + "/empty";
  std::filesystem::create_directories(empty);
  CHECK_THROWS_WITH(client(empty), Contains("--tls-creds " + empty + ": cannot read ca-cert.pem"));
  const std::string garbage = "/tmp/mig-tls-test-" + std::to_string(::getpid()) + "/garbage";
  std::filesystem::create_directories(garbage);
  std::ofstream(garbage + "/ca-cert.pem") << "not a certificate\n";
  CHECK_THROWS_WITH(client(garbage), Contains("ca-cert.pem"));
  // A server's credentials are not a client's.
  std::filesystem::remove(garbage + "/ca-cert.pem");
  for (const char* f : {"ca-cert.pem", "server-cert.pem", "server-key.pem"})
    std::filesystem::copy_file(test::trusted_creds() + "/" + f, garbage + "/" + f);
  CHECK_NOTHROW(server(garbage));
  CHECK_THROWS_WITH(client(garbage), Contains("cannot read client-cert.pem"));

  transport::TlsCredentials psk;
  psk.psk_file = test::make_psk_file("short", "mig:0011\n");
  CHECK_THROWS_WITH(TlsContext::load(psk, TlsRole::client), Contains("16 to 256 bytes"));
  psk.psk_file = test::make_psk_file("nohex", "mig:zz\n");
  CHECK_THROWS_WITH(TlsContext::load(psk, TlsRole::client), Contains("not a hex digit"));
  psk.psk_file = "/nonexistent/keys.psk";
  CHECK_THROWS_WITH(TlsContext::load(psk, TlsRole::client), Contains("--tls-psk: cannot read /nonexistent/keys.psk"));
  psk.x509_dir = test::trusted_creds();
  CHECK_THROWS_WITH(TlsContext::load(psk, TlsRole::client), Contains("not both"));
}

TEST_CASE("a unix socket admits only this user or root, even when its mode would let others connect") {
  if (::geteuid() != 0) {
    fmt::print("SKIPPED: connecting as another user needs root\n");
    std::exit(MIG_SKIP_CODE);
  }
  const std::string path = "/tmp/mig-tls-test-" + std::to_string(::getpid()) + ".sock";
  SecureListener l(nullptr, "unix:" + path);
  // What an operator loosening the mode would do: SO_PEERCRED still stands in the way.
  REQUIRE(::chmod(path.c_str(), 0666) == 0);
  auto accepted = std::async(std::launch::async, [&] { return l.listener.accept(1500ms); });
  const pid_t child = ::fork();
  if (child == 0) {
    // Only async-signal-safe calls here: the parent has threads.
    if (::setuid(65534) != 0) ::_exit(3);
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    ::_exit(::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0 ? 0 : 4);
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  CHECK_THROWS_AS(accepted.get(), transport::PeerError);
  REQUIRE(l.refused().size() == 1);
  CHECK_THAT(l.refused()[0], Contains("uid 65534"));
}
