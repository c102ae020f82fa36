// A QMP control socket over a Domain: QEMU's greeting, capabilities negotiation, commands
// with their QEMU names and arguments, and asynchronous events. Each client has a thread of
// its own; events are queued to it, so a client that does not read never holds up the
// migration that emits them (its queue is bounded; past that, the client is dropped).
//
// Bad input never reaches the guest: a line that is not JSON, an unknown command, arguments
// of the wrong type each get an {"error"} reply; a message over 1 MiB gets one and the
// connection is closed.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/fd.h"
#include "control/domain.h"

namespace mig::control {

// "unix:PATH" for --qmp options: the path. Throws std::invalid_argument otherwise.
std::string qmp_socket_path(const std::string& endpoint);

class QmpServer {
 public:
  static constexpr std::size_t kMaxClients = 8;

  // Listens on `path` (mode 0600; a stale socket file is replaced, a live one refused).
  QmpServer(Domain& domain, const std::string& path);
  ~QmpServer();
  QmpServer(const QmpServer&) = delete;
  QmpServer& operator=(const QmpServer&) = delete;

  const std::string& path() const { return path_; }

 private:
  struct Client;
  void accept_clients();
  void serve(Client& client);
  void handle_message(Client& client, const std::string& text);
  bool write_pending(Client& client);
  void flush(Client& client);  // writes what is queued now, waiting up to a second at a time
  // The reply to one request; sets `quit` when the domain should shut down once it is sent.
  nlohmann::json respond(Client& client, const nlohmann::json& request, bool& quit);
  using CommandTable = std::map<std::string, std::function<nlohmann::json(Domain&, const nlohmann::json&)>>;
  static const CommandTable& domain_commands();
  void broadcast(const Event& event);

  Domain& domain_;
  const std::string path_;
  UniqueFd listen_fd_;
  UniqueFd stop_;  // an eventfd: readable once the server is going away
  std::mutex mutex_;
  std::vector<std::unique_ptr<Client>> clients_;
  std::uint64_t subscription_ = 0;
  std::thread acceptor_;
};

}  // namespace mig::control
