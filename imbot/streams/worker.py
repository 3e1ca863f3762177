"""Runs stages as Faust agents: ``imbot worker [--stage …]`` and ``imbot sender``.

Each stage is one agent on its input topic. Every record goes through
``KeyedLanes`` (concurrency across conversations, order within one, ack after
done) and the ``Boundary`` (retries, DLQ, fallback reply). The stages of one
process share one output producer, one database engine, one model catalog. Which
stages exist, what they read and what they need comes from ``streams.pipeline``;
a worker opens only the resources its stages' rows name.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, cast

import faust

from imbot.core.errors import ConfigurationError
from imbot.core.kafka import ensure_topics, new_producer
from imbot.core.settings import Settings
from imbot.streams.boundary import Boundary, Outputs
from imbot.streams.faust_app import StageApp, StageConsumer, create_app
from imbot.streams.health import LagReporter, serve
from imbot.streams.lanes import KeyedLanes
from imbot.streams.metrics import BUDGET_DAILY_COST, IN_FLIGHT, known_stage_series
from imbot.streams.pipeline import PROCESSING_STAGES, SENDER_STAGES, Resource, needs_of
from imbot.streams.stages import STAGES, Resources

if TYPE_CHECKING:  # each loaded only by the workers whose stages need it
    from imbot.adapters import ModelCatalog
    from imbot.moderation import Moderator
    from imbot.sender.easemob import EasemobClient
    from imbot.sender.service import ReplySender
    from imbot.storage import Storage

log = logging.getLogger("imbot.worker")

__all__ = ["PROCESSING_STAGES", "Runtime", "build", "main"]

Closer = Callable[[], Awaitable[Any]]


async def _open_storage(runtime: Runtime) -> Storage:
    return await runtime.storage()


async def _open_moderator(runtime: Runtime) -> Moderator:
    from imbot.moderation import Moderator

    settings = runtime.settings
    return Moderator.from_config(settings.policy.moderation, base_dir=settings.policy_file.parent)


async def _open_catalog(runtime: Runtime) -> ModelCatalog:
    from imbot.adapters import build_catalog

    catalog = build_catalog(runtime.settings.policy.models)
    runtime.closers.append(catalog.aclose)
    return catalog


async def _open_sender(runtime: Runtime) -> ReplySender:
    from imbot.sender.service import ReplySender

    store = await runtime.storage()
    sender = ReplySender.from_settings(runtime.settings, store.deliveries)
    runtime.closers.append(sender.aclose)
    return sender


async def _open_easemob(runtime: Runtime) -> EasemobClient:
    from imbot.sender.easemob import EasemobClient

    s = runtime.settings
    client = EasemobClient(
        base_url=s.easemob_base_url,
        org=s.easemob_org,
        app=s.easemob_app,
        client_id=s.easemob_client_id,
        client_secret=s.easemob_client_secret.get_secret_value(),
        timeout=s.easemob_timeout_s,
    )
    runtime.closers.append(client.aclose)
    return client


# How each resource a row may name (``StageSpec.needs``) is opened, in this order.
OPENERS: dict[Resource, Callable[[Runtime], Awaitable[object]]] = {
    "storage": _open_storage,
    "moderator": _open_moderator,
    "catalog": _open_catalog,
    "sender": _open_sender,
    "easemob": _open_easemob,
}


class Runtime:
    """Resources of one worker process, opened on first use inside the event loop."""

    def __init__(self, settings: Settings, stages: Sequence[str]) -> None:
        self.settings = settings
        self.stages = tuple(stages)
        self._lock: asyncio.Lock | None = None
        self.resources: Resources | None = None
        self.outputs: Outputs | None = None
        self.closers: list[Closer] = []
        self._store: Storage | None = None

    async def ready(self) -> tuple[Resources, Outputs]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.resources is None or self.outputs is None:
                await self._open()
        assert self.resources is not None
        assert self.outputs is not None
        return self.resources, self.outputs

    async def storage(self) -> Storage:
        """The process's one database engine and repositories, shared by whoever needs them."""
        if self._store is None:
            from imbot.storage import open_storage

            self._store = await open_storage(self.settings.database_url)
            self.closers.append(self._store.close)
        return self._store

    async def open_resources(
        self, needs: Collection[Resource], outputs: Outputs | None = None
    ) -> Resources:
        """The parts ``needs`` names (opened by ``OPENERS``), and no other; the storage
        is opened once per process and shared (the sender writes its ledger there)."""
        parts: dict[str, Any] = {}
        for resource, opener in OPENERS.items():
            if resource in needs:
                parts[resource] = await opener(self)
        return Resources(self.settings, outputs=outputs, **parts)

    async def _open(self) -> None:
        settings = self.settings
        await ensure_topics(settings)
        producer = new_producer(settings)
        await producer.start()
        self.closers.append(producer.stop)
        self.outputs = Outputs(settings, producer)
        self.resources = await self.open_resources(needs_of(self.stages), self.outputs)
        log.info("worker ready", extra={"stages": list(self.stages)})

    async def close(self) -> None:
        for close in reversed(self.closers):
            try:
                await close()
            except Exception:
                log.exception("error while closing")
        self.closers.clear()


