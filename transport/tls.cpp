#include "transport/tls.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <sstream>

#include "transport/stream.h"

namespace mig::transport {

namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

// The reason at the head of OpenSSL's error queue, which is then emptied so that the next
// call on this thread starts clean.
std::string openssl_reason() {
  std::string reason;
  while (const unsigned long code = ERR_get_error()) {
    if (!reason.empty()) continue;
    const char* text = ERR_reason_error_string(code);
    reason = text ? text : "error " + std::to_string(code);
  }
  return reason.empty() ? "unknown error" : reason;
}

// OpenSSL writes to the socket with write(2), which raises SIGPIPE on a connection the peer
// reset. A library may not change the process's handling of it, so unless the process
// ignores SIGPIPE already (mig's tools do), the signal is blocked in this thread for the
// call and a pending one is taken before unblocking. That costs four system calls, which is
// why it is skipped where it is not needed.
bool sigpipe_ignored() {
  struct sigaction current {};
  return ::sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_IGN;
}

class SigpipeBlocked {
 public:
  explicit SigpipeBlocked(bool needed) : needed_(needed) {
    if (!needed_) return;
    sigset_t pipe;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    sigpending(&pending_before_);
    pthread_sigmask(SIG_BLOCK, &pipe, &old_);
  }
  ~SigpipeBlocked() {
    if (!needed_) return;
    sigset_t pending;
    sigpending(&pending);
    if (sigismember(&pending, SIGPIPE) && !sigismember(&pending_before_, SIGPIPE)) {
      sigset_t pipe;
      sigemptyset(&pipe);
      sigaddset(&pipe, SIGPIPE);
      const timespec now{0, 0};
      while (sigtimedwait(&pipe, nullptr, &now) < 0 && errno == EINTR) {
      }
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  SigpipeBlocked(const SigpipeBlocked&) = delete;
  SigpipeBlocked& operator=(const SigpipeBlocked&) = delete;

 private:
  bool needed_;
  sigset_t old_, pending_before_;
};

// Waits for the socket to be ready as OpenSSL asked; false when `timeout` passed first.
bool wait_for_socket(int fd, int ssl_error, milliseconds timeout) {
  return wait_for_fd(fd, ssl_error == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN, timeout);
}

std::string read_text_file(const std::string& path, const char* option) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(std::string(option) + ": cannot read " + path + ": " + std::strerror(errno));
  // Read no more than the bound: the path may be a device that never ends.
  constexpr std::size_t kMaxBytes = 1u << 20;
  std::string text(kMaxBytes + 1, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<std::size_t>(in.gcount()));
  if (text.size() > kMaxBytes) throw std::runtime_error(std::string(option) + ": " + path + " is larger than 1 MiB");
  return text;
}

std::vector<unsigned char> decode_hex(const std::string& hex) {
  if (hex.size() % 2) throw std::invalid_argument("odd number of hex digits");
  std::vector<unsigned char> out;
  for (std::size_t i = 0; i < hex.size(); i += 2) {
    const auto digit = [](char c) -> int {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'a' && c <= 'f') return c - 'a' + 10;
      if (c >= 'A' && c <= 'F') return c - 'A' + 10;
      throw std::invalid_argument("not a hex digit");
    };
    out.push_back(static_cast<unsigned char>(digit(hex[i]) * 16 + digit(hex[i + 1])));
  }
  return out;
}

std::string subject_rfc2253(X509* cert) {
  BIO* out = BIO_new(BIO_s_mem());
  X509_NAME_print_ex(out, X509_get_subject_name(cert), 0, XN_FLAG_RFC2253);
  char* data = nullptr;
  const long size = BIO_get_mem_data(out, &data);
  std::string subject(data, static_cast<std::size_t>(std::max(0L, size)));
  BIO_free(out);
  return subject;
}

const TlsContext& context_of(SSL* ssl) { return *static_cast<const TlsContext*>(SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl))); }

}  // namespace

