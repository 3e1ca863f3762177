# imbot — two commands: `make dev` runs everything locally, `make test` checks everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test lint typecheck imports unit integration e2e bench chaos wrk clean deploy-check \
	deploy-policy promtool monitoring-check browser console-screenshots

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

# pytest's own exit status fails the target, 5 (no tests collected) included: a path that
# matches nothing is an error, not a pass. PYTEST_ARGS narrows a run (make unit PYTEST_ARGS=-x).
PYTEST := $(BIN)/pytest -q -p no:cacheprovider
PYTEST_ARGS ?=

# The import rules of ../shared/design.md (dependencies point inward), first and on their own.
imports: $(STAMP)
	$(PYTEST) tests/unit/test_import_rules.py

test: lint typecheck imports deploy-check monitoring-check browser
	$(PYTEST) $(PYTEST_ARGS)

# The Kubernetes manifests (deploy/), offline: every overlay rendered with kubectl >= 1.27
# (the tests say plainly when it is missing: IMBOT_SKIP_KUBECTL=1 skips only the rendering),
# every object validated against the Kubernetes and vendored CRD schemas, the YAML and the
# Dockerfile linted, the Deployments checked against the pipeline table.
deploy-check: $(STAMP)
	$(PYTEST) tests/unit/test_deploy_*.py

# The gateway benchmark's load generator: Debian's wrk, installed when missing and root.
wrk:
	@command -v wrk >/dev/null 2>&1 && exit 0; \
	if [ "$$(id -u)" = 0 ]; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y --no-install-recommends wrk \
	    || { apt-get update && apt-get install -y --no-install-recommends wrk; }; \
	else \
	  echo "wrk is missing (the gateway benchmark's load): sudo apt-get install -y wrk" >&2; \
	  exit 1; \
	fi

# The alerts and the dashboard (deploy/monitoring/): promtool checks the rules and runs their
# unit tests on synthetic series; every metric and label they name is checked against the code.
monitoring-check: $(STAMP) promtool
	$(PYTEST) tests/unit/test_monitoring.py

# promtool comes with Debian's prometheus package (only the tool is used). Installed when
# missing and root; otherwise says how. IMBOT_SKIP_PROMTOOL=1 skips the promtool checks.
promtool:
	@command -v promtool >/dev/null 2>&1 && exit 0; \
	if [ "$$IMBOT_SKIP_PROMTOOL" = 1 ]; then \
	  echo "promtool missing; IMBOT_SKIP_PROMTOOL=1: its checks are skipped"; exit 0; \
	fi; \
	if [ "$$(id -u)" = 0 ]; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y --no-install-recommends prometheus \
	    || { apt-get update && apt-get install -y --no-install-recommends prometheus; }; \
	else \
	  echo "promtool is missing. Install it with Debian's prometheus package:" >&2; \
	  echo "  sudo apt-get install -y --no-install-recommends prometheus" >&2; \
	  echo "or put a Prometheus release's promtool on PATH;" \
	    "IMBOT_SKIP_PROMTOOL=1 skips the checks." >&2; \
	  exit 1; \
	fi

# kustomize reads no file outside deploy/base: the default policy is copied there (a test
# fails when the copy is stale).
deploy-policy:
	{ echo '# generated from imbot/core/default_policy.yaml by `make deploy-policy`: do not edit'; \
	  cat imbot/core/default_policy.yaml; } > deploy/base/policy.yaml

unit: $(STAMP)
	$(PYTEST) tests/unit $(PYTEST_ARGS)

integration: $(STAMP)
	$(PYTEST) tests/integration $(PYTEST_ARGS)

e2e: $(STAMP) browser
	$(PYTEST) tests/e2e $(PYTEST_ARGS)

# The console's real-browser test (tests/e2e/test_console_browser.py): Debian's chromium (and
# CJK fonts, so Chinese text is readable in screenshots), driven by Playwright for Python
# (the `browser` extra) with its executable path set: Playwright's own browsers are never
# downloaded. Installed when missing and root; otherwise says how (the test then skips).
browser: $(STAMP)
	@if ! command -v chromium >/dev/null 2>&1 || ! fc-list :lang=zh 2>/dev/null | grep -q .; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y --no-install-recommends chromium fonts-noto-cjk \
	      || { apt-get update && apt-get install -y --no-install-recommends chromium fonts-noto-cjk; }; \
	  else \
	    echo "chromium is missing: sudo apt-get install -y --no-install-recommends chromium" \
	      "fonts-noto-cjk (the browser test skips without it)" >&2; \
	  fi; \
	fi
	@$(BIN)/python -c "import playwright" 2>/dev/null \
	  || $(BIN)/python -m pip install --quiet -e '.[dev,browser]'

# The console's screenshots (docs/img/console-*.png, docs/console.md), from the browser test.
console-screenshots: $(STAMP) browser
	IMBOT_SCREENSHOTS_DIR=docs/img $(PYTEST) tests/e2e/test_console_browser.py $(PYTEST_ARGS)

# The benchmarks' plots need matplotlib (the `bench` extra): installed once, again when
# pyproject.toml changes. `make test` does not need it.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# bench.pipeline (the realistic workload's latency-versus-rate curve) takes up to 50 minutes.
bench: $(STAMP) $(BENCH_STAMP) wrk
	$(BIN)/python -m bench.gateway
	$(BIN)/python -m bench.pipeline_floor
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.startup
	$(BIN)/python -m bench.adapters_overhead
	$(BIN)/python -m bench.moderation_throughput
	$(BIN)/python -m bench.pii_accuracy
	$(BIN)/python -m bench.sender_throughput
	$(BIN)/python -m bench.routing
	$(BIN)/python -m bench.quota

# Before a release: every stage and the sender at two replicas, replicas killed (SIGKILL and
# SIGTERM) and restarted at random under load, ten runs on fresh brokers and PostgreSQL
# databases; fails when an accepted message is lost or a whole reply is delivered twice.
# Writes the "Chaos" section of docs/benchmarks.md (tests/e2e/test_chaos.py is the short one).
chaos: $(STAMP)
	$(BIN)/python -m bench.chaos --messages 1000 --rate 25 --runs 10

clean:
	rm -rf $(VENV) .imbot .mypy_cache .ruff_cache
