#include "transport/endpoint.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <boost/asio.hpp>
#include <algorithm>
#include <cstring>

namespace mig::transport {

Endpoint Endpoint::parse(const std::string& text) {
  const std::string usage = "endpoint '" + text + "' is not of the form tcp:HOST:PORT or unix:PATH";
  if (text.rfind("unix:", 0) == 0 && text.size() > 5) {
    Endpoint e;
    e.unix_path = text.substr(5);
    return e;
  }
  if (text.rfind("tcp:", 0) != 0) throw std::invalid_argument(usage);
  const auto colon = text.rfind(':');
  if (colon <= 4) throw std::invalid_argument(usage);
  Endpoint e;
  e.host = text.substr(4, colon - 4);
  const std::string port = text.substr(colon + 1);
  if (port.empty() || port.size() > 5 || port.find_first_not_of("0123456789") != std::string::npos || std::stoul(port) > 65535)
    throw std::invalid_argument(usage);
  e.port = static_cast<std::uint16_t>(std::stoul(port));
  return e;
}

std::string Endpoint::to_string() const {
  return unix_path.empty() ? "tcp:" + host + ":" + std::to_string(port) : "unix:" + unix_path;
}

namespace {

// Hands the connected socket over to a plain fd; Asio's object closes only its own copy.
template <typename Socket>
UniqueFd take_fd(Socket& socket) {
  return UniqueFd(check_syscall("dup socket", [&] { return ::fcntl(socket.native_handle(), F_DUPFD_CLOEXEC, 0); }));
}

sockaddr_un unix_address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) throw std::invalid_argument("unix socket path is too long: " + path);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  return addr;
}

// A socket file nobody accepts on is left over from a process that is gone.
bool someone_listens(const sockaddr_un& addr) {
  UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  return probe.valid() && ::connect(probe.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0;
}

std::string peer_name(const sockaddr_storage& peer) {
  char host[INET6_ADDRSTRLEN] = "?";
  if (peer.ss_family == AF_INET) {
    const auto& in = reinterpret_cast<const sockaddr_in&>(peer);
    ::inet_ntop(AF_INET, &in.sin_addr, host, sizeof host);
    return std::string(host) + ":" + std::to_string(ntohs(in.sin_port));
  }
  if (peer.ss_family == AF_INET6) {
    const auto& in6 = reinterpret_cast<const sockaddr_in6&>(peer);
    ::inet_ntop(AF_INET6, &in6.sin6_addr, host, sizeof host);
    return "[" + std::string(host) + "]:" + std::to_string(ntohs(in6.sin6_port));
  }
  return "a local process";
}

}  // namespace

UniqueFd listen_unix(const std::string& path, int backlog) {
  const sockaddr_un addr = unix_address(path);
  if (someone_listens(addr)) throw std::runtime_error("cannot listen on unix:" + path + ": another process is listening there");
  ::unlink(path.c_str());
  UniqueFd fd(check_syscall("socket(AF_UNIX)", [] { return ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0); }));
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0)
    throw std::runtime_error("cannot listen on unix:" + path + ": " + std::strerror(errno));
  // Before listen(): until then nobody can connect, so the mode holds from the first peer on.
  check_syscall("chmod socket", [&] { return ::chmod(path.c_str(), 0600); });
  check_syscall("listen", [&] { return ::listen(fd.get(), backlog); });
  return fd;
}

void check_peer_credentials(int fd) {
  ucred peer{};
  socklen_t len = sizeof peer;
  check_syscall("getsockopt(SO_PEERCRED)", [&] { return ::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &len); });
  if (peer.uid != ::geteuid() && peer.uid != 0)
    throw PeerError("refused a unix-socket peer running as uid " + std::to_string(peer.uid) + " (pid " + std::to_string(peer.pid) +
                    "): only this user or root may migrate through it");
}

Stream connect(const Endpoint& endpoint, const TlsContext* tls) {
  boost::asio::io_context io;
  if (!endpoint.unix_path.empty()) {
    boost::asio::local::stream_protocol::socket socket(io);
    boost::system::error_code ec;
    socket.connect(boost::asio::local::stream_protocol::endpoint(endpoint.unix_path), ec);
    if (ec) throw PeerError("cannot connect to " + endpoint.to_string() + ": " + ec.message());
    Stream stream(take_fd(socket));
    check_peer_credentials(stream.fd());
    return stream;
  }
  boost::asio::ip::tcp::resolver resolver(io);
  boost::asio::ip::tcp::socket socket(io);
  boost::system::error_code ec;
  auto results = resolver.resolve(endpoint.host, std::to_string(endpoint.port), ec);
  if (!ec) boost::asio::connect(socket, results, ec);
  if (ec) throw PeerError("cannot connect to " + endpoint.to_string() + ": " + ec.message());
  Stream stream(take_fd(socket));
  if (tls) {
    try {
      stream.secure(tls->handshake(stream.fd(), endpoint.host, kHandshakeTimeout));
    } catch (const PeerError& e) {
      throw PeerError(endpoint.to_string() + ": " + e.what());
    }
  }
  return stream;
}

