"""The pipeline's pulse for the overview: rates, work in flight, lag, DLQ, callbacks.

From Prometheus when ``IMBOT_PROMETHEUS_URL`` is set (instant queries), else from the
services' own ``/metrics`` pages (``IMBOT_CONSOLE_METRICS_URLS``), parsed with
``prometheus_client.parser``: two scrapes a few seconds apart give the rates. A sampler
in the app reads it every few seconds and keeps the last half hour, so a page never
waits for a service: it shows the latest sample and plots the kept ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("imbot.console")

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]

EASEMOB_BUDGET_MS = 200.0  # Easemob waits this long for the before-send callback
P99_WINDOW_S = 300.0  # the callback p99 is over the last five minutes, as the dashboard's


@dataclass(frozen=True)
class Pulse:
    """One reading of the pipeline; empty mappings when the source had nothing yet."""

    at: float
    stage_rates: Mapping[str, float] = field(default_factory=dict)  # records/s by stage
    in_flight: Mapping[str, float] = field(default_factory=dict)
    lag: Mapping[str, float] = field(default_factory=dict)
    dlq: Mapping[str, float] = field(default_factory=dict)  # records by stage (counters)
    callbacks: Mapping[str, float] = field(default_factory=dict)  # answers/s by outcome
    callback_p99_ms: float | None = None
    circuits: tuple[str, ...] = ()  # models whose circuit is not closed
    source: str = ""
    problems: tuple[str, ...] = ()  # sources that did not answer (no user data)


class PulseSource(Protocol):
    async def read(self, http: aiohttp.ClientSession) -> Pulse: ...


def _by(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (metric, labels), value in samples.items():
        if metric == name:
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0.0) + value
    return out


def quantile(buckets: Mapping[float, float], q: float) -> float | None:
    """``histogram_quantile`` over cumulative bucket counts (upper bound → count)."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            span = count - lower_count
            share = (rank - lower_count) / span if span else 1.0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


def parse_samples(texts: Iterable[str]) -> Samples:
    """Every sample of every page, summed over the pages (several workers' figures add)."""
    samples: Samples = {}
    for page in texts:
        for family in text_string_to_metric_families(page):
            for s in family.samples:
                key = (s.name, frozenset(s.labels.items()))
                samples[key] = samples.get(key, 0.0) + float(s.value)
    return samples


def _rates(now: Samples, before: Samples, dt: float, name: str, label: str) -> dict[str, float]:
    current, earlier = _by(now, name, label), _by(before, name, label)
    # A counter that went down was reset (a restart): its new value is what happened since.
    return {
        k: max(0.0, (v - earlier.get(k, 0.0)) if v >= earlier.get(k, 0.0) else v) / dt
        for k, v in current.items()
    }


def _lag(pages: Iterable[Samples]) -> dict[str, float]:
    """Every replica reports its group's lag per partition: one figure per partition (the
    largest of the pages'), summed by stage."""
    per_partition: dict[tuple[str, str], float] = {}
    for samples in pages:
        for (metric, labels), value in samples.items():
            if metric == "imbot_consumer_lag":
                d = dict(labels)
                key = (d.get("stage", ""), d.get("partition", ""))
                per_partition[key] = max(per_partition.get(key, 0.0), value)
    out: dict[str, float] = {}
    for (stage, _), value in per_partition.items():
        out[stage] = out.get(stage, 0.0) + value
    return out


def _p99_ms(now: Samples, before: Samples) -> float | None:
    name = "imbot_gateway_callback_seconds_bucket"
    buckets: dict[float, float] = {}
    for (metric, labels), value in now.items():
        if metric == name:
            le = float(dict(labels)["le"])
            buckets[le] = buckets.get(le, 0.0) + value - before.get((metric, labels), 0.0)
    p99 = quantile(buckets, 0.99)
    return None if p99 is None else p99 * 1000


