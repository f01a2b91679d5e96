#!/usr/bin/env bash
# Readies the docker build context on a machine without registry or direct internet access:
#   - extra CA certificates: *.crt from $PDSERVE_EXTRA_CA_DIR (default /usr/local/share/ca-certificates,
#     where Debian keeps locally added ones) into docker/ca-certificates/
#   - the PyTorch CPU wheel into docker/wheelhouse/ (from $PIP_FIND_LINKS if it is there, else pip download)
#   - the base image (docker/base-image.sh), unless $PDSERVE_BASE_IMAGE names one that exists
# Idempotent. Users with a registry and plain internet access need none of this.
set -euo pipefail
cd "$(dirname "$0")"
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

ca_dir=${PDSERVE_EXTRA_CA_DIR:-/usr/local/share/ca-certificates}
if compgen -G "$ca_dir/*.crt" >/dev/null; then
  cp -u "$ca_dir"/*.crt ca-certificates/
  echo "==> extra CA certificates: $(cd ca-certificates && ls *.crt | tr '\n' ' ')"
fi

if ! compgen -G "wheelhouse/torch-${TORCH_VERSION}*.whl" >/dev/null; then
  local_wheel=$(ls "${PIP_FIND_LINKS:-/nonexistent}"/torch-"${TORCH_VERSION}"*cp311*.whl 2>/dev/null | head -1 || true)
  if [[ -n $local_wheel ]]; then
    cp "$local_wheel" wheelhouse/
  else
    echo "==> pip download torch==$TORCH_VERSION into docker/wheelhouse"
    python3 -m pip download --no-deps --only-binary :all: --python-version 3.11 -d wheelhouse "torch==$TORCH_VERSION"
  fi
fi
echo "==> torch wheel: $(cd wheelhouse && ls torch-*.whl)"

base=${PDSERVE_BASE_IMAGE:-pdserve-base:bookworm}
if ! docker image inspect "$base" >/dev/null 2>&1; then
  bash base-image.sh "$base"
fi
