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

STREAM_FIRST_CHUNK = Histogram(
    "imbot_stream_first_chunk_seconds",
    "From the callback at the gateway to the first chunk of a streamed answer accepted"
    " by Easemob: when the user starts reading",
    buckets=(0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13, 20, 30, 60),
)
STREAM_CHUNKS = Counter(
    "imbot_stream_chunks_total",
    "Records of answers being written at the sender, by outcome: sent (a chunk Easemob"
    " accepted), stale (nothing new), closed (the stream had finished), diverged (not the"
    " text the stream shows), claimed_elsewhere, failed, sandboxed, typing, typing_failed",
    ["outcome"],
)
STREAMS_STARTED = Counter(
    "imbot_streams_started_total", "Stream messages opened (their first chunk accepted)"
)
STREAMS_FINISHED = Counter(
    "imbot_streams_finished_total",
    "Stream messages finished, by reason: the reply's kind (answer, blocked_output,"
    " fallback, …), diverged (another answer than the one streamed), closed_by_easemob"
    " (the rest went as a normal message)",
    ["reason"],
)
for _outcome in (
    "sent",
    "stale",
    "closed",
    "diverged",
    "claimed_elsewhere",
    "failed",
    "sandboxed",
    "typing",
    "typing_failed",
):
    STREAM_CHUNKS.labels(_outcome)
for _reason in (
    "answer",
    "blocked_output",
    "fallback",
    "diverged",
    "closed_by_easemob",
    "uncertain",
):
    STREAMS_FINISHED.labels(_reason)
