# mcp-policy-engine — `make run` serves, `make test` checks everything.
# Both install what they need: a virtualenv with the package, and the pinned OPA, Regal
# and buf (built with `go install` into .tools/bin unless the same version is on PATH).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := $(CURDIR)/.venv
BIN := $(CURDIR)/.tools/bin
export PATH := $(BIN):$(VENV)/bin:$(PATH)

OPA_VERSION := 1.22.2
BUF_VERSION := 1.75.0
PROTOVALIDATE_VERSION := 1.2.2
OPA := $(BIN)/opa
REGAL := $(BIN)/regal
BUF := $(BIN)/buf
OPA_LIB := $(CURDIR)/.tools/lib/libmcppolicy_opa.so
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.installed-stamp
PROTOS := $(wildcard proto/mcppolicy/v1/*.proto)
# buf/validate/validate.proto, the protovalidate rules our protos are annotated with: taken
# from the Go module github.com/bufbuild/protovalidate (go mod download), never committed.
PROTO_DEPS := $(CURDIR)/.tools/proto
VALIDATE_PROTO := $(PROTO_DEPS)/buf/validate/validate.proto
GENERATED := mcppolicy/v1/decision_pb2.py

.PHONY: help setup tools redis-server chromium run test check fmt lint lint-rego lint-proto \
        lint-python test-rego test-python bench clean fuzz interop-deps real-server

help:
	@echo "make run    - install what is missing, then serve (gRPC :50051, HTTP :8080)"
	@echo "make test   - install what is missing, then lint and test policies, proto and Python"
	@echo "make fuzz   - the property/fuzz tests (tests/test_fuzz.py) with many more examples"
	@echo "make bench  - decision throughput and latency vs raw OPA"
	@echo "make bench-approvals - approval webhooks: latency to a receiver, cost to decisions"
	@echo "make bench-decision-log - allows with the decision log synced to disk vs batched"
	@echo "make bench-fleet - decisions with no --opa-config vs uploading to a collector (and it down)"
	@echo "make bench-results - tool results decided (redacted, passed) beside the call decision"
	@echo "make fmt    - format Rego and Python"

setup: $(STAMP) $(GENERATED) tools

tools: $(OPA) $(REGAL) $(BUF) $(OPA_LIB)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

# Generated protobuf code is built here, never edited or committed: the modules and their
# .pyi stubs (protoc's own for the messages, mypy-protobuf's for the gRPC stubs and
# servicers), so mypy checks the code on both sides of the wire against the protos.
$(GENERATED): $(PROTOS) $(VALIDATE_PROTO) $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet "grpcio-tools==1.85.1" "mypy-protobuf==5.1.0"
	rm -rf mcppolicy buf
	$(PY) -m grpc_tools.protoc -Iproto -I$(PROTO_DEPS) --python_out=. --pyi_out=. \
	  --grpc_python_out=. --mypy_grpc_out=quiet:. $(PROTOS)
	$(PY) -m grpc_tools.protoc -I$(PROTO_DEPS) --python_out=. --pyi_out=. $(VALIDATE_PROTO)
	touch mcppolicy/__init__.py mcppolicy/v1/__init__.py buf/__init__.py buf/validate/__init__.py

$(VALIDATE_PROTO):
	@mkdir -p $(dir $@)
	dir=$$(go mod download -json github.com/bufbuild/protovalidate@v$(PROTOVALIDATE_VERSION) \
	  | sed -n 's/^\t"Dir": "\(.*\)",$$/\1/p'); \
	install -m 644 "$$dir/proto/protovalidate/buf/validate/validate.proto" $@

$(STAMP): pyproject.toml $(GENERATED)
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

# OPA: reuse an `opa` of the pinned version on PATH, else build it with go install.
$(OPA):
	@mkdir -p $(BIN)
	@found=$$(PATH=$${PATH#$(BIN):} command -v opa || true); \
	if [ -n "$$found" ] && "$$found" version | grep -qx "Version: $(OPA_VERSION)"; then \
	  ln -sf "$$found" $@; echo "using $$found"; \
	else \
	  echo "building opa v$(OPA_VERSION) with go install"; \
	  GOBIN=$(BIN) go install github.com/open-policy-agent/opa@v$(OPA_VERSION); \
	fi

# Regal through a wrapper module (tools/regal/go.mod pins it).
$(REGAL): tools/regal/go.mod
	@mkdir -p $(BIN)
	cd tools/regal && GOBIN=$(BIN) go install -buildvcs=false tool

$(BUF):
	@mkdir -p $(BIN)
	GOBIN=$(BIN) go install github.com/bufbuild/buf/cmd/buf@v$(BUF_VERSION)

# OPA's evaluator as a shared library for the in-process evaluator (engine/policy/inprocess.py).
$(OPA_LIB): $(wildcard engine/policy/native/*.go) engine/policy/native/go.mod engine/policy/native/go.sum
	@mkdir -p $(dir $@)
	cd engine/policy/native && go build -buildmode=c-shared -trimpath -o $(OPA_LIB) .

# The tests start private Redis servers; Debian's redis-server is installed when missing.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server with apt-get"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server >/dev/null; }

# The console's browser tests (tests/browser.py) drive Debian's chromium through its
# chromedriver; both are installed when missing.
chromium:
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || { \
	  echo "installing chromium and chromium-driver with apt-get"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver \
	    >/dev/null; }

run: setup
	$(VENV)/bin/mcp-policy serve

test: setup redis-server chromium interop-deps real-server lint test-rego test-python

# The interop suite's real MCP clients (tests/test_interop.py): the TypeScript SDK, pinned
# in tests/interop/package-lock.json, installed with `npm ci` into tests/interop/node_modules
# whenever that lock file is newer than the install (npm ci writes node_modules/.package-lock.json).
INTEROP := tests/interop

# The OpenID Provider the console's sign-in tests run (tests/test_console_oidc.py): the
# certified oidc-provider, pinned in tests/oidc/package-lock.json, installed the same way.
OIDC_OP := tests/oidc

interop-deps: $(INTEROP)/node_modules/.package-lock.json $(OIDC_OP)/node_modules/.package-lock.json

$(INTEROP)/node_modules/.package-lock.json: $(INTEROP)/package-lock.json $(INTEROP)/package.json
	npm ci --prefix $(INTEROP) --no-audit --no-fund
	touch $@

$(OIDC_OP)/node_modules/.package-lock.json: $(OIDC_OP)/package-lock.json $(OIDC_OP)/package.json
	npm ci --prefix $(OIDC_OP) --no-audit --no-fund
	touch $@

# The real awslabs.healthimaging-mcp-server, which the fixture server stands in for
# (tests/test_real_server.py compares their tools and runs the real one behind the proxy;
# tests/test_interop.py too): installed from PyPI by package name into a virtualenv of its
# own, .tools/realserver/ (it pins its own mcp and boto3, which must not meet the project's),
# once per version (the stamp names it). tests/fixtures/real_server.py finds it there.
REAL_SERVER_VERSION := 0.1.1
REAL_SERVER_VENV := $(CURDIR)/.tools/realserver
REAL_SERVER_STAMP := $(REAL_SERVER_VENV)/.installed-$(REAL_SERVER_VERSION)

real-server: $(REAL_SERVER_STAMP)

$(REAL_SERVER_STAMP):
	rm -rf $(REAL_SERVER_VENV)
	$(PYTHON) -m venv $(REAL_SERVER_VENV)
	$(REAL_SERVER_VENV)/bin/pip install --quiet --disable-pip-version-check \
	  "awslabs.healthimaging-mcp-server==$(REAL_SERVER_VERSION)"
	touch $@

check: test

lint: lint-rego lint-proto lint-python

lint-rego:
	opa fmt --list --fail rego
	opa check --strict --schema schema rego policies
	regal lint rego

# buf breaking compares the protos with those on the branch main of this clone (no
# network), by the rules in buf.yaml: wire and JSON compatibility for built clients. Main's
# tree is taken with git archive and given the same fetched validate.proto (buf.yaml's
# second module), which git does not hold.
AGAINST := $(CURDIR)/.tools/against-main

lint-proto: $(VALIDATE_PROTO)
	buf lint proto
	rm -rf $(AGAINST) && mkdir -p $(AGAINST)/.tools
	git archive main | tar -x -C $(AGAINST)
	cp -r $(PROTO_DEPS) $(AGAINST)/.tools/
	buf breaking --against $(AGAINST)

lint-python:
	ruff check engine tests bench
	ruff format --check engine tests bench
	mypy

# The policy's tests with coverage; then the policy must build as an OPA bundle with the
# pinned `opa build`, and the bundle read back (`opa inspect`).
test-rego:
	opa test rego policies
	opa test rego policies --coverage --threshold 90 > .tools/coverage.json \
	  || { echo "Rego coverage below 90%"; grep -o '"coverage": *[0-9.]*' .tools/coverage.json | tail -1; exit 1; }
	@echo "Rego coverage: $$(grep -o '"coverage": *[0-9.]*' .tools/coverage.json | tail -1 | grep -o '[0-9.]*$$')%"
	opa build rego policies -o .tools/policy-bundle.tar.gz
	opa inspect .tools/policy-bundle.tar.gz > /dev/null

# Python tests in two layers. First the unit layer: modules that start no OPA server, no
# Redis and no listening server (the in-process evaluator at most), in seconds, stopping
# at the first failure. Then everything else, TEST_WORKERS test files at a time
# (pytest-xdist; each file's tests stay in one worker, with its fixtures), every test
# bounded by TEST_TIMEOUT seconds so a hang fails instead of stalling CI. Coverage of
# engine/ is measured over both layers (the second appends to the first) and over the
# processes the tests start (the CLI, proxies, servers: `patch = ["subprocess"]` in
# pyproject.toml), and fails under PY_COVERAGE_FLOOR percent. The data file lives in
# .tools/ (ignored by git).
UNIT_TESTS := tests/test_units.py tests/test_proxy_units.py tests/test_migrate.py \
              tests/test_examples.py tests/test_wire_rules.py tests/test_redaction.py
PY_COVERAGE_FLOOR := 90
TEST_WORKERS ?= 3
TEST_TIMEOUT ?= 300
PY_COVERAGE := COVERAGE_FILE=$(CURDIR)/.tools/.coverage

test-python:
	@mkdir -p .tools
	$(PY_COVERAGE) pytest -x --cov=engine --cov-report= $(UNIT_TESTS)
	$(PY_COVERAGE) pytest $(addprefix --ignore=,$(UNIT_TESTS)) -n $(TEST_WORKERS) --dist loadfile \
	  --timeout $(TEST_TIMEOUT) --cov=engine --cov-append \
	  --cov-report=term:skip-covered --cov-fail-under=$(PY_COVERAGE_FLOOR)

# The fuzz tests run in `make test` with a few examples each; here with the "fuzz" profile
# (tests/strategies.py): 2000 random examples per property, failures kept in .hypothesis/.
fuzz: setup redis-server
	HYPOTHESIS_PROFILE=fuzz pytest tests/test_fuzz.py

bench: setup redis-server bench-tools
	$(PY) -m bench.load
	$(PY) -m bench.stores
	$(PY) -m bench.redis_limiter
	$(PY) -m bench.proxy

# Approval webhooks (bench/approvals.py): approval_required to a verified webhook at a
# loopback receiver, and decisions/s with 5 endpoints (one hanging) against none.
bench-approvals: setup bench-tools
	$(PY) -m bench.approvals

# MCP_POLICY_DECISION_LOG_SYNC=batch beside =always (bench/decision_log_sync.py): allow
# decisions/s and p50/p99 over HTTP with hey, and the chains verified afterwards.
bench-decision-log: setup bench-tools
	$(PY) -m bench.decision_log_sync

# Decision upload (bench/fleet.py): HTTP Decide with hey, no --opa-config beside
# decision_logs to a loopback collector and to a closed port, then every decision counted.
bench-fleet: setup bench-tools
	$(PY) -m bench.fleet

# The result policy (bench/result_policy.py): POST /v1/decide-result (hey) and DecideResult
# (ghz) of get_image_set_metadata results (the fixture's, redacted; 30 KB plain; 1 MiB) and
# of one that passes, beside the call decision; then each step's p50 in process.
bench-results: setup bench-tools
	$(PY) -m bench.result_policy

# The load tools bench/load.py drives the servers with (Go, so the load generator does not
# eat the CPU the servers need), built with go install into .tools/bin at these versions.
# A stamp per version: changing a version here rebuilds that tool.
# opa-envoy-plugin is the peer: OPA's own Envoy ext_authz server (it embeds OPA 1.15.2;
# v1.15.2-envoy is the newest release the Go module proxy serves here). `go install
# pkg@version` refuses it (the proxy does not list the module's versions, which go install
# reads for deprecations), so it is built in a throwaway module that requires that version.
GHZ_VERSION := 0.121.0
HEY_VERSION := 0.1.5
OPA_ENVOY_PLUGIN_VERSION := 1.15.2-envoy
BENCH_TOOLS := $(BIN)/.ghz-v$(GHZ_VERSION) $(BIN)/.hey-v$(HEY_VERSION) \
               $(BIN)/.opa-envoy-plugin-v$(OPA_ENVOY_PLUGIN_VERSION)

.PHONY: bench-tools bench-approvals bench-decision-log bench-fleet bench-results
bench-tools: $(BENCH_TOOLS)

$(BIN)/.ghz-v$(GHZ_VERSION):
	@mkdir -p $(BIN)
	GOBIN=$(BIN) go install github.com/bojand/ghz/cmd/ghz@v$(GHZ_VERSION)
	touch $@

$(BIN)/.hey-v$(HEY_VERSION):
	@mkdir -p $(BIN)
	GOBIN=$(BIN) go install github.com/rakyll/hey@v$(HEY_VERSION)
	touch $@

$(BIN)/.opa-envoy-plugin-v$(OPA_ENVOY_PLUGIN_VERSION):
	@mkdir -p $(BIN)
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; cd "$$tmp"; \
	go mod init bench-tools/opa-envoy-plugin; \
	go get github.com/open-policy-agent/opa-envoy-plugin/cmd/opa-envoy-plugin@v$(OPA_ENVOY_PLUGIN_VERSION); \
	GOBIN=$(BIN) go install github.com/open-policy-agent/opa-envoy-plugin/cmd/opa-envoy-plugin
	touch $@

fmt: setup
	opa fmt --write rego
	ruff format engine tests bench
	ruff check --fix engine tests bench

clean:
	rm -rf $(VENV) .tools mcppolicy .pytest_cache .mypy_cache .ruff_cache
