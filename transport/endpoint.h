// Where streams come from: endpoint names, connecting, and listening.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "transport/stream.h"

namespace mig::transport {

// "tcp:HOST:PORT" or "unix:PATH". Throws std::invalid_argument naming the expected forms.
struct Endpoint {
  std::string host;
  std::uint16_t port = 0;
  std::string unix_path;  // set for unix: endpoints, which can also pass file descriptors
  static Endpoint parse(const std::string& text);
  std::string to_string() const;
};

// Connection set-up through Boost.Asio; the connected socket then becomes a plain Stream.
// Throws PeerError when nobody answers.
Stream connect(const Endpoint& endpoint);

// A listening socket. A unix: socket file is created mode 0600 (only its owner may connect);
// a stale file from a process that is gone is replaced, a live one is refused.
class Listener {
 public:
  explicit Listener(const Endpoint& endpoint);
  ~Listener();
  Listener(Listener&&) noexcept;
  std::uint16_t port() const;    // the bound TCP port, useful with port 0
  std::string endpoint() const;  // what a peer connects to: tcp:HOST:PORT (actual port) or unix:PATH

  // Waits for the next connection, for at most `timeout` (forever when absent). Throws
  // PeerError on timeout, and Interrupted once interrupt() was called.
  Stream accept(std::optional<std::chrono::milliseconds> timeout = std::nullopt);
  // From any thread: makes a waiting accept() (and every later one) throw Interrupted.
  void interrupt();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Binds a unix: socket path as Listener does (mode 0600, stale replaced, live refused) and
// returns the listening fd; for servers that run their own accept loop.
UniqueFd listen_unix(const std::string& path, int backlog);

}  // namespace mig::transport