const char* to_string(StreamSecurity security) {
  switch (security) {
    case StreamSecurity::plaintext: return "plaintext";
    case StreamSecurity::tls_user_space: return "tls";
    case StreamSecurity::tls_kernel: return "ktls";
  }
  return "unknown";
}

TlsSession::TlsSession(SSL* ssl, int fd) : ssl_(ssl), fd_(fd), guard_sigpipe_(!sigpipe_ignored()) {
  kernel_sends_ = BIO_get_ktls_send(SSL_get_wbio(ssl_)) != 0;
  kernel_receives_ = BIO_get_ktls_recv(SSL_get_rbio(ssl_)) != 0;
}

TlsSession::~TlsSession() {
  {
    // A close_notify where the socket takes it at once; a broken one is not waited for.
    SigpipeBlocked blocked(guard_sigpipe_);
    SSL_shutdown(ssl_);
  }
  ERR_clear_error();
  SSL_free(ssl_);
}

StreamSecurity TlsSession::security() const {
  return kernel_sends_ && kernel_receives_ ? StreamSecurity::tls_kernel : StreamSecurity::tls_user_space;
}

template <typename Call>
int TlsSession::retry(const char* what, milliseconds timeout, Call call) {
  std::unique_lock lock(mutex_);
  for (;;) {
    int result;
    {
      SigpipeBlocked blocked(guard_sigpipe_);
      result = call();
    }
    if (result > 0) return result;
    const int error = SSL_get_error(ssl_, result);
    if (error == SSL_ERROR_WANT_READ || error == SSL_ERROR_WANT_WRITE) {
      lock.unlock();
      const bool ready = wait_for_socket(fd_, error, timeout);
      lock.lock();
      if (!ready) throw PeerError(std::string(what) + ": the peer stopped responding (timed out)");
      continue;
    }
    if (error == SSL_ERROR_ZERO_RETURN) throw PeerError("the peer closed the connection mid-stream");
    if (error == SSL_ERROR_SYSCALL) {
      const int err = errno;
      ERR_clear_error();
      if (result == 0 || err == 0) throw PeerError("the peer closed the connection mid-stream");
      throw PeerError(std::string(what) + ": " + std::strerror(err));
    }
    throw PeerError(std::string(what) + ": TLS error: " + openssl_reason());
  }
}

std::size_t TlsSession::read_some(std::byte* out, std::size_t size, milliseconds timeout) {
  const int chunk = static_cast<int>(std::min<std::size_t>(size, INT32_MAX));
  return static_cast<std::size_t>(retry("receive", timeout, [&] { return SSL_read(ssl_, out, chunk); }));
}

void TlsSession::write_all(const std::byte* data, std::size_t size, milliseconds timeout) {
  // SSL_write writes its whole buffer (partial writes are off), retried with the same
  // arguments after a wait, as OpenSSL requires.
  while (size > 0) {
    const int chunk = static_cast<int>(std::min<std::size_t>(size, 1u << 30));
    const auto n = static_cast<std::size_t>(retry("send", timeout, [&] { return SSL_write(ssl_, data, chunk); }));
    data += n;
    size -= n;
  }
}

TlsContext::TlsContext(TlsCredentials credentials, TlsRole role) : credentials_(std::move(credentials)), role_(role) {}

TlsContext::~TlsContext() { SSL_CTX_free(ctx_); }

std::shared_ptr<const TlsContext> TlsContext::load(const TlsCredentials& credentials, TlsRole role) {
  if (!credentials.x509_dir.empty() && !credentials.psk_file.empty())
    throw std::runtime_error("give either TLS certificates (--tls-creds) or a pre-shared key (--tls-psk), not both");
  std::shared_ptr<TlsContext> context(new TlsContext(credentials, role));
  SSL_CTX* ctx = SSL_CTX_new(role == TlsRole::client ? TLS_client_method() : TLS_server_method());
  if (!ctx) throw std::runtime_error("TLS: " + openssl_reason());
  context->ctx_ = ctx;
  // TLS 1.3 only: nothing older needs supporting, and 1.3 alone never renegotiates.
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
  // kTLS where the kernel has it. No session tickets: a migration never resumes a TLS
  // session, and a ticket is one more record for a kTLS receiver to deal with.
  SSL_CTX_set_options(ctx, SSL_OP_ENABLE_KTLS);
  SSL_CTX_set_num_tickets(ctx, 0);
  SSL_CTX_set_mode(ctx, SSL_MODE_AUTO_RETRY);
  // Read ahead into a buffer of several records: one recv brings many, where by default each
  // record costs two (its header, then its body).
  SSL_CTX_set_read_ahead(ctx, 1);
  SSL_CTX_set_default_read_buffer_len(ctx, 256 * 1024);
  SSL_CTX_set_app_data(ctx, context.get());
  if (!credentials.x509_dir.empty())
    context->load_x509();
  else
    context->load_psk();
  return context;
}

