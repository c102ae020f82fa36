#!/usr/bin/env bash
# Makes a test CA and the certificates mig's --tls-creds DIR expects (QEMU's x509 layout):
# ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem.
#   scripts/make-tls-creds.sh DIR [SERVER_NAME] [CLIENT_CN]
# The server certificate is valid for SERVER_NAME (a host name or an address; default localhost),
# 127.0.0.1 and ::1.
# For tests and demos: the keys are unencrypted and the CA key stays in DIR.
set -euo pipefail
dir=$1
server_name=${2:-localhost}
client_cn=${3:-mig-source}
mkdir -p "$dir"
cd "$dir"
umask 077
quiet() { "$@" >/dev/null 2>&1 || { echo "make-tls-creds: '$*' failed" >&2; "$@"; exit 1; }; }
quiet openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
  -subj "/O=mig test/CN=mig test CA" -keyout ca-key.pem -out ca-cert.pem
sign() {  # NAME SUBJECT EXTENSIONS
  quiet openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "$2" -keyout "$1-key.pem" -out "$1.csr"
  printf '%s\n' "$3" >"$1.ext"
  quiet openssl x509 -req -in "$1.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 3650 \
    -extfile "$1.ext" -out "$1-cert.pem"
  rm -f "$1.csr" "$1.ext"
}
# An address is named by an IP SAN, a host name by a DNS one.
if [[ $server_name =~ ^[0-9.]+$ || $server_name == *:* ]]; then name_san="IP:$server_name"; else name_san="DNS:$server_name"; fi
sign server "/O=mig test/CN=$server_name" \
  "subjectAltName=$name_san,IP:127.0.0.1,IP:::1
extendedKeyUsage=serverAuth"
sign client "/O=mig test/CN=$client_cn" "extendedKeyUsage=clientAuth"
chmod 0644 ca-cert.pem server-cert.pem client-cert.pem
