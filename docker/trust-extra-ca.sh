#!/bin/sh
# Run inside an image build: trusts the *.crt files copied to /usr/local/share/ca-certificates/pdserve/
# (a TLS-intercepting proxy's CA) for the system and for pip. Nothing to do when there are none.
set -e
if ls /usr/local/share/ca-certificates/pdserve/*.crt >/dev/null 2>&1; then
  update-ca-certificates >/dev/null
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > /etc/pip.conf
  echo "trusting extra CA certificates: $(ls /usr/local/share/ca-certificates/pdserve/)"
fi
