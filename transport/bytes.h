// Little-endian encoding into a byte vector, and bounds-checked decoding from a span. Every
// read names what it was reading, so a short or corrupt input gives a useful one-line error.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace mig::wire {

static_assert(std::endian::native == std::endian::little, "the wire format is little-endian; so is every host mig targets");

// Anything wrong with bytes that came from a peer.
struct ProtocolError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class ByteWriter {
 public:
  template <typename T>
    requires std::is_trivially_copyable_v<T>
  void put(const T& value) {
    const auto* p = reinterpret_cast<const std::byte*>(&value);
    bytes_.insert(bytes_.end(), p, p + sizeof(T));
  }
  void put_bytes(std::span<const std::byte> data) {
    put(static_cast<std::uint64_t>(data.size()));
    bytes_.insert(bytes_.end(), data.begin(), data.end());
  }
  void put_string(const std::string& s) { put_bytes(std::as_bytes(std::span(s.data(), s.size()))); }
  template <typename T>
    requires std::is_trivially_copyable_v<T>
  void put_vector(const std::vector<T>& v) {
    put_bytes(std::as_bytes(std::span(v)));
  }
  std::vector<std::byte> take() { return std::move(bytes_); }
  std::size_t size() const { return bytes_.size(); }

 private:
  std::vector<std::byte> bytes_;
};

class ByteReader {
 public:
  explicit ByteReader(std::span<const std::byte> bytes) : bytes_(bytes) {}

  template <typename T>
    requires std::is_trivially_copyable_v<T>
  T get(const char* what) {
    T value;
    std::memcpy(&value, take(sizeof(T), what).data(), sizeof(T));
    return value;
  }
  // A length-prefixed byte string of at most `max` bytes.
  std::span<const std::byte> get_bytes(std::size_t max, const char* what) {
    const auto size = get<std::uint64_t>(what);
    if (size > max)
      throw ProtocolError(std::string(what) + " is " + std::to_string(size) + " bytes, more than the limit of " +
                          std::to_string(max));
    return take(static_cast<std::size_t>(size), what);
  }
  std::string get_string(std::size_t max, const char* what) {
    auto b = get_bytes(max, what);
    return {reinterpret_cast<const char*>(b.data()), b.size()};
  }
  template <typename T>
    requires std::is_trivially_copyable_v<T>
  std::vector<T> get_vector(std::size_t max_elements, const char* what) {
    auto b = get_bytes(max_elements * sizeof(T), what);
    if (b.size() % sizeof(T)) throw ProtocolError(std::string(what) + " has a partial element");
    std::vector<T> v(b.size() / sizeof(T));
    if (!v.empty()) std::memcpy(v.data(), b.data(), b.size());  // memcpy wants non-null even for 0 bytes
    return v;
  }
  std::size_t remaining() const { return bytes_.size() - offset_; }
  // Decoders call this last: trailing bytes mean the peer and we disagree about the format.
  void expect_end(const char* what) const {
    if (remaining() != 0) throw ProtocolError(std::string(what) + " has " + std::to_string(remaining()) + " unexpected trailing bytes");
  }

 private:
  std::span<const std::byte> take(std::size_t size, const char* what) {
    if (size > remaining())
      throw ProtocolError(std::string(what) + " is truncated: needs " + std::to_string(size) + " bytes, " +
                          std::to_string(remaining()) + " left");
    auto out = bytes_.subspan(offset_, size);
    offset_ += size;
    return out;
  }
  std::span<const std::byte> bytes_;
  std::size_t offset_ = 0;
};

// The bytes of one fixed-size value, and back: exactly sizeof(T) bytes, nothing trailing.
template <typename T>
  requires std::is_trivially_copyable_v<T>
std::vector<std::byte> encode_value(const T& value) {
  ByteWriter w;
  w.put(value);
  return w.take();
}
template <typename T>
  requires std::is_trivially_copyable_v<T>
T decode_value(std::span<const std::byte> bytes, const char* what) {
  ByteReader r(bytes);
  T value = r.get<T>(what);
  r.expect_end(what);
  return value;
}

}  // namespace mig::wire
