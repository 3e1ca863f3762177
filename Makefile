# imbot — two commands: `make dev` runs everything locally, `make test` checks everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test lint typecheck unit bench clean

# (Re)install when pyproject.toml changes; works from a fresh clone with only python3.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/imbot dev

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python -m bench.gateway
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.startup
	$(BIN)/python -m bench.adapters_overhead
	$(BIN)/python -m bench.moderation_throughput
	$(BIN)/python -m bench.pii_accuracy
	$(BIN)/python -m bench.sender_throughput

clean:
	rm -rf $(VENV) .imbot .mypy_cache .ruff_cache
