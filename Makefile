# edgeloop — the two commands: `make up` (run the platform here) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9

.PHONY: setup system-deps up demo keys down status test test-fast chaos fuzz lint format bench proto clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q "uv==$(UV_VERSION)"

# Debian's OCI registry (Distribution), skopeo and a Docker engine (for the builder's
# Docker backend; its test starts a private dockerd) are what the tests and `make up` use;
# Compose checks docker-compose.yml (Debian's docker-compose when there is no plugin);
# the browser tests drive Debian's chromium (Playwright, no browser download of its own);
# `make up` runs Debian's prometheus (with promtool, which checks deploy/prometheus/).
system-deps:
	@if ! command -v docker-registry >/dev/null || ! command -v skopeo >/dev/null \
		|| ! command -v dockerd >/dev/null || ! command -v chromium >/dev/null \
		|| ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null \
		|| ! { command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1; }; then \
		echo "installing docker-registry, skopeo, docker.io, docker-compose, chromium and prometheus (Debian packages)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
			docker-registry skopeo docker.io docker-compose chromium prometheus >/dev/null; \
	fi

$(VENV)/.synced: $(UV) uv.lock pyproject.toml */pyproject.toml services/*/pyproject.toml
	$(UV) sync --all-packages --locked
	@touch $@

setup: system-deps $(VENV)/.synced

up: setup
	$(BIN)/python -m edgeloop.devstack.up

demo: setup
	$(BIN)/python -m examples.demo

# The secrets `docker compose up` mounts (and `make up` uses): .edgeloop/, generated once.
keys: setup
	$(BIN)/python -m edgeloop.devstack.keys

down:
	$(BIN)/python -m edgeloop.devstack.down

status: setup
	$(BIN)/edgeloop status

lint: $(VENV)/.synced
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(VENV)/.synced
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Two workers (pytest-xdist), a test module each at a time: most tests wait on servers and
# processes of their own (every worker starts its own NATS, PostgreSQL and registry on
# free ports), so two cores run two modules at once.
test: setup lint
	$(BIN)/pytest -n 2 --dist loadfile

test-fast: setup
	$(BIN)/pytest -x -q

# The full NATS chaos run: 30,000 numbered events while a node of a 3-node cluster dies
# every 1-3 s (`make test` runs the 3,000-event version; EDGELOOP_CHAOS_SEED repeats
# one), then the whole demo loop on the cluster with 2 replicas of every service, a node
# and PostgreSQL killed on the way.
chaos: setup
	$(BIN)/pytest -m chaos -s services/kit/tests/test_nats_chaos.py tests/test_cluster_loop.py

# The full fuzz runs: 10,000 gRPC frames at the gateway and 10,000 malformed events at each
# service's bus consumers (`make test` runs short versions). EDGELOOP_FUZZ_SEED repeats one.
fuzz: setup
	$(BIN)/pytest -m fuzz -s tests/test_fuzz_gateway.py tests/test_fuzz_consumers.py

bench: setup
	$(BIN)/python -m bench $(ARGS)

proto: $(VENV)/.synced
	PATH=$(abspath $(BIN)):$$PATH bash scripts/gen_proto.sh

clean:
	rm -rf $(VENV) $(TOOLS) .mypy_cache .ruff_cache .pytest_cache
