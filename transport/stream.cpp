#include "transport/stream.h"

#include <linux/errqueue.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <fstream>

namespace mig::transport {

namespace {

[[noreturn]] void throw_peer_errno(const char* what) {
  const int err = errno;
  if (err == EAGAIN || err == EWOULDBLOCK) throw PeerError(std::string(what) + ": the peer stopped responding (timed out)");
  if (err == EPIPE || err == ECONNRESET) throw PeerError(std::string(what) + ": the peer closed the connection");
  throw_errno(what, err);
}

// Moves `index` (and the part it points into) past `bytes` transferred bytes, and past any
// empty parts after them.
void consume(std::span<iovec> parts, std::size_t& index, std::size_t bytes) {
  while (index < parts.size() && bytes >= parts[index].iov_len) {
    bytes -= parts[index].iov_len;
    ++index;
  }
  if (bytes > 0) {
    parts[index].iov_base = static_cast<std::byte*>(parts[index].iov_base) + bytes;
    parts[index].iov_len -= bytes;
  }
  while (index < parts.size() && parts[index].iov_len == 0) ++index;
}

timeval to_timeval(std::chrono::milliseconds t) {
  return {static_cast<time_t>(t.count() / 1000), static_cast<suseconds_t>((t.count() % 1000) * 1000)};
}

// The watchdog over one read of `wanted` bytes. It fails a peer that sends nothing for the
// timeout, and one that trickles: each timeout-long window must bring kMinFrameRate's worth
// of bytes, or what the read still wanted when the window began, if less.
class ReceiveWatch {
 public:
  using Clock = std::chrono::steady_clock;
  ReceiveWatch(std::chrono::milliseconds timeout, std::size_t wanted)
      : timeout_(timeout), window_start_(Clock::now()), last_arrival_(window_start_), window_need_(need(wanted)), left_(wanted) {}

  void arrived(std::size_t bytes) {
    last_arrival_ = Clock::now();
    window_bytes_ += bytes;
    left_ -= std::min(left_, bytes);
  }
  // Throws PeerError after the timeout's silence, or once a window has ended short of what it
  // needed; otherwise starts the next window when this one is over.
  void check() {
    if (timeout_.count() <= 0) return;
    const auto now = Clock::now();
    if (now - last_arrival_ >= timeout_) throw PeerError("receive: the peer stopped responding (timed out)");
    if (now - window_start_ < timeout_) return;
    if (window_bytes_ < window_need_)
      throw PeerError("receive: the peer is sending too slowly (under " +
                      std::to_string(static_cast<int>(Stream::kMinFrameRate / 1024)) + " KiB/s)");
    window_start_ = now;
    window_bytes_ = 0;
    window_need_ = need(left_);
  }
  // How long a wait may block before check() would fail the read: to the end of a window
  // still short of bytes, else to the end of the silence allowed.
  std::chrono::milliseconds wait_limit() const {
    if (timeout_.count() <= 0) return timeout_;
    const auto until = (window_bytes_ < window_need_ ? window_start_ : last_arrival_) + timeout_;
    return std::max(std::chrono::milliseconds(1), std::chrono::ceil<std::chrono::milliseconds>(until - Clock::now()));
  }