struct Listener::Impl {
  Endpoint endpoint;
  AcceptPolicy policy;
  UniqueFd fd;
  UniqueFd wake = UniqueFd(check_syscall("eventfd", [] { return ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); }));
  std::uint16_t port = 0;
  ~Impl() {
    if (!endpoint.unix_path.empty() && fd.valid()) ::unlink(endpoint.unix_path.c_str());
  }
};

Listener::Listener(const Endpoint& endpoint, AcceptPolicy policy) : impl_(std::make_unique<Impl>()) {
  impl_->endpoint = endpoint;
  impl_->policy = std::move(policy);
  if (!endpoint.unix_path.empty()) {
    impl_->fd = listen_unix(endpoint.unix_path, 16);
    return;
  }
  boost::asio::io_context io;
  boost::asio::ip::tcp::resolver resolver(io);
  boost::asio::ip::tcp::acceptor acceptor(io);
  boost::system::error_code ec;
  auto results = resolver.resolve(endpoint.host, std::to_string(endpoint.port), ec);
  if (ec || results.empty()) throw std::runtime_error("cannot resolve " + endpoint.to_string() + ": " + ec.message());
  const auto ep = results.begin()->endpoint();
  acceptor.open(ep.protocol(), ec);
  if (!ec) acceptor.set_option(boost::asio::socket_base::reuse_address(true), ec);
  if (!ec) acceptor.bind(ep, ec);
  if (!ec) acceptor.listen(16, ec);
  if (ec) throw std::runtime_error("cannot listen on " + endpoint.to_string() + ": " + ec.message());
  impl_->port = acceptor.local_endpoint().port();
  impl_->fd = take_fd(acceptor);
}
Listener::~Listener() = default;
Listener::Listener(Listener&&) noexcept = default;

std::uint16_t Listener::port() const { return impl_->port; }

std::string Listener::endpoint() const {
  if (!impl_->endpoint.unix_path.empty()) return impl_->endpoint.to_string();
  return "tcp:" + impl_->endpoint.host + ":" + std::to_string(port());
}

Stream Listener::accept(std::optional<std::chrono::milliseconds> timeout) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = timeout ? Clock::now() + *timeout : Clock::time_point::max();
  for (;;) {
    pollfd fds[2] = {{impl_->fd.get(), POLLIN, 0}, {impl_->wake.get(), POLLIN, 0}};
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
    const int ms = timeout ? static_cast<int>(std::clamp<std::int64_t>(left.count(), 0, INT32_MAX)) : -1;
    const int ready = check_syscall("poll", [&] { return ::poll(fds, 2, ms); });
    if (fds[1].revents) throw Interrupted("stopped waiting for a connection on " + endpoint());
    if (ready == 0)
      throw PeerError("nobody connected to " + endpoint() + " within " + std::to_string(timeout ? timeout->count() : 0) + " ms");
    sockaddr_storage peer{};
    socklen_t peer_len = sizeof peer;
    Stream stream(UniqueFd(check_syscall(
        "accept", [&] { return ::accept4(impl_->fd.get(), reinterpret_cast<sockaddr*>(&peer), &peer_len, SOCK_CLOEXEC); })));
    try {
      vet(stream);
      return stream;
    } catch (const PeerError& e) {
      if (impl_->policy.refused) impl_->policy.refused("refused a connection from " + peer_name(peer) + ": " + e.what());
    }
  }
}

// Before a connection counts as accepted: a unix: peer must be this user (or root); a tcp:
// one must complete the TLS handshake the policy asks for.
void Listener::vet(Stream& stream) const {
  if (!impl_->endpoint.unix_path.empty()) return check_peer_credentials(stream.fd());
  if (impl_->policy.tls) stream.secure(impl_->policy.tls->handshake(stream.fd(), "", impl_->policy.handshake_timeout));
}

void Listener::interrupt() {
  const std::uint64_t one = 1;
  [[maybe_unused]] auto n = ::write(impl_->wake.get(), &one, sizeof one);
}

}  // namespace mig::transport
