# Bulkhead: `make test` sets up everything it needs (Debian packages, .venv) and runs
# every suite. Targets are safe to run again.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test deps lint typecheck unit conformance collection-lint bench clean

test: deps lint typecheck unit conformance collection-lint

deps: $(STAMP)

$(STAMP): scripts/bootstrap.sh agent/pyproject.toml tests/requirements.txt
	bash scripts/bootstrap.sh
	touch $@

lint: deps
	cd agent && ../$(BIN)/ruff check src tests benchmarks

typecheck: deps
	cd agent && ../$(BIN)/mypy

unit: deps
	cd agent && ../$(BIN)/pytest

conformance: deps
	$(BIN)/bulkhead conformance run agent/tests/conformance/

collection-lint: deps
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/ansible-lint --profile production --offline

bench: deps
	$(BIN)/python agent/benchmarks/run.py

clean:
	rm -rf $(VENV) agent/src/*.egg-info tests/output .pytest_cache agent/.pytest_cache