 private:
  std::size_t need(std::size_t left) const {
    const double per_window = Stream::kMinFrameRate * std::chrono::duration<double>(timeout_).count();
    return std::min(left, static_cast<std::size_t>(per_window));
  }
  std::chrono::milliseconds timeout_;
  Clock::time_point window_start_, last_arrival_;
  std::size_t window_bytes_ = 0, window_need_ = 0, left_ = 0;
};

std::size_t total_length(std::span<const iovec> parts) {
  std::size_t total = 0;
  for (const auto& part : parts) total += part.iov_len;
  return total;
}

}  // namespace

Stream::Stream(UniqueFd fd) : fd_(std::move(fd)) {
  const int one = 1;
  // Frames are written whole, with MSG_MORE between parts; Nagle would only delay control
  // messages on the downtime path.
  ::setsockopt(fd_.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

void Stream::secure(std::unique_ptr<TlsSession> tls) {
  tls_ = std::move(tls);
  zerocopy_ = zerocopy_probing_ = false;
}

void Stream::set_timeout(std::chrono::milliseconds timeout) {
  timeout_ = timeout;
  // A blocking call that times out says nothing of when its last byte moved: one that moved a
  // byte at once and then waited out the whole timeout would leave a silent peer up to twice
  // the timeout. So each call waits a short slice, and the silence is counted here, from the
  // last byte that moved (check_silence).
  const timeval tv = to_timeval(timeout.count() > 0 ? std::min(timeout, kSilenceSlice) : timeout);
  check_syscall("setsockopt SO_RCVTIMEO", [&] { return ::setsockopt(fd_.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv); });
  check_syscall("setsockopt SO_SNDTIMEO", [&] { return ::setsockopt(fd_.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv); });
  // A link that went down leaves what was sent unacknowledged: TCP itself gives up after the
  // same timeout, even while the send buffer still has room. (Not a TCP socket: nothing to set.)
  const unsigned user_timeout = static_cast<unsigned>(timeout.count());
  ::setsockopt(fd_.get(), IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout, sizeof user_timeout);
}

void Stream::check_silence(std::chrono::steady_clock::time_point last_progress, const char* what) const {
  if (timeout_.count() > 0 && std::chrono::steady_clock::now() - last_progress >= timeout_)
    throw PeerError(std::string(what) + ": the peer stopped responding (timed out)");
}

bool Stream::enable_zerocopy(ZeroCopy mode) {
  if (tls_ && !tls_->kernel_sends()) return false;
  const int one = 1;
  zerocopy_ = ::setsockopt(fd_.get(), SOL_SOCKET, SO_ZEROCOPY, &one, sizeof one) == 0;
  zerocopy_probing_ = zerocopy_ && mode == ZeroCopy::unless_copied;
  return zerocopy_;
}

void Stream::set_rate_limit(double bytes_per_second) {
  if (!(bytes_per_second > 0))
    rate_limit_.reset();
  else if (!rate_limit_ || rate_limit_->rate() != bytes_per_second)
    rate_limit_.emplace(bytes_per_second);
}

void Stream::write_all(std::span<iovec> parts, int flags) {
  if (tls_ && !tls_->kernel_sends()) return write_encrypted(parts);
  std::size_t index = 0;
  auto last_progress = std::chrono::steady_clock::now();
  while (index < parts.size()) {
    msghdr msg{};
    msg.msg_iov = parts.data() + index;
    msg.msg_iovlen = std::min<std::size_t>(parts.size() - index, IOV_MAX);
    const ssize_t n = ::sendmsg(fd_.get(), &msg, flags | MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      // A TLS socket is non-blocking (tls.h): kTLS sends wait here for room instead.
      if (tls_ && errno == EAGAIN) {
        if (wait_for_fd(fd_.get(), POLLOUT, timeout_)) continue;
        errno = EAGAIN;
      } else if (errno == EAGAIN) {  // a slice without room in the send buffer
        check_silence(last_progress, "send");
        continue;
      }
      if (errno == ENOBUFS && (flags & MSG_ZEROCOPY)) {  // out of option memory: reap, retry
        reap_zerocopy_completions();
        flags &= ~MSG_ZEROCOPY;
        continue;
      }
      throw_peer_errno("send");
    }
    if (flags & MSG_ZEROCOPY) {
      ++zerocopy_outstanding_;
      ++counters_.zerocopy_sends;
    }
    counters_.bytes_sent += static_cast<std::uint64_t>(n);
    consume(parts, index, static_cast<std::size_t>(n));
    last_progress = std::chrono::steady_clock::now();
  }
  // While probing, look after every send: a copying path is then left after a send or two
  // rather than after 64.
  if (zerocopy_outstanding_ >= 64 || (zerocopy_probing_ && zerocopy_outstanding_ > 0)) reap_zerocopy_completions();
}

// OpenSSL encrypts one buffer at a time: the parts are coalesced into writes of up to 256 KiB,
// which keeps the records full (16 KiB) and the calls few.
void Stream::write_encrypted(std::span<const iovec> parts) {
  constexpr std::size_t kCoalesceBytes = 256 * 1024;
  tls_buffer_.reserve(kCoalesceBytes);
  const auto flush = [&] {
    tls_->write_all(tls_buffer_.data(), tls_buffer_.size(), timeout_);
    counters_.bytes_sent += tls_buffer_.size();
    tls_buffer_.clear();
  };
  for (const auto& part : parts) {
    const auto* bytes = static_cast<const std::byte*>(part.iov_base);
    for (std::size_t done = 0; done < part.iov_len;) {
      const std::size_t n = std::min(part.iov_len - done, kCoalesceBytes - tls_buffer_.size());
      tls_buffer_.insert(tls_buffer_.end(), bytes + done, bytes + done + n);
      done += n;
      if (tls_buffer_.size() == kCoalesceBytes) flush();
    }
  }
  if (!tls_buffer_.empty()) flush();
}

void Stream::read_decrypted(std::span<iovec> parts) {
  // A TLS wait that runs out throws by itself: it is given only the rest of the window.
  ReceiveWatch watch(timeout_, total_length(parts));
  for (auto& part : parts) {
    auto* out = static_cast<std::byte*>(part.iov_base);
    for (std::size_t done = 0; done < part.iov_len;) {
      const std::size_t n = tls_->read_some(out + done, part.iov_len - done, watch.wait_limit());
      done += n;
      counters_.bytes_received += n;
      watch.arrived(n);
      watch.check();
    }
  }
}

// Zero-copy completions arrive on the socket's error queue. Guest memory outlives the
// migration, so nothing waits for them; they are read only to release the kernel's
// accounting and to learn whether the kernel copied after all.
void Stream::reap_zerocopy_completions() {
  for (;;) {
    char control[128];
    msghdr msg{};
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    if (::recvmsg(fd_.get(), &msg, MSG_ERRQUEUE | MSG_DONTWAIT) < 0) return;
    for (cmsghdr* cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
      const auto* err = reinterpret_cast<const sock_extended_err*>(CMSG_DATA(cm));
      if (err->ee_origin != SO_EE_ORIGIN_ZEROCOPY) continue;
      const std::uint64_t completed = std::uint64_t{err->ee_data} - err->ee_info + 1;
      zerocopy_outstanding_ -= std::min(zerocopy_outstanding_, completed);
      const bool copied = err->ee_code & SO_EE_CODE_ZEROCOPY_COPIED;
      if (copied) counters_.zerocopy_copied += completed;
      if (zerocopy_probing_ && copied) zerocopy_ = false;
      zerocopy_probing_ = false;
    }
  }
}

void Stream::send_frame(wire::MessageType type, std::span<const std::byte> payload) {
  send_gathered(type, payload, {}, PageMemory::scratch);
}

void Stream::send_gathered(wire::MessageType type, std::span<const std::byte> head, std::span<const iovec> pages,
                           PageMemory memory) {
  wire::FrameHeader header;
  header.type = static_cast<std::uint16_t>(type);
  header.length = head.size();
  for (const auto& page : pages) header.length += page.iov_len;
  std::vector<iovec> parts;
  parts.reserve(2 + pages.size());
  parts.push_back({&header, sizeof header});
  if (!head.empty()) parts.push_back({const_cast<std::byte*>(head.data()), head.size()});
  if (rate_limit_ && !pages.empty()) {
    parts.insert(parts.end(), pages.begin(), pages.end());
    return write_paced(parts);
  }
  if (!zerocopy_ || pages.empty() || memory != PageMemory::guest) {
    parts.insert(parts.end(), pages.begin(), pages.end());
    write_all(parts, 0);
    return;
  }
  // Header and descriptors are copied (they are small and short-lived); only the pages go
  // zero-copy.
  write_all(parts, MSG_MORE);
  std::vector<iovec> page_parts(pages.begin(), pages.end());
  write_all(page_parts, MSG_ZEROCOPY);
}

// Page data under a bandwidth limit goes in slices, each once its tokens are there: a slow
// limit shows as a steady trickle the peer sees progress in, never as one long silence
// before a whole batch, and a cancel waits for one slice at most. Slices are copied, never
// sent zero-copy: the frame header lives on the caller's stack.
void Stream::write_paced(std::span<iovec> parts) {
  constexpr std::size_t kSliceBytes = 64 * 1024;
  std::vector<iovec> slice;
  for (std::size_t index = 0; index < parts.size();) {
    slice.clear();
    std::size_t bytes = 0;
    for (std::size_t i = index; i < parts.size() && bytes < kSliceBytes; ++i) {
      slice.push_back({parts[i].iov_base, std::min(parts[i].iov_len, kSliceBytes - bytes)});
      bytes += slice.back().iov_len;
    }
    if (!rate_limit_->take(bytes, interrupted_)) {
      // Half a frame has gone: nothing that follows could be read as a frame any more.
      if (index > 0) ::shutdown(fd_.get(), SHUT_WR);
      throw Interrupted("interrupted while waiting for the bandwidth limit");
    }
    write_all(slice, 0);
    consume(parts, index, bytes);
  }
}

void Stream::read_exact(std::span<std::byte> out) {
  iovec part{out.data(), out.size()};
  read_scatter({&part, 1});
}

void Stream::read_scatter(std::span<iovec> parts) {
  if (tls_) return read_decrypted(parts);
  std::size_t index = 0;
  while (index < parts.size() && parts[index].iov_len == 0) ++index;
  // Each call waits a slice at most (set_timeout), so the watch looks often enough.
  ReceiveWatch watch(timeout_, total_length(parts.subspan(index)));
  while (index < parts.size()) {
    msghdr msg{};
    msg.msg_iov = parts.data() + index;
    msg.msg_iovlen = std::min<std::size_t>(parts.size() - index, IOV_MAX);
    const ssize_t n = ::recvmsg(fd_.get(), &msg, MSG_WAITALL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) throw_peer_errno("receive");
    if (n == 0) throw PeerError("the peer closed the connection mid-stream");
    if (n > 0) {
      counters_.bytes_received += static_cast<std::uint64_t>(n);
      consume(parts, index, static_cast<std::size_t>(n));
      watch.arrived(static_cast<std::size_t>(n));
    }
    if (index < parts.size()) watch.check();
  }
}

wire::FrameHeader Stream::read_header() {
  wire::FrameHeader header;
  read_exact(std::as_writable_bytes(std::span(&header, 1)));
  wire::validate(header);
  if (header.type == static_cast<std::uint16_t>(wire::MessageType::error))
    throw RemoteError("peer reported: " + wire::decode<wire::Error>(read_payload(header)).message);
  return header;
}

std::vector<std::byte> Stream::read_payload(const wire::FrameHeader& header) {
  std::vector<std::byte> payload(header.length);
  read_exact(payload);
  return payload;
}

bool Stream::can_pass_fds() const {
  int domain = 0;
  socklen_t len = sizeof domain;
  return ::getsockopt(fd_.get(), SOL_SOCKET, SO_DOMAIN, &domain, &len) == 0 && domain == AF_UNIX;
}

void Stream::send_fds(std::span<const int> fds) {
  std::byte marker{0};
  iovec part{&marker, 1};
  std::vector<char> control(CMSG_SPACE(fds.size_bytes()));
  msghdr msg{};
  msg.msg_iov = &part;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  cmsghdr* cm = CMSG_FIRSTHDR(&msg);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(fds.size_bytes());
  std::memcpy(CMSG_DATA(cm), fds.data(), fds.size_bytes());
  if (check_syscall("sendmsg(SCM_RIGHTS)", [&] { return ::sendmsg(fd_.get(), &msg, MSG_NOSIGNAL); }) != 1)
    throw PeerError("could not send the file descriptors");
}

std::vector<UniqueFd> Stream::receive_fds(std::size_t count) {
  std::byte marker{};
  iovec part{&marker, 1};
  std::vector<char> control(CMSG_SPACE(count * sizeof(int)));
  msghdr msg{};
  msg.msg_iov = &part;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  const ssize_t n = check_syscall("recvmsg(SCM_RIGHTS)", [&] { return ::recvmsg(fd_.get(), &msg, MSG_CMSG_CLOEXEC); });
  if (n == 0) throw PeerError("the peer closed the connection before passing its file descriptors");
  std::vector<UniqueFd> fds;
  for (cmsghdr* cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
    if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
    const std::size_t got = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < got; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
      fds.emplace_back(fd);  // owned from here, so a surplus is closed, never leaked
    }
  }
  if ((msg.msg_flags & MSG_CTRUNC) || fds.size() != count)
    throw wire::ProtocolError("expected " + std::to_string(count) + " file descriptors, got " + std::to_string(fds.size()));
  return fds;
}

std::string host_boot_id() {
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::string id;
  std::getline(in, id);
  return id;
}

}  // namespace mig::transport