def consumer_group(settings: Settings, stages: Sequence[str]) -> str:
    """The consumer group of a worker running ``stages`` (KEDA's ScaledObjects name it).

    The sender keeps the group it had before it also ran the feedback row, so an upgrade
    does not read ``imbot.outbound`` again from its start."""
    if settings.worker_group:
        return settings.worker_group
    if tuple(stages) == PROCESSING_STAGES:
        return settings.topic("imbot-stages")
    if tuple(stages) == SENDER_STAGES:
        return settings.topic("imbot-send")
    return settings.topic("imbot-" + "-".join(stages))


def build(settings: Settings, stages: Sequence[str]) -> tuple[StageApp, Runtime]:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigurationError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    group = consumer_group(settings, stages)
    app = create_app(settings, group)
    runtime = Runtime(settings, stages)
    lag = LagReporter(settings, group, [(s, settings.topic(STAGES[s].input_topic)) for s in stages])
    budget = settings.policy.routing.tenant_quota.daily.cost
    if budget is not None:
        BUDGET_DAILY_COST.labels("tenant").set(budget)

    for stage_name in stages:
        stage_cls = STAGES[stage_name]
        known_stage_series(stage_name)
        topic = app.topic(settings.topic(stage_cls.input_topic), key_type=bytes, value_type=bytes)

        async def agent(stream: Any, stage_cls: Any = stage_cls) -> None:
            resources, outputs = await runtime.ready()
            boundary = Boundary(stage_cls.build(resources), outputs, settings)
            lanes = KeyedLanes(
                boundary,
                ledger=app.ledger,
                max_in_flight=settings.stage_max_in_flight,
                grace=settings.stage_revoke_grace_s,
                # Fail fast (streams.lanes): the worker exits non-zero, its supervisor
                # restarts it, and the record is redelivered.
                on_escape=app.fail_fast,
            )
            app.lanes.append(lanes)
            IN_FLIGHT.labels(stage_cls.name).set_function(lambda: lanes.in_flight)
            try:
                await lanes.consume(stream)
            finally:
                app.lanes.remove(lanes)

        app.agent(topic, name=f"imbot.stage.{stage_name}")(agent)

    @app.timer(settings.worker_lag_interval_s)  # type: ignore[untyped-decorator]
    async def _report_lag() -> None:
        await lag.report()

    @app.task  # type: ignore[untyped-decorator]
    async def _serve_http() -> None:
        if settings.worker_metrics_port:
            runtime.closers.insert(
                0, (await serve(settings, lambda: runtime.resources is not None)).cleanup
            )

    runtime.closers.append(lag.close)

    @app.on_before_shutdown.connect
    async def _close(app_: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        # Faust has stopped fetching. Work in flight gets the stop grace (the
        # partitions are still ours, so nobody else waits for it), the finished
        # prefix is committed, then the outputs close and the consumer leaves the
        # group (its partitions move at once, not after a session timeout).
        app.ledger.close()
        cut_short = await app.release_lanes(None, cancel=True, grace=settings.stage_stop_grace_s)
        await cast(StageConsumer, app.consumer).commit_now()
        log.info("worker stopping", extra={"cut_short": cut_short})
        await runtime.close()

    return app, runtime


async def _check_database(url: str) -> None:
    from imbot.storage import open_database

    store = await open_database(url)  # raises ConfigurationError when migrations are behind
    await store.close()


def main(settings: Settings, stages: Sequence[str]) -> None:
    # Refuse to start on an unmigrated database here, with a clear message and exit
    # code 2, not later inside an agent where Faust would restart it in a loop.
    asyncio.run(_check_database(settings.database_url))
    app, _ = build(settings, stages)
    # Logging is configured once, by ``core.logs.configure_logging`` (the CLI does it
    # before this runs): mode's Worker would otherwise replace the root handlers with
    # its own plain-text one, so every line came out twice (text and JSON, the JSON
    # one carrying mode's formatted "extra"). No spinner either: it writes to stdout.
    worker = faust.Worker(app, quiet=True, redirect_stdouts=False, override_logging=False)
    worker.spinner = None
    worker.execute_from_commandline()
