"""Runs stages as Faust agents: ``imbot worker [--stage …]`` and ``imbot sender``.

Each stage is one agent on its input topic. Every record goes through
``KeyedLanes`` (concurrency across conversations, order within one, ack after
done) and the ``Boundary`` (retries, DLQ, fallback reply). The stages of one
process share one output producer, one database engine, one model catalog.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import faust
from prometheus_client import start_http_server

from core.errors import ConfigurationError
from core.kafka import ensure_topics, new_producer
from core.settings import Settings
from streams.boundary import Boundary, Outputs
from streams.faust_app import StageApp, create_app
from streams.lanes import KeyedLanes
from streams.stages import STAGES, Context

log = logging.getLogger("imbot.worker")

PROCESSING_STAGES = ("moderate-in", "route", "model", "moderate-out")


class Runtime:
    """Resources of one worker process, opened on first use inside the event loop."""

    def __init__(self, settings: Settings, stages: Sequence[str]) -> None:
        self.settings = settings
        self.stages = tuple(stages)
        self._lock: asyncio.Lock | None = None
        self.ctx: Context | None = None
        self.outputs: Outputs | None = None
        self._closers: list[Any] = []

    async def ready(self) -> tuple[Context, Outputs]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.ctx is None or self.outputs is None:
                await self._open()
        assert self.ctx is not None
        assert self.outputs is not None
        return self.ctx, self.outputs

    async def _open(self) -> None:
        from storage import open_storage

        settings = self.settings
        policy = settings.policy
        await ensure_topics(settings)
        store = await open_storage(settings.database_url)
        self._closers.append(store.close)
        ctx = Context(settings=settings, policy=policy, store=store)
        if {"moderate-in", "moderate-out"} & set(self.stages):
            from moderation import Moderator

            ctx.moderator = Moderator.from_config(
                policy.moderation, base_dir=settings.policy_file.parent
            )
        if "model" in self.stages:
            from adapters import build_catalog

            ctx.catalog = build_catalog(policy.models)
            self._closers.append(ctx.catalog.aclose)
        if "send" in self.stages:
            from sender.service import ReplySender

            ctx.sender = ReplySender.from_settings(settings, store.deliveries)
            self._closers.append(ctx.sender.aclose)
        producer = new_producer(settings)
        await producer.start()
        self._closers.append(producer.stop)
        self.outputs = Outputs(settings, producer)
        self.ctx = ctx
        log.info("worker ready", extra={"stages": list(self.stages)})

    async def close(self) -> None:
        for close in reversed(self._closers):
            try:
                await close()
            except Exception:
                log.exception("error while closing")
        self._closers.clear()


def build(settings: Settings, stages: Sequence[str]) -> tuple[StageApp, Runtime]:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigurationError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    group = settings.worker_group or settings.topic(
        "imbot-stages" if tuple(stages) == PROCESSING_STAGES else "imbot-" + "-".join(stages)
    )
    app = create_app(settings, group)
    runtime = Runtime(settings, stages)

    for stage_name in stages:
        stage_cls = STAGES[stage_name]
        topic = app.topic(settings.topic(stage_cls.input_topic), key_type=bytes, value_type=bytes)

        async def agent(stream: Any, stage_cls: Any = stage_cls) -> None:
            ctx, outputs = await runtime.ready()
            boundary = Boundary(stage_cls(ctx), outputs, settings)
            lanes = KeyedLanes(
                boundary,
                max_in_flight=settings.stage_max_in_flight,
                grace=settings.stage_revoke_grace_s,
            )
            app.lanes.append(lanes)
            try:
                await lanes.consume(stream)
            finally:
                app.lanes.remove(lanes)

        app.agent(topic, name=f"imbot.stage.{stage_name}")(agent)

    @app.on_before_shutdown.connect
    async def _close(app_: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        # Faust has stopped fetching. Work in flight gets the stop grace (the
        # partitions are still ours, so nobody else waits for it), the finished
        # prefix is committed, then the outputs close and the consumer leaves the
        # group (its partitions move at once, not after a session timeout).
        cut_short = await app.release_lanes(None, cancel=True, grace=settings.stage_stop_grace_s)
        await app.consumer.commit()
        log.info("worker stopping", extra={"cut_short": cut_short})
        await runtime.close()

    return app, runtime


async def _check_database(url: str) -> None:
    from storage import open_database

    store = await open_database(url)  # raises ConfigurationError when migrations are behind
    await store.close()


def main(settings: Settings, stages: Sequence[str]) -> None:
    # Refuse to start on an unmigrated database here, with a clear message and exit
    # code 2, not later inside an agent where Faust would restart it in a loop.
    asyncio.run(_check_database(settings.database_url))
    app, _ = build(settings, stages)
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, addr=settings.gateway_host)
    # Logging is configured once, by ``core.logs.configure_logging`` (the CLI does it
    # before this runs): mode's Worker would otherwise replace the root handlers with
    # its own plain-text one, so every line came out twice (text and JSON, the JSON
    # one carrying mode's formatted "extra"). No spinner either: it writes to stdout.
    worker = faust.Worker(app, quiet=True, redirect_stdouts=False, override_logging=False)
    worker.spinner = None
    worker.execute_from_commandline()