void TlsContext::load_x509() {
  const std::string dir = credentials_.x509_dir;
  const auto file = [&](const char* name) {
    const std::string path = dir + "/" + name;
    if (::access(path.c_str(), R_OK) != 0)
      throw std::runtime_error("--tls-creds " + dir + ": cannot read " + name + ": " + std::strerror(errno));
    return path;
  };
  const auto fail = [&](const std::string& path) {
    throw std::runtime_error("--tls-creds " + dir + ": " + path + ": " + openssl_reason());
  };
  const std::string ca = file("ca-cert.pem");
  if (SSL_CTX_load_verify_locations(ctx_, ca.c_str(), nullptr) != 1) fail(ca);
  const char* own = role_ == TlsRole::client ? "client" : "server";
  const std::string cert = file((std::string(own) + "-cert.pem").c_str());
  const std::string key = file((std::string(own) + "-key.pem").c_str());
  if (SSL_CTX_use_certificate_chain_file(ctx_, cert.c_str()) != 1) fail(cert);
  if (SSL_CTX_use_PrivateKey_file(ctx_, key.c_str(), SSL_FILETYPE_PEM) != 1) fail(key);
  if (SSL_CTX_check_private_key(ctx_) != 1) fail(key);
  // Both ends authenticate: a client without a certificate the CA signed is refused.
  SSL_CTX_set_verify(ctx_, role_ == TlsRole::client ? SSL_VERIFY_PEER : SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
                     nullptr);
}

// TLS 1.3 with an external PSK through OpenSSL's PSK callbacks (it picks a SHA-256 suite).
void TlsContext::load_psk() {
  const std::string& path = credentials_.psk_file;
  std::istringstream lines(read_text_file(path, "--tls-psk"));
  for (std::string line; std::getline(lines, line);) {
    if (line.empty() || line[0] == '#') continue;
    const auto colon = line.find(':');
    if (colon == std::string::npos || colon == 0 || colon > 128)
      throw std::runtime_error("--tls-psk " + path + ": a line is not IDENTITY:HEXKEY");
    try {
      auto key = decode_hex(line.substr(colon + 1));
      if (key.size() < 16 || key.size() > PSK_MAX_PSK_LEN) throw std::invalid_argument("a key must have 16 to 256 bytes");
      psk_keys_.emplace_back(line.substr(0, colon), std::move(key));
    } catch (const std::invalid_argument& e) {
      throw std::runtime_error("--tls-psk " + path + ": the key of '" + line.substr(0, colon) + "': " + e.what());
    }
  }
  if (psk_keys_.empty()) throw std::runtime_error("--tls-psk " + path + ": no IDENTITY:HEXKEY line");
  if (role_ == TlsRole::client) {
    SSL_CTX_set_psk_client_callback(ctx_, [](SSL* ssl, const char*, char* identity, unsigned max_identity, unsigned char* psk,
                                             unsigned max_psk) -> unsigned {
      const auto& [name, key] = context_of(ssl).psk_keys_.front();
      if (name.size() + 1 > max_identity || key.size() > max_psk) return 0;
      std::memcpy(identity, name.c_str(), name.size() + 1);
      std::memcpy(psk, key.data(), key.size());
      return static_cast<unsigned>(key.size());
    });
  } else {
    SSL_CTX_set_psk_server_callback(ctx_, [](SSL* ssl, const char* identity, unsigned char* psk, unsigned max_psk) -> unsigned {
      for (const auto& [name, key] : context_of(ssl).psk_keys_)
        if (identity && name == identity && key.size() <= max_psk) {
          std::memcpy(psk, key.data(), key.size());
          return static_cast<unsigned>(key.size());
        }
      return 0;  // an unknown identity fails the handshake
    });
  }
}

