#!/usr/bin/env bash
# Creates .venv and installs pdserve with its test tools. Idempotent: a venv
# whose stamp matches the current requirements is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.pdserve-installed
want=$(cat pyproject.toml requirements.lock | sha256sum | cut -d' ' -f1)

if [[ -f $STAMP && $(cat "$STAMP") == "$want" ]]; then
  exit 0
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "pdserve needs Python >= 3.10 (found $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi

echo "==> creating $VENV and installing dependencies (first run takes a few minutes)"
[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
# torch first and pinned: 2.13.0 resolves to the local CPU build; any looser
# requirement would pull gigabytes of CUDA packages.
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -r requirements.lock
"${pip[@]}" --no-deps -e .
echo "$want" > "$STAMP"
echo "==> $VENV ready"
