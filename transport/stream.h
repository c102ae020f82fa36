// A connected, blocking byte stream carrying protocol frames. Page data is gathered straight
// from guest memory on send and scattered straight into it on receive.
#pragma once

#include <sys/uio.h>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common/fd.h"
#include "../transport/protocol.h"
#include "../transport/rate_limit.h"
#include "../transport/tls.h"

namespace mig::transport {

// Where the page parts of a frame point. Only guest memory may go zero-copy: it lives as
// long as the VM, and a page the guest rewrites after the send is dirty and goes again
// (the engine takes what crossed as uncertain: engine/page_hashes.h).
// Scratch buffers (compressed batches, deltas, cached page versions) are reused by the next
// batch, so the kernel must copy them before send_gathered returns.
enum class PageMemory { guest, scratch };

// The peer went away or stopped answering; distinct from a malformed stream.
struct PeerError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// A wait was cut short because the stream's interrupt predicate said so (a cancel).
struct Interrupted : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// The peer reported an error of its own (an Error message).
struct RemoteError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct StreamCounters {
  std::uint64_t bytes_sent = 0;
  std::uint64_t bytes_received = 0;
  std::uint64_t zerocopy_sends = 0;
  std::uint64_t zerocopy_copied = 0;  // sends the kernel completed by copying (loopback does)
};

class Stream {
 public:
  explicit Stream(UniqueFd fd);
  int fd() const { return fd_.get(); }
  // From here on, every byte goes through `tls` (the handshake on this socket is done).
  void secure(std::unique_ptr<TlsSession> tls);
  StreamSecurity security() const { return tls_ ? tls_->security() : StreamSecurity::plaintext; }

  // Every blocking read and write gives up after `timeout` of silence with a PeerError, so a
  // vanished peer can never hang a paused source. The silence is counted from the last byte
  // that moved, within kSilenceSlice, and a TCP link that stops acknowledging what was sent
  // fails after `timeout` as well. Zero waits for ever. Trickling bytes does not keep a read
  // alive: each `timeout` of it must bring kMinFrameRate's worth of bytes (or all it still
  // wants, if less).
  void set_timeout(std::chrono::milliseconds timeout);
  // Turns on MSG_ZEROCOPY for page data. Returns false when the socket cannot do it. With
  // `unless_copied`, it turns itself off again at the first send the kernel reports it
  // completed by copying (loopback, a veth into a local namespace, a NIC without
  // scatter-gather): there the completions cost more than the copy they did not save.
  // Under TLS encrypted in user space there is nothing to send zero-copy: false.
  enum class ZeroCopy { always, unless_copied };
  bool enable_zerocopy(ZeroCopy mode);
  bool zerocopy() const { return zerocopy_; }
  // Limits page data (send_gathered with pages) to `bytes_per_second`; 0 lifts the limit. A
  // new rate keeps the tokens already earned.
  void set_rate_limit(double bytes_per_second);
  // Asked while waiting for the rate limit: when it says true, the wait ends with Interrupted
  // instead of sleeping on. Empty: never.
  void set_interrupt(std::function<bool()> interrupted) { interrupted_ = std::move(interrupted); }

  template <typename T>
  void send(const T& message) {
    send_frame(wire::type_of<T>(), wire::encode(message));
  }
  void send_frame(wire::MessageType type, std::span<const std::byte> payload);
  // One frame whose payload is `head` followed by the bytes of `pages`. With zero-copy on and
  // pages in guest memory, those bytes leave without a copy.
  void send_gathered(wire::MessageType type, std::span<const std::byte> head, std::span<const iovec> pages,
                     PageMemory memory);

  static constexpr double kMinFrameRate = 16 * 1024;  // bytes per second
  static constexpr std::chrono::milliseconds kSilenceSlice{100};

  // The next frame's header, validated. An Error frame is turned into RemoteError here.
  wire::FrameHeader read_header();
  template <typename T>
  T receive() {
    const auto header = read_header();
    if (header.type != static_cast<std::uint16_t>(wire::type_of<T>()))
      throw wire::ProtocolError(std::string("expected ") + wire::to_string(wire::type_of<T>()) + ", got " +
                                wire::to_string(static_cast<wire::MessageType>(header.type)));
    return wire::decode<T>(read_payload(header));
  }
  std::vector<std::byte> read_payload(const wire::FrameHeader& header);
  void read_exact(std::span<std::byte> out);
  // Fills every iovec in order; modifies the array while advancing through it.
  void read_scatter(std::span<iovec> parts);

  // File descriptors travel only over UNIX sockets, as SCM_RIGHTS on one marker byte that
  // follows the frame announcing them.
  bool can_pass_fds() const;
  void send_fds(std::span<const int> fds);
  std::vector<UniqueFd> receive_fds(std::size_t count);

  const StreamCounters& counters() const { return counters_; }

 private:
  void write_all(std::span<iovec> parts, int flags);
  void write_encrypted(std::span<const iovec> parts);
  void read_decrypted(std::span<iovec> parts);
  // Throws PeerError when nothing has moved since `last_progress` for the timeout.
  void check_silence(std::chrono::steady_clock::time_point last_progress, const char* what) const;
  void write_paced(std::span<iovec> parts);
  void reap_zerocopy_completions();

  UniqueFd fd_;
  std::unique_ptr<TlsSession> tls_;  // after fd_: it says goodbye on the socket before it closes
  std::vector<std::byte> tls_buffer_;  // gathered parts, coalesced for SSL_write
  std::chrono::milliseconds timeout_{0};  // 0: none, as for SO_RCVTIMEO
  bool zerocopy_ = false;
  // ZeroCopy::unless_copied until the first completion says whether the kernel copies.
  bool zerocopy_probing_ = false;
  std::uint64_t zerocopy_outstanding_ = 0;
  std::optional<TokenBucket> rate_limit_;
  std::function<bool()> interrupted_;
  StreamCounters counters_;
};

// This host's boot id: equal ids mean CLOCK_MONOTONIC readings are comparable.
std::string host_boot_id();

}  // namespace mig::transport
