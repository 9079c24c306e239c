# Everything bootstraps its own virtualenv from scratch: nothing installed by hand is needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: serve the demo on 127.0.0.1:8080 (admin on 127.0.0.1:9901) with embedded demo upstreams
run: $(STAMP)
	$(BIN)/python -m gateway.demo --config config/gateway.yaml

## test: ruff, mypy --strict, and the whole pytest suite (unit + integration)
test: $(STAMP) lint typecheck
	$(BIN)/pytest -n 2 -q

lint: $(STAMP)
	$(BIN)/ruff check gateway tests load
	$(BIN)/ruff format --check gateway tests load

typecheck: $(STAMP)
	$(BIN)/mypy gateway

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

## bench: wrk against direct nginx, nginx as reverse proxy, and the gateway, side by side
bench: $(STAMP)
	bash load/bench.sh

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
