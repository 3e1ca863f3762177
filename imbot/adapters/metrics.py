"""Prometheus metrics of model calls (module-level; one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CALLS = Counter(
    "imbot_model_calls_total",
    "Model call attempts by outcome (ok or the error class)",
    ["model", "provider", "outcome"],
)
TOKENS = Counter(
    "imbot_model_tokens_total", "Tokens billed by the provider", ["model", "direction"]
)
COST = Counter("imbot_model_cost_total", "Cost of model calls at list price", ["model", "currency"])
ERRORS = Counter(
    "imbot_model_errors_total",
    "Failed model call attempts by error class and reason",
    ["model", "provider", "kind", "reason"],
)
MODEL_SECONDS = Histogram(
    "imbot_model_latency_seconds",
    "Model call latency (request start to last byte) of successful attempts",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120),
)
CIRCUIT_STATE = Gauge(
    "imbot_model_circuit_state", "Circuit breaker state: 0 closed, 1 open, 2 half-open", ["model"]
)
MODEL_RETRIES = Counter("imbot_model_retries_total", "Retries after a retryable error", ["model"])
FALLBACKS = Counter(
    "imbot_model_fallbacks_total", "Calls that moved past this model to the next", ["model"]
)
