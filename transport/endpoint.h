// Where streams come from: endpoint names, connecting, and listening.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "../transport/stream.h"

namespace mig::transport {

// "tcp:HOST:PORT" or "unix:PATH". Throws std::invalid_argument naming the expected forms.
struct Endpoint {
  std::string host;
  std::uint16_t port = 0;
  std::string unix_path;  // set for unix: endpoints, which can also pass file descriptors
  static Endpoint parse(const std::string& text);
  std::string to_string() const;
};

// How long a peer may take over the TLS handshake before it is refused.
inline constexpr std::chrono::milliseconds kHandshakeTimeout{10000};

// Connection set-up through Boost.Asio; the connected socket then becomes a Stream. Over tcp:
// with `tls`, the handshake is done (and the server authenticated) before it returns. Over
// unix:, the listener must run as this user or as root (SO_PEERCRED), and TLS is not used:
// the kernel vouches for the peer, and file descriptors can pass. Throws PeerError when
// nobody answers or the peer is refused.
Stream connect(const Endpoint& endpoint, const TlsContext* tls = nullptr);

// Who a listener lets in. A connection refused is closed and reported, and the listener goes
// on waiting: a stranger cannot end a receiver's wait, nor take the place of its source.
struct AcceptPolicy {
  std::shared_ptr<const TlsContext> tls;  // tcp: connections must complete this handshake
  std::chrono::milliseconds handshake_timeout = kHandshakeTimeout;
  std::function<void(const std::string& why)> refused;  // told of each refusal, if set
};

// A listening socket. A unix: socket file is created mode 0600 (only its owner may connect);
// a stale file from a process that is gone is replaced, a live one is refused.
class Listener {
 public:
  explicit Listener(const Endpoint& endpoint, AcceptPolicy policy = {});
  ~Listener();
  Listener(Listener&&) noexcept;
  std::uint16_t port() const;    // the bound TCP port, useful with port 0
  std::string endpoint() const;  // what a peer connects to: tcp:HOST:PORT (actual port) or unix:PATH

  // Waits for the next connection the policy lets in, for at most `timeout` (forever when
  // absent). Throws PeerError on timeout, and Interrupted once interrupt() was called.
  Stream accept(std::optional<std::chrono::milliseconds> timeout = std::nullopt);
  // From any thread: makes a waiting accept() (and every later one) throw Interrupted.
  void interrupt();

 private:
  void vet(Stream& stream) const;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Over a unix: socket: throws PeerError unless the peer runs as this user or as root.
void check_peer_credentials(int fd);

// Binds a unix: socket path as Listener does (mode 0600, stale replaced, live refused) and
// returns the listening fd; for servers that run their own accept loop.
UniqueFd listen_unix(const std::string& path, int backlog);

}  // namespace mig::transport
