"""The sender room's Prometheus metrics, in one list (README, "Metrics")."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

PARTS_SENT = Counter("imbot_sender_parts_total", "Reply parts by outcome", ["outcome"])

UNCERTAIN_PARTS = Counter(
    "imbot_sender_uncertain_parts_total",
    "Parts sent again although Easemob may already have shown them, by cause: a claim"
    " never resolved (a sender died between Easemob's answer and the ledger commit) or"
    " an answer lost on the way (timeout, dropped connection)",
    ["cause"],
)

PACING_WAIT = Histogram(
    "imbot_easemob_pacing_wait_seconds",
    "Time a send waited for the Easemob rate limit (queueing included)",
    buckets=(0.0, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

REQUESTS = Counter(
    "imbot_easemob_requests_total",
    "Easemob REST calls by endpoint (token, users, chatgroups, chatrooms, chatfiles, "
    "stream_user, stream_chatgroup) and "
    "status class",
    ["endpoint", "status_class"],
)

REQUEST_SECONDS = Histogram(
    "imbot_easemob_request_seconds",
    "Easemob REST call latency",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

TOKEN_REFRESHES = Counter(
    "imbot_easemob_token_refreshes_total", "App tokens fetched, by cause", ["cause"]
)
