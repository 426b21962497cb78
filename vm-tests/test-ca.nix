# A throwaway CA and one server certificate for every test site, made at
# build time: no key is committed.
# SPDX-License-Identifier: GPL-3.0-or-later
{ runCommand, openssl }:

runCommand "agent-egress-test-ca" { nativeBuildInputs = [ openssl ]; } ''
  mkdir -p "$out"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -days 3650 -subj "/CN=agent-egress test CA" \
    -keyout ca.key -out "$out/ca.crt"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=allowed.test" -keyout "$out/server.key" -out server.csr
  cat > server.ext <<'EXT'
  basicConstraints = CA:FALSE
  extendedKeyUsage = serverAuth
  subjectAltName = DNS:allowed.test, DNS:later.test, DNS:xn--bcher-kva.test, DNS:blocked.test
  EXT
  openssl x509 -req -in server.csr -CA "$out/ca.crt" -CAkey ca.key -CAcreateserial \
    -days 365 -extfile server.ext -out "$out/server.crt"
  openssl verify -CAfile "$out/ca.crt" "$out/server.crt"
''