void TlsContext::check_authorised(SSL* ssl) const {
  if (role_ != TlsRole::server || credentials_.authz.empty() || credentials_.x509_dir.empty()) return;
  X509* cert = SSL_get0_peer_certificate(ssl);
  const std::string subject = cert ? subject_rfc2253(cert) : "";
  if (std::find(credentials_.authz.begin(), credentials_.authz.end(), subject) == credentials_.authz.end())
    throw PeerError("TLS: client certificate subject '" + subject + "' is not in --tls-authz");
}

std::unique_ptr<TlsSession> TlsContext::handshake(int fd, const std::string& peer_host, milliseconds timeout) const {
  const int flags = check_syscall("fcntl(F_GETFL)", [&] { return ::fcntl(fd, F_GETFL); });
  check_syscall("fcntl(O_NONBLOCK)", [&] { return ::fcntl(fd, F_SETFL, flags | O_NONBLOCK); });
  std::unique_ptr<SSL, decltype(&SSL_free)> owned(SSL_new(ctx_), &SSL_free);
  SSL* ssl = owned.get();
  if (!ssl) throw std::runtime_error("TLS: " + openssl_reason());
  SSL_set_fd(ssl, fd);
  if (role_ == TlsRole::client && !credentials_.x509_dir.empty()) {
    const std::string name = credentials_.hostname.empty() ? peer_host : credentials_.hostname;
    X509_VERIFY_PARAM* param = SSL_get0_param(ssl);
    in6_addr ip;
    const bool is_ip = ::inet_pton(AF_INET, name.c_str(), &ip) == 1 || ::inet_pton(AF_INET6, name.c_str(), &ip) == 1;
    if (is_ip ? X509_VERIFY_PARAM_set1_ip_asc(param, name.c_str()) != 1 : X509_VERIFY_PARAM_set1_host(param, name.c_str(), 0) != 1)
      throw std::runtime_error("TLS: cannot check the server's name '" + name + "'");
    if (!is_ip) SSL_set_tlsext_host_name(ssl, name.c_str());
  }
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    int result;
    {
      SigpipeBlocked blocked(true);
      result = role_ == TlsRole::client ? SSL_connect(ssl) : SSL_accept(ssl);
    }
    if (result == 1) break;
    const int error = SSL_get_error(ssl, result);
    const auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now());
    if ((error == SSL_ERROR_WANT_READ || error == SSL_ERROR_WANT_WRITE) && left.count() > 0) {
      if (!wait_for_socket(fd, error, left)) throw PeerError("TLS handshake: the peer did not finish it in time");
      continue;
    }
    if (left.count() <= 0) throw PeerError("TLS handshake: the peer did not finish it in time");
    const long verify = SSL_get_verify_result(ssl);
    if (verify != X509_V_OK) {
      ERR_clear_error();
      throw PeerError(std::string("TLS handshake: peer certificate refused: ") + X509_verify_cert_error_string(verify));
    }
    if (error == SSL_ERROR_SYSCALL || error == SSL_ERROR_ZERO_RETURN) {
      ERR_clear_error();
      throw PeerError("TLS handshake: the peer closed the connection (it may not speak TLS, or refused our credentials)");
    }
    const std::string reason = openssl_reason();
    throw PeerError("TLS handshake: " + reason + (reason == "wrong version number" ? " (the peer does not speak TLS 1.3)" : ""));
  }
  check_authorised(ssl);
  // Only now, once kTLS has (or has not) taken the keys, does the session know its path.
  return std::make_unique<TlsSession>(owned.release(), fd);
}

}  // namespace mig::transport
