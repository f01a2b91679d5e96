# The two commands a newcomer runs: `make run` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PROTOS := $(wildcard protos/pdserve/v1/*.proto)
PROTO_STAMP := pdserve/v1/.generated

.PHONY: run test test-fast test-faults test-compose docker-setup compose-up trace-viewer install proto model clean

run: install proto model
	$(PY) -m pdserve_cli up --demo

# Everything, the docker-compose stage included (its tests skip where Docker cannot run, but not under CI=true).
test: install proto model docker-setup
	$(PY) -m pytest -q -ra

# The fault-injection suite alone (real processes, kill -9, SIGSTOP, restart), with every log line.
test-faults: install proto model
	$(PY) -m pytest -q -ra -s tests/test_faults.py

# The docker-compose cluster end to end (build, up, requests, scale, kill a decode, trace in Phoenix, down),
# then the swarm stack (deploy, kill, rolling update, stack rm).
test-compose: install proto model docker-setup
	$(PY) -m pytest -q -ra -s tests/test_compose.py tests/test_swarm.py

# Installs and starts Docker, the compose plugin, debootstrap and Chromium where it can (root + apt).
docker-setup:
	@bash scripts/docker-setup.sh

# The compose cluster on this machine (local base image, CA certificates and torch wheel when needed).
compose-up: docker-setup
	bash docker/prepare.sh
	PDSERVE_BASE_IMAGE=$${PDSERVE_BASE_IMAGE:-pdserve-base:bookworm} docker compose up -d --build --wait

# Arize Phoenix in its own venv (.venv-phoenix) for `pdserve up --trace-viewer`.
trace-viewer:
	@[[ -x .venv-phoenix/bin/phoenix ]] || { python3 -m venv .venv-phoenix && .venv-phoenix/bin/pip install -q arize-phoenix==20.26.1; }

# Everything but the slow end-to-end tests with real processes.
test-fast: install proto model
	$(PY) -m pytest -q -ra -m "not slow"

install:
	@bash scripts/bootstrap.sh

proto: install $(PROTO_STAMP)

$(PROTO_STAMP): $(PROTOS)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	@touch $@

# Provisions the default model (SmolLM2-135M-Instruct) offline; idempotent.
model: install proto
	@$(PY) -m pdserve_cli model fetch

clean:
	rm -rf $(VENV) pdserve/v1/*_pb2*.py pdserve/v1/*_pb2*.pyi $(PROTO_STAMP)
