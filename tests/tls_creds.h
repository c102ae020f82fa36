// Test credentials for TLS, made once per test process by scripts/make-tls-creds.sh: a
// trusted set, and a set signed by another CA (a stranger with a valid-looking certificate).
#pragma once

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <string>

#include "transport/tls.h"

namespace mig::test {

inline std::string make_creds(const std::string& name, const std::string& client_cn = "mig-source") {
  const std::string dir = "/tmp/mig-tls-test-" + std::to_string(::getpid()) + "/" + name;
  if (::access((dir + "/client-key.pem").c_str(), R_OK) == 0) return dir;
  const std::string command = std::string(MIG_SOURCE_DIR) + "/scripts/make-tls-creds.sh " + dir + " localhost " + client_cn;
  if (std::system(command.c_str()) != 0) throw std::runtime_error("could not make test credentials: " + command);
  return dir;
}
inline std::string trusted_creds() { return make_creds("trusted"); }
inline std::string stranger_creds() { return make_creds("stranger"); }

inline std::string make_psk_file(const std::string& name, const std::string& lines) {
  const std::string path = "/tmp/mig-tls-test-" + std::to_string(::getpid()) + "-" + name + ".psk";
  std::ofstream(path) << lines;
  return path;
}

inline transport::TlsCredentials x509(const std::string& dir) {
  transport::TlsCredentials c;
  c.x509_dir = dir;
  return c;
}

}  // namespace mig::test
