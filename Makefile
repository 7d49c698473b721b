# ztunnel-py — every target sets up what it needs itself (idempotent, Debian 12, root).
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
BIN   := $(VENV)/bin
export BCC_KERNEL_SOURCE ?= /opt/ztunnel-py/kernel-headers

.PHONY: setup native test check unit demo demo-down bench proto proto-check clean

setup:
	@bash scripts/setup.sh

## The hot modules (agent and waypoint), compiled by mypyc (setup does it; a no-op while current).
native: setup
	$(PY) scripts/build_native.py

## The README's test command: lint, types, layering, generated code, then every test tier.
test: setup check
	$(BIN)/pytest -p no:cacheprovider tests

check: setup
	$(BIN)/ruff check ztunnel_py waypoint tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(MAKE) --no-print-directory proto-check

unit: setup
	$(BIN)/pytest -p no:cacheprovider tests/unit

## The README's demo command.
demo: setup
	$(BIN)/ztunnel-py demo up

demo-down: setup
	$(BIN)/ztunnel-py demo down

bench: setup
	$(PY) -m bench

proto: setup
	$(PY) -m grpc_tools.protoc -I proto --python_out=ztunnel_py/proto_gen \
	  --grpc_python_out=ztunnel_py/proto_gen --pyi_out=ztunnel_py/proto_gen proto/*.proto
	sed -i -E 's/^import ([a-z_]+_pb2)/from ztunnel_py.proto_gen import \1/' ztunnel_py/proto_gen/*_pb2_grpc.py ztunnel_py/proto_gen/*_pb2.py

proto-check: setup
	@tmp=$$(mktemp -d); cp -r ztunnel_py/proto_gen "$$tmp/before"; \
	$(MAKE) --no-print-directory proto >/dev/null; \
	if ! diff -r -x __pycache__ "$$tmp/before" ztunnel_py/proto_gen >/dev/null; then \
	  echo "proto-check: generated code in ztunnel_py/proto_gen is stale; run 'make proto' and commit"; \
	  rm -rf "$$tmp"; exit 1; fi; rm -rf "$$tmp"; echo "proto-check: generated code is current"

clean:
	-$(PY) scripts/build_native.py --clean
	rm -rf $(VENV) .mypy_cache .ruff_cache build *.egg-info
