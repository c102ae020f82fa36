// QMP's framing: a stream of JSON objects, as QEMU reads it - not only one per line. The
// splitter finds where each top-level value ends without parsing it, so one bound covers
// every message and a client cannot make the server hold more than that.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

namespace mig::control {

inline constexpr std::size_t kMaxQmpMessage = 1u << 20;

class JsonSplitter {
 public:
  // Takes more bytes from the client.
  void feed(std::string_view bytes) { pending_.append(bytes); }
  // The next complete top-level value, or nothing until more bytes come. Text that cannot
  // start a JSON object (outside any object) comes out up to the end of its line, for the
  // parser to refuse. Throws std::length_error once a message exceeds kMaxQmpMessage.
  std::optional<std::string> next();

 private:
  std::string pending_;
  std::size_t scanned_ = 0;  // bytes of pending_ already scanned for the current value
  int depth_ = 0;
  bool in_string_ = false, escaped_ = false;
};

}  // namespace mig::control
