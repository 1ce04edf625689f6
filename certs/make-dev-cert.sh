#!/usr/bin/env bash
# Makes a development CA and a certificate for localhost / 127.0.0.1 / ::1 signed by it, valid 10 years.
# For local use and the tests only: never serve real buyers with this key.
# Usage: bash certs/make-dev-cert.sh [DIR]   (default: the folder of this script)
set -euo pipefail
dir=${1:-$(dirname "$0")}
cd "$dir"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
  -subj "/CN=x402-gateway dev CA" -keyout dev-ca.key -out dev-ca.crt \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
  -keyout server.key -out server.csr 2>/dev/null
openssl x509 -req -in server.csr -CA dev-ca.crt -CAkey dev-ca.key -CAcreateserial -days 3650 -out server.crt \
  -extfile <(printf 'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n') 2>/dev/null
rm -f server.csr dev-ca.srl dev-ca.key
echo "wrote $(pwd)/server.crt, server.key and dev-ca.crt (trust dev-ca.crt in your client)"
