// Authenticated, encrypted migration streams: TLS 1.3 through OpenSSL, with both ends
// authenticated, by x509 certificates (QEMU's tls-creds-x509 directory layout) or by a
// pre-shared key (QEMU's tls-creds-psk key file).
//
// The handshake runs when a connection is made, before the first mig frame, so a peer that
// fails it never reaches the protocol, let alone guest memory. Where the kernel has kTLS,
// OpenSSL hands it the keys after the handshake and page data keeps going out as gathered
// sendmsg calls, the kernel encrypting; elsewhere (this project's hosts: CONFIG_TLS is off)
// OpenSSL encrypts in user space. Which of the two runs is reported per stream.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_st SSL;

namespace mig::transport {

// What an operator gives. At most one of x509_dir and psk_file.
struct TlsCredentials {
  // ca-cert.pem, and server-cert.pem + server-key.pem (receiver) or client-cert.pem +
  // client-key.pem (sender).
  std::string x509_dir;
  // Lines "IDENTITY:HEXKEY" (at least 16 key bytes). The sender uses the first line; the
  // receiver accepts any identity listed.
  std::string psk_file;
  // Sender: the name the receiver's certificate must carry; empty means the host of the
  // endpoint connected to (QEMU's rule). An IP address is matched against IP SANs.
  std::string hostname;
  // Receiver: the client certificate subjects allowed, in RFC 2253 form as `openssl x509
  // -noout -subject -nameopt RFC2253` prints them; empty allows any the CA signed.
  std::vector<std::string> authz;

  bool enabled() const { return !x509_dir.empty() || !psk_file.empty(); }
};

enum class TlsRole { client, server };

// How a stream's bytes travel.
enum class StreamSecurity { plaintext, tls_user_space, tls_kernel };
const char* to_string(StreamSecurity security);

// One TLS connection. Thread-safe: the post-copy channels read on one thread and write on
// another, which a bare SSL object does not allow, so every OpenSSL call holds a lock and
// the waits for the socket happen outside it (the socket is non-blocking).
class TlsSession {
 public:
  TlsSession(SSL* ssl, int fd);
  ~TlsSession();
  TlsSession(const TlsSession&) = delete;
  TlsSession& operator=(const TlsSession&) = delete;

  // The kernel took the send key (kTLS): plain writes to the socket are encrypted on the way.
  bool kernel_sends() const { return kernel_sends_; }
  StreamSecurity security() const;
  // Reads at least one byte, waiting at most `timeout` (0: for ever) for each piece of progress. Throws
  // PeerError when the peer closed, stopped answering, or broke the TLS stream.
  std::size_t read_some(std::byte* out, std::size_t size, std::chrono::milliseconds timeout);
  void write_all(const std::byte* data, std::size_t size, std::chrono::milliseconds timeout);

 private:
  // Runs an OpenSSL call under the lock until it makes progress, waiting for the socket in
  // between; returns its result (> 0), or throws PeerError saying `what` failed.
  template <typename Call>
  int retry(const char* what, std::chrono::milliseconds timeout, Call call);

  std::mutex mutex_;
  SSL* ssl_;
  int fd_;
  bool kernel_sends_ = false, kernel_receives_ = false;
  bool guard_sigpipe_;  // the process does not ignore SIGPIPE: block it around OpenSSL's writes
};

// Loaded, checked credentials for one role; shared by every connection they secure.
class TlsContext {
 public:
  // Throws std::runtime_error, one line naming the file and what is wrong with it.
  static std::shared_ptr<const TlsContext> load(const TlsCredentials& credentials, TlsRole role);
  ~TlsContext();
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;

  TlsRole role() const { return role_; }
  // Runs the handshake on the connected socket `fd` (made non-blocking for good), within
  // `timeout`, and checks the peer: a server's certificate against the CA and the expected
  // name (the credentials' hostname, else `peer_host`); a client's against the CA and the
  // authz list. Throws PeerError naming why the peer was refused.
  std::unique_ptr<TlsSession> handshake(int fd, const std::string& peer_host, std::chrono::milliseconds timeout) const;

 private:
  TlsContext(TlsCredentials credentials, TlsRole role);
  void load_x509();
  void load_psk();
  void check_authorised(SSL* ssl) const;

  TlsCredentials credentials_;
  TlsRole role_;
  SSL_CTX* ctx_ = nullptr;
  // PSK identities and keys, as read from the key file; the client's is the first.
  std::vector<std::pair<std::string, std::vector<unsigned char>>> psk_keys_;
};

}  // namespace mig::transport
