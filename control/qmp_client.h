// A QMP client: what mig-ctl and mig-send --vm speak to a control socket with, and what the
// tests script an orchestrator with. It knows nothing of mig beyond QMP itself.
#pragma once

#include <nlohmann/json.hpp>

#include <chrono>
#include <deque>
#include <optional>
#include <stdexcept>
#include <string>

#include "common/fd.h"

namespace mig::control {

// An {"error"} reply.
struct QmpError : std::runtime_error {
  QmpError(std::string error_class_, const std::string& desc) : std::runtime_error(desc), error_class(std::move(error_class_)) {}
  std::string error_class;
};

class QmpClient {
 public:
  // Connects to the socket at `path`, reads the greeting and negotiates capabilities. Every
  // later wait for the server gives up after `timeout` (std::runtime_error).
  explicit QmpClient(const std::string& path, std::chrono::milliseconds timeout = std::chrono::seconds(10));

  // Runs a command; returns its "return" value, or throws QmpError. Events that arrive
  // meanwhile are kept for next_event().
  nlohmann::json execute(const std::string& command, const nlohmann::json& arguments = nlohmann::json::object());
  // The next event, waiting up to `timeout` (forever when absent); nothing on timeout.
  // Throws std::runtime_error when the server closed the connection.
  std::optional<nlohmann::json> next_event(std::optional<std::chrono::milliseconds> timeout);

  const nlohmann::json& greeting() const { return greeting_; }
  // Sends raw bytes, for tests of bad input.
  void send_raw(const std::string& bytes);
  // The next message of any kind, for tests of bad input.
  std::optional<nlohmann::json> read_message(std::optional<std::chrono::milliseconds> timeout);

 private:
  UniqueFd fd_;
  std::chrono::milliseconds timeout_;
  std::string buffer_;
  std::deque<nlohmann::json> events_;
  nlohmann::json greeting_;
  std::uint64_t next_id_ = 1;
};

}  // namespace mig::control
