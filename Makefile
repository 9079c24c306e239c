# Everything bootstraps its own virtualenv from scratch: nothing installed by hand is needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: run test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

## run: serve the demo on 127.0.0.1:8080 (admin on 127.0.0.1:9901) with embedded demo upstreams
run: $(STAMP)
	$(BIN)/python -m examples.demo --config config/gateway.yaml

## test: ruff, the import contracts, mypy --strict, and the whole pytest suite
test: $(STAMP) lint typecheck
	$(BIN)/pytest -n 2 -q

## lint: ruff, and the package layout's import contracts (lint-imports; docs/architecture.md)
lint: $(STAMP)
	$(BIN)/ruff check gateway tests load examples tools
	$(BIN)/ruff format --check gateway tests load examples tools
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy gateway examples tools

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

## bench: issue 13 scenarios, nginx + reference proxies + gateway side by side (QUICK=1: < 2 min)
bench: $(BENCH_STAMP)
	QUICK="$(QUICK)" bash load/bench.sh

.PHONY: profile load instructions corun

## instructions: CPU instructions per proxied request under callgrind (INSTR_ARGS="--path /profile/1")
instructions: $(BENCH_STAMP)
	bash load/instructions.sh $(INSTR_ARGS)

## corun: CPU per request of gateways loaded at once on one CPU (CORUN_ARGS="off=off 1pct=0.01")
corun: $(BENCH_STAMP)
	bash load/corun.sh $(CORUN_ARGS)

## profile: py-spy flame graph (SVG + raw) of the gateway under the simple-GET wrk load, top frames
profile: $(BENCH_STAMP)
	bash load/profile.sh

## load: locust, headless, against a running gateway (HOST=, USERS=, SPAWN_RATE=, DURATION=)
load: $(BENCH_STAMP)
	HOST="$(HOST)" USERS="$(USERS)" SPAWN_RATE="$(SPAWN_RATE)" DURATION="$(DURATION)" bash load/load.sh

.PHONY: screenshot

## screenshot: assets/status.png, the status page of the demo under traffic (Debian's headless chromium)
screenshot: $(STAMP)
	$(BIN)/python -m tests.browser.screenshot assets/status.png

.PHONY: soak

## soak: steady mixed load, upstream faults on and off; fails if RSS, fds, tasks or upstream connections keep growing (SOAK=60s; default 10m)
soak: $(BENCH_STAMP)
	SOAK="$(SOAK)" bash load/soak.sh

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
