"""The overview's figures from the services' own /metrics pages: two real pages (two
"workers" with real prometheus_client registries) served over real HTTP, scraped twice."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from imbot.console.pulse import ScrapeSource, quantile


class Worker:
    """What one process exposes: the metrics the overview reads, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.processed = Counter(
            "imbot_stage_messages", "", ["stage", "outcome"], registry=self.registry
        )
        self.lag = Gauge("imbot_consumer_lag", "", ["stage", "partition"], registry=self.registry)
        self.dlq = Counter("imbot_dlq_records", "", ["stage", "reason"], registry=self.registry)
        self.callbacks = Counter("imbot_gateway_callbacks", "", ["outcome"], registry=self.registry)
        self.seconds = Histogram(
            "imbot_gateway_callback_seconds",
            "",
            ["outcome"],
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
            registry=self.registry,
        )

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")


@pytest.fixture
async def workers() -> AsyncIterator[tuple[list[Worker], list[str]]]:
    served = [Worker(), Worker()]
    runners, urls = [], []
    for worker in served:
        app = web.Application()
        app.router.add_get("/metrics", worker.page)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{port}/metrics")
    yield served, urls
    for runner in runners:
        await runner.cleanup()


async def test_rates_lag_dlq_and_p99_add_up_over_the_pages(
    workers: tuple[list[Worker], list[str]],
) -> None:
    (a, b), urls = workers
    source = ScrapeSource([*urls, "http://127.0.0.1:9/metrics"], timeout_s=1.0)
    async with aiohttp.ClientSession() as http:
        first = await source.read(http)
        assert first.problems == ("http://127.0.0.1:9/metrics",)  # a dead page is named
        assert first.source == "2 of 3 /metrics pages"
        for _ in range(30):
            a.processed.labels("route", "ok").inc()
            b.processed.labels("route", "ok").inc()
        a.processed.labels("model", "ok").inc(10)
        # Every replica reports its group's lag per partition: counted once.
        for worker in (a, b):
            worker.lag.labels("model", "0").set(7)
            worker.lag.labels("model", "1").set(5)
        b.dlq.labels("send", "not_found").inc()
        for _ in range(98):
            a.callbacks.labels("published").inc()
            a.seconds.labels("published").observe(0.004)
        for _ in range(2):
            b.callbacks.labels("published").inc()
            b.seconds.labels("published").observe(0.3)
        second = await source.read(http)
    elapsed = second.at - first.at
    assert second.stage_rates["route"] == pytest.approx(60 / elapsed)
    assert second.stage_rates["model"] == pytest.approx(10 / elapsed)
    assert second.lag == {"model": 12.0}
    assert second.dlq == {"send": 1.0}
    assert second.callbacks["published"] == pytest.approx(100 / elapsed)
    # 98 answers under 5 ms and 2 above 200 ms: the p99 is past Easemob's budget.
    assert second.callback_p99_ms is not None
    assert 200 < second.callback_p99_ms <= 500


def test_quantile_interpolates_inside_the_bucket_like_prometheus() -> None:
    buckets = {0.1: 50.0, 0.2: 100.0, float("inf"): 100.0}
    assert quantile(buckets, 0.5) == pytest.approx(0.1)
    assert quantile(buckets, 0.75) == pytest.approx(0.15)
    assert quantile({0.1: 0.0, float("inf"): 0.0}, 0.99) is None
