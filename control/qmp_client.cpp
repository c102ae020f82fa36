#include "control/qmp_client.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cstring>

namespace mig::control {

QmpClient::QmpClient(const std::string& path, std::chrono::milliseconds timeout) : timeout_(timeout) {
  fd_ = UniqueFd(check_syscall("socket(AF_UNIX)", [] { return ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0); }));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) throw std::invalid_argument("QMP socket path is too long: " + path);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  if (::connect(fd_.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0)
    throw std::runtime_error("cannot connect to the QMP socket " + path + ": " + std::strerror(errno));
  auto greeting = read_message(timeout_);
  if (!greeting || !greeting->contains("QMP")) throw std::runtime_error(path + " did not greet as a QMP server");
  greeting_ = *greeting;
  execute("qmp_capabilities");
}

void QmpClient::send_raw(const std::string& bytes) {
  std::size_t sent = 0;
  while (sent < bytes.size()) {
    const ssize_t n = ::send(fd_.get(), bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw std::runtime_error(std::string("QMP send: ") + std::strerror(errno));
    sent += static_cast<std::size_t>(n);
  }
}

std::optional<nlohmann::json> QmpClient::read_message(std::optional<std::chrono::milliseconds> timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout.value_or(std::chrono::hours(24 * 365));
  for (;;) {
    if (const auto eol = buffer_.find('\n'); eol != std::string::npos) {
      const std::string line = buffer_.substr(0, eol);
      buffer_.erase(0, eol + 1);
      auto message = nlohmann::json::parse(line, nullptr, false);
      if (message.is_discarded()) throw std::runtime_error("the QMP server sent something that is not JSON");
      return message;
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return std::nullopt;
    pollfd pfd{fd_.get(), POLLIN, 0};
    if (::poll(&pfd, 1, static_cast<int>(std::min<std::int64_t>(left.count(), 1 << 30))) <= 0) continue;
    char chunk[65536];
    const ssize_t n = ::recv(fd_.get(), chunk, sizeof chunk, 0);
    if (n == 0 || (n < 0 && errno == ECONNRESET)) throw std::runtime_error("the QMP server closed the connection");
    if (n < 0 && errno != EINTR) throw std::runtime_error(std::string("QMP receive: ") + std::strerror(errno));
    if (n > 0) buffer_.append(chunk, static_cast<std::size_t>(n));
  }
}

nlohmann::json QmpClient::execute(const std::string& command, const nlohmann::json& arguments) {
  const std::uint64_t id = next_id_++;
  nlohmann::json request = {{"execute", command}, {"id", id}};
  if (!arguments.empty()) request["arguments"] = arguments;
  send_raw(request.dump() + "\n");
  for (;;) {
    auto message = read_message(timeout_);
    if (!message) throw std::runtime_error("no reply to " + command + " within " + std::to_string(timeout_.count()) + " ms");
    if (message->contains("event")) {
      events_.push_back(std::move(*message));
      continue;
    }
    if (message->value("id", nlohmann::json()) != id) continue;  // a reply to someone else's id: not ours
    if (message->contains("error"))
      throw QmpError((*message)["error"].value("class", "GenericError"), (*message)["error"].value("desc", "unknown error"));
    return (*message)["return"];
  }
}

std::optional<nlohmann::json> QmpClient::next_event(std::optional<std::chrono::milliseconds> timeout) {
  if (!events_.empty()) {
    auto event = std::move(events_.front());
    events_.pop_front();
    return event;
  }
  const auto deadline = std::chrono::steady_clock::now() + timeout.value_or(std::chrono::hours(24 * 365));
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    auto message = read_message(std::max(left, std::chrono::milliseconds(0)));
    if (!message) return std::nullopt;
    if (message->contains("event")) return message;
  }
}

}  // namespace mig::control
