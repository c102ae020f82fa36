#include "control/qmp_framing.h"

#include <stdexcept>

namespace mig::control {

namespace {
bool is_space(char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; }
}  // namespace

std::optional<std::string> JsonSplitter::next() {
  if (scanned_ == 0) {
    std::size_t start = 0;
    while (start < pending_.size() && is_space(pending_[start])) ++start;
    pending_.erase(0, start);
    if (pending_.empty()) return std::nullopt;
    if (pending_[0] != '{') {
      // Not the start of an object: hand the rest of the line to the parser to refuse.
      const auto eol = pending_.find('\n');
      if (eol == std::string::npos) {
        if (pending_.size() > kMaxQmpMessage) throw std::length_error("message too long");
        return std::nullopt;
      }
      std::string junk = pending_.substr(0, eol);
      pending_.erase(0, eol + 1);
      return junk;
    }
  }
  for (; scanned_ < pending_.size(); ++scanned_) {
    const char c = pending_[scanned_];
    if (in_string_) {
      if (escaped_) escaped_ = false;
      else if (c == '\\') escaped_ = true;
      else if (c == '"') in_string_ = false;
      continue;
    }
    if (c == '"') in_string_ = true;
    else if (c == '{' || c == '[') ++depth_;
    else if ((c == '}' || c == ']') && --depth_ == 0) {
      std::string message = pending_.substr(0, scanned_ + 1);
      pending_.erase(0, scanned_ + 1);
      scanned_ = 0;
      return message;
    }
  }
  if (scanned_ > kMaxQmpMessage) throw std::length_error("message too long");
  return std::nullopt;
}

}  // namespace mig::control