class ScrapeSource:
    """The services' own /metrics pages, scraped by the console itself."""

    def __init__(self, urls: Iterable[str], timeout_s: float) -> None:
        self._urls = list(urls)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        # The readings of the last P99_WINDOW_S: rates against the previous one, the
        # callback p99 against the oldest (a few seconds hold too few callbacks).
        self._kept: deque[tuple[float, Samples]] = deque()

    async def _page(self, http: aiohttp.ClientSession, url: str) -> str | None:
        try:
            async with http.get(url, timeout=self._timeout) as response:
                response.raise_for_status()
                return await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def read(self, http: aiohttp.ClientSession) -> Pulse:
        now = time.time()
        pages = await asyncio.gather(*(self._page(http, u) for u in self._urls))
        problems = tuple(u for u, p in zip(self._urls, pages, strict=True) if p is None)
        each = [parse_samples([p]) for p in pages if p is not None]
        samples: Samples = {}
        for page_samples in each:
            for key, value in page_samples.items():
                samples[key] = samples.get(key, 0.0) + value
        before_at, before = self._kept[-1] if self._kept else (now, samples)
        oldest = self._kept[0][1] if self._kept else {}
        self._kept.append((now, samples))
        while self._kept and self._kept[0][0] < now - P99_WINDOW_S:
            self._kept.popleft()
        dt = now - before_at
        if dt <= 0:  # the first reading: no rates yet
            before, dt = samples, 1.0
        circuits = _by(samples, "imbot_model_circuit_state", "model")
        return Pulse(
            at=now,
            stage_rates=_rates(samples, before, dt, "imbot_stage_messages_total", "stage"),
            in_flight=_by(samples, "imbot_stage_in_flight", "stage"),
            lag=_lag(each),
            dlq=_by(samples, "imbot_dlq_records_total", "stage"),
            callbacks=_rates(samples, before, dt, "imbot_gateway_callbacks_total", "outcome"),
            callback_p99_ms=_p99_ms(samples, oldest),
            circuits=tuple(sorted(m for m, state in circuits.items() if state > 0)),
            source=f"{len(self._urls) - len(problems)} of {len(self._urls)} /metrics pages",
            problems=problems,
        )


_QUERIES: Mapping[str, str] = {
    "stage_rates": "sum by (stage) (rate(imbot_stage_messages_total[1m]))",
    "in_flight": "sum by (stage) (imbot_stage_in_flight)",
    "lag": "sum by (stage) (max by (stage, partition) (imbot_consumer_lag))",
    "dlq": "sum by (stage) (imbot_dlq_records_total)",
    "callbacks": "sum by (outcome) (rate(imbot_gateway_callbacks_total[1m]))",
    "p99": "histogram_quantile(0.99,"
    " sum by (le) (rate(imbot_gateway_callback_seconds_bucket[5m])))",
    "circuits": "max by (model) (imbot_model_circuit_state) > 0",
}


class PrometheusSource:
    """Instant queries to a Prometheus that scrapes the services."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self._url = url.rstrip("/") + "/api/v1/query"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def _query(self, http: aiohttp.ClientSession, promql: str) -> list[Any] | None:
        try:
            async with http.get(
                self._url, params={"query": promql}, timeout=self._timeout
            ) as response:
                response.raise_for_status()
                body = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        result = body.get("data", {}).get("result")
        return result if isinstance(result, list) else None

    async def read(self, http: aiohttp.ClientSession) -> Pulse:
        names = list(_QUERIES)
        answers = await asyncio.gather(*(self._query(http, _QUERIES[n]) for n in names))
        got = dict(zip(names, answers, strict=True))

        def by(name: str, label: str) -> dict[str, float]:
            return {str(r["metric"].get(label, "")): float(r["value"][1]) for r in got[name] or []}

        p99 = by("p99", "")
        p99_s = next(iter(p99.values()), None)
        return Pulse(
            at=time.time(),
            stage_rates=by("stage_rates", "stage"),
            in_flight=by("in_flight", "stage"),
            lag=by("lag", "stage"),
            dlq=by("dlq", "stage"),
            callbacks=by("callbacks", "outcome"),
            callback_p99_ms=None if p99_s is None or p99_s != p99_s else p99_s * 1000,
            circuits=tuple(sorted(by("circuits", "model"))),
            source="Prometheus",
            problems=("Prometheus",) if all(a is None for a in answers) else (),
        )


class PulseHistory:
    """The sampler: reads the source every ``every_s`` and keeps ``keep`` readings."""

    def __init__(self, source: PulseSource, *, every_s: float = 5.0, keep: int = 360) -> None:
        self._source = source
        self._every_s = every_s
        self.readings: deque[Pulse] = deque(maxlen=keep)

    @property
    def latest(self) -> Pulse:
        return self.readings[-1] if self.readings else Pulse(at=time.time(), source="starting")

    async def run(self, http: aiohttp.ClientSession) -> None:
        while True:
            try:
                self.readings.append(await self._source.read(http))
            except Exception:
                # A reading must never stop the sampler: the page says the source is stale.
                log.exception("reading the pipeline's metrics failed")
            await asyncio.sleep(self._every_s)


def source_of(prometheus_url: str, urls: Iterable[str], timeout_s: float) -> PulseSource:
    if prometheus_url:
        return PrometheusSource(prometheus_url, timeout_s)
    return ScrapeSource(urls, timeout_s)


@contextlib.asynccontextmanager
async def sampling(history: PulseHistory) -> Any:
    async with aiohttp.ClientSession() as http:
        task = asyncio.create_task(history.run(http))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
