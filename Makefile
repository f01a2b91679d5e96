# The two commands a newcomer runs: `make run` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PROTOS := $(wildcard protos/pdserve/v1/*.proto)
PROTO_STAMP := pdserve/v1/.generated

.PHONY: run test test-fast test-faults install proto model clean

run: install proto model
	$(PY) -m pdserve.cli up --demo

test: install proto model
	$(PY) -m pytest -q -ra

# The fault-injection suite alone (real processes, kill -9, SIGSTOP, restart), with every log line.
test-faults: install proto model
	$(PY) -m pytest -q -ra -s tests/test_faults.py

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
	@$(PY) -m pdserve.cli model fetch

clean:
	rm -rf $(VENV) pdserve/v1/*_pb2*.py pdserve/v1/*_pb2*.pyi $(PROTO_STAMP)
