#include "control/qmp_server.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>

#include "control/json.h"
#include "control/qmp_framing.h"
#include "transport/endpoint.h"

namespace mig::control {

namespace {

constexpr std::size_t kMaxQueuedOutput = 4u << 20;  // a client this far behind is dropped

const char* const kCommands[] = {
    "qmp_capabilities", "query-commands", "query-version", "query-status", "stop", "cont", "quit",
    "migrate", "migrate_cancel", "migrate-start-postcopy", "migrate-recover", "query-migrate", "migrate-set-parameters", "query-migrate-parameters",
    "calc-dirty-rate", "query-dirty-rate", "migrate-incoming",
};

nlohmann::json error_reply(const std::string& error_class, const std::string& desc) {
  return {{"error", {{"class", error_class}, {"desc", desc}}}};
}

void no_arguments(const nlohmann::json& arguments) {
  if (!arguments.empty()) throw CommandError(std::string("Parameter '") + arguments.items().begin().key() + "' is unexpected");
}

nlohmann::json version() { return {{"qemu", {{"major", 7}, {"minor", 2}, {"micro", 0}}}, {"package", "mig"}}; }

void signal_eventfd(int fd) {
  const std::uint64_t one = 1;
  [[maybe_unused]] auto n = ::write(fd, &one, sizeof one);
}

UniqueFd make_eventfd() {
  return UniqueFd(check_syscall("eventfd", [] { return ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); }));
}

}  // namespace

std::string qmp_socket_path(const std::string& endpoint) {
  if (endpoint.rfind("unix:", 0) != 0 || endpoint.size() <= 5)
    throw std::invalid_argument("QMP socket '" + endpoint + "' is not of the form unix:PATH");
  return endpoint.substr(5);
}

struct QmpServer::Client {
  explicit Client(UniqueFd socket) : fd(std::move(socket)) {}
  UniqueFd fd;
  UniqueFd wake = make_eventfd();  // output was queued
  std::mutex mutex;
  std::string outbox;
  bool negotiated = false;  // only then does the client get events
  bool closing = false;     // close once the outbox is written
  std::atomic<bool> done{false};
  std::thread thread;

  void queue(const nlohmann::json& message) {
    std::string line = message.dump() + "\r\n";
    {
      std::lock_guard lock(mutex);
      if (outbox.size() + line.size() > kMaxQueuedOutput) {
        closing = true;  // it stopped reading; what it missed cannot be made up
        outbox.clear();
      } else {
        outbox += line;
      }
    }
    signal_eventfd(wake.get());
  }
};

QmpServer::QmpServer(Domain& domain, const std::string& path)
    : domain_(domain), path_(path), listen_fd_(transport::listen_unix(path, 8)), stop_(make_eventfd()) {
  subscription_ = domain_.subscribe([this](const Event& event) { broadcast(event); });
  acceptor_ = std::thread([this] { accept_clients(); });
}

QmpServer::~QmpServer() {
  domain_.unsubscribe(subscription_);
  signal_eventfd(stop_.get());
  acceptor_.join();
  for (auto& client : clients_) client->thread.join();
  ::unlink(path_.c_str());
}

void QmpServer::accept_clients() {
  for (;;) {
    pollfd fds[2] = {{listen_fd_.get(), POLLIN, 0}, {stop_.get(), POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0 && errno != EINTR) return;
    if (fds[1].revents) return;
    if (!(fds[0].revents & POLLIN)) continue;
    UniqueFd socket(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
    if (!socket.valid()) continue;
    std::lock_guard lock(mutex_);
    // Clients that left are joined here, so their number stays bounded.
    std::erase_if(clients_, [](const std::unique_ptr<Client>& c) {
      if (!c->done) return false;
      c->thread.join();
      return true;
    });
    if (clients_.size() >= kMaxClients) {
      const std::string refusal = error_reply("GenericError", "too many QMP clients").dump() + "\r\n";
      [[maybe_unused]] auto n = ::send(socket.get(), refusal.data(), refusal.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      continue;
    }
    auto& client = *clients_.emplace_back(std::make_unique<Client>(std::move(socket)));
    client.thread = std::thread([this, &client] {
      serve(client);
      ::shutdown(client.fd.get(), SHUT_RDWR);  // now, not when the client is reaped
      client.done = true;
    });
  }
}

void QmpServer::serve(Client& client) {
  client.queue({{"QMP", {{"version", version()}, {"capabilities", nlohmann::json::array()}}}});
  JsonSplitter splitter;
  char buffer[65536];
  for (;;) {
    bool has_output, closing;
    {
      std::lock_guard lock(client.mutex);
      has_output = !client.outbox.empty();
      closing = client.closing;
    }
    if (closing && !has_output) return;
    // A client being closed is only sent what is queued for it; nothing more is read.
    const short wanted = static_cast<short>((closing ? 0 : POLLIN) | (has_output ? POLLOUT : 0));
    pollfd fds[3] = {{client.fd.get(), wanted, 0},
                     {client.wake.get(), POLLIN, 0},
                     {stop_.get(), POLLIN, 0}};
    if (::poll(fds, 3, -1) < 0 && errno != EINTR) return;
    if (fds[2].revents) return flush(client);  // the last events (SHUTDOWN) still go out
    if (fds[1].revents) {
      std::uint64_t count;
      [[maybe_unused]] auto n = ::read(client.wake.get(), &count, sizeof count);
    }
    if ((fds[0].revents & POLLOUT) && !write_pending(client)) return;
    if (fds[0].revents & (POLLERR | POLLNVAL)) return;
    if (closing || !(fds[0].revents & (POLLIN | POLLHUP))) continue;
    const ssize_t got = ::recv(client.fd.get(), buffer, sizeof buffer, MSG_DONTWAIT);
    if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR)) return;  // the client left, maybe mid-command
    if (got < 0) continue;
    splitter.feed({buffer, static_cast<std::size_t>(got)});
    try {
      while (auto message = splitter.next()) handle_message(client, *message);
    } catch (const std::length_error&) {
      client.queue(error_reply("GenericError", "message exceeds " + std::to_string(kMaxQmpMessage) + " bytes; closing"));
      std::lock_guard lock(client.mutex);
      client.closing = true;
    }
  }
}

// Writes what the client's queue holds, as far as its socket takes it now. False when the
// socket failed.
bool QmpServer::write_pending(Client& client) {
  std::lock_guard lock(client.mutex);
  if (client.outbox.empty()) return true;
  const ssize_t sent = ::send(client.fd.get(), client.outbox.data(), client.outbox.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
  if (sent < 0) return errno == EAGAIN || errno == EINTR;
  client.outbox.erase(0, static_cast<std::size_t>(sent));
  return true;
}

// The queue's lock is never held while waiting: events keep being queued meanwhile.
void QmpServer::flush(Client& client) {
  for (;;) {
    if (!write_pending(client)) return;
    {
      std::lock_guard lock(client.mutex);
      if (client.outbox.empty()) return;
    }
    pollfd pfd{client.fd.get(), POLLOUT, 0};
    if (::poll(&pfd, 1, 1000) <= 0) return;
  }
}

void QmpServer::handle_message(Client& client, const std::string& text) {
  const auto request = nlohmann::json::parse(text, nullptr, false);
  if (request.is_discarded()) return client.queue(error_reply("GenericError", "JSON parse error"));
  bool quit = false;
  nlohmann::json reply = respond(client, request, quit);
  if (request.is_object() && request.contains("id")) reply["id"] = request["id"];
  client.queue(reply);
  if (!quit) return;
  // The reply must be out before the domain shuts down and the process ends.
  flush(client);
  domain_.quit();
}

nlohmann::json QmpServer::respond(Client& client, const nlohmann::json& request, bool& quit) {
  try {
    if (!request.is_object() || !request.contains("execute") || !request["execute"].is_string())
      throw CommandError("Expected 'execute' with a command name");
    const auto command = request["execute"].get<std::string>();
    const auto arguments = request.value("arguments", nlohmann::json::object());
    if (!arguments.is_object()) throw CommandError("Invalid parameter type for 'arguments', expected: object");
    // qmp_capabilities comes first and once; quit concerns the client too (its reply must go
    // out before the process ends). Everything else only looks at the domain.
    const bool negotiating = command == "qmp_capabilities";
    {
      std::lock_guard lock(client.mutex);
      if (negotiating && client.negotiated)
        throw CommandError("Capabilities negotiation is already complete, command ignored", "CommandNotFound");
      if (!negotiating && !client.negotiated)
        throw CommandError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound");
    }
    if (negotiating || command == "quit") {
      no_arguments(arguments);
      std::lock_guard lock(client.mutex);
      client.negotiated = true;
      quit = command == "quit";
      return {{"return", nlohmann::json::object()}};
    }
    const auto& table = domain_commands();
    const auto found = table.find(command);
    if (found == table.end()) throw CommandError("The command " + command + " has not been found", "CommandNotFound");
    return {{"return", found->second(domain_, arguments)}};
  } catch (const CommandError& e) {
    return error_reply(e.error_class, e.what());
  } catch (const std::exception& e) {
    return error_reply("GenericError", e.what());
  }
}

namespace {

// A command that takes no arguments and answers what `answer` says of the domain.
template <typename Answer>
auto query(Answer answer) {
  return [answer](Domain& domain, const nlohmann::json& arguments) {
    no_arguments(arguments);
    return nlohmann::json(answer(domain));
  };
}

// A command that takes no arguments, does `act` to the domain, and answers {}.
template <typename Act>
auto action(Act act) {
  return [act](Domain& domain, const nlohmann::json& arguments) {
    no_arguments(arguments);
    act(domain);
    return nlohmann::json::object();
  };
}

// migrate: a migration started, a post-copy resumed (resume), or a dry run, which answers
// with what the destination would take of what the migration asks (mig's own reply).
nlohmann::json migrate(Domain& domain, const nlohmann::json& arguments) {
  const auto resume = arguments.value("resume", nlohmann::json(false));
  if (!resume.is_boolean()) throw CommandError("Invalid parameter type for 'resume', expected: boolean");
  if (resume.get<bool>()) {
    if (!arguments.contains("uri") || !arguments["uri"].is_string() || arguments.size() != 2)
      throw CommandError("migrate with resume takes only 'uri' (the destination's migrate-recover address)");
    domain.resume_postcopy(arguments["uri"].get<std::string>());
    return nlohmann::json::object();
  }
  auto request = parse_migrate_arguments(arguments, domain.parameters());
  if (request.dry_run) return to_json(domain.check_destination(request));
  domain.migrate(std::move(request));
  return nlohmann::json::object();
}

}  // namespace

// The commands that only look at the domain; qmp_capabilities and quit also concern the
// client, and respond() takes them itself.
const QmpServer::CommandTable& QmpServer::domain_commands() {
  static const CommandTable table = {
      {"query-commands", query([](Domain&) {
         auto list = nlohmann::json::array();
         for (const char* name : kCommands) list.push_back({{"name", name}});
         return list;
       })},
      {"query-version", query([](Domain&) { return version(); })},
      {"query-status", query([](Domain& domain) { return domain.query_status(); })},
      {"stop", action([](Domain& domain) { domain.stop(); })},
      {"cont", action([](Domain& domain) { domain.cont(); })},
      {"migrate", migrate},
      {"migrate-recover",
       [](Domain& domain, const nlohmann::json& arguments) {
         if (!arguments.is_object() || !arguments.contains("uri") || !arguments["uri"].is_string() || arguments.size() != 1)
           throw CommandError("migrate-recover takes 'uri'");
         return nlohmann::json{{"uri", domain.migrate_recover(arguments["uri"].get<std::string>())}};
       }},
      {"migrate_cancel", action([](Domain& domain) { domain.cancel_migration(); })},
      {"migrate-start-postcopy", action([](Domain& domain) { domain.start_postcopy(); })},
      {"query-migrate", query([](Domain& domain) { return domain.query_migrate(); })},
      {"migrate-set-parameters",
       [](Domain& domain, const nlohmann::json& arguments) {
         domain.set_parameters(arguments);
         return nlohmann::json::object();
       }},
      {"query-migrate-parameters", query([](Domain& domain) { return to_json(domain.parameters()); })},
      {"calc-dirty-rate",
       [](Domain& domain, const nlohmann::json& arguments) {
         const auto seconds = arguments.value("calc-time", nlohmann::json());
         if (!seconds.is_number()) throw CommandError("Invalid parameter type for 'calc-time', expected: number");
         if (arguments.size() != 1) throw CommandError("calc-dirty-rate takes only 'calc-time'");
         domain.calc_dirty_rate(seconds.get<double>());
         return nlohmann::json::object();
       }},
      {"query-dirty-rate", query([](Domain& domain) { return domain.query_dirty_rate(); })},
      {"migrate-incoming",
       [](Domain& domain, const nlohmann::json& arguments) {
         const auto uri = arguments.value("uri", nlohmann::json());
         if (!uri.is_string()) throw CommandError("Invalid parameter type for 'uri', expected: string");
         return nlohmann::json{{"uri", domain.migrate_incoming(uri.get<std::string>())}};
       }},
  };
  return table;
}

void QmpServer::broadcast(const Event& event) {
  const auto since_epoch = event.time.time_since_epoch();
  const auto seconds = std::chrono::duration_cast<std::chrono::seconds>(since_epoch);
  nlohmann::json message = {
      {"event", event.name},
      {"timestamp",
       {{"seconds", seconds.count()},
        {"microseconds", std::chrono::duration_cast<std::chrono::microseconds>(since_epoch - seconds).count()}}}};
  if (!event.data.empty()) message["data"] = event.data;
  std::lock_guard lock(mutex_);
  for (auto& client : clients_) {
    bool negotiated;
    {
      std::lock_guard client_lock(client->mutex);
      negotiated = client->negotiated;
    }
    if (negotiated && !client->done) client->queue(message);
  }
}

}  // namespace mig::control
