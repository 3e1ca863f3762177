"""Kafka plumbing shared by every service: client settings, topics, producers.

Development and the tests run an embedded Tansu broker (``devtools.broker``);
production points ``IMBOT_KAFKA_BOOTSTRAP`` at a real cluster. Tansu's known
defects (see the embedded-kafka reference) are worked around here, and only when
``Settings.kafka_embedded`` is true:

* end offsets are wrong for batches of more than one record → producers send
  one record per batch (``max_batch_size=1``);
* fetch long-polls are not woken by new data → consumers use a short
  ``fetch_max_wait_ms``;
* the first group join waits half the session timeout → short group timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from imbot.core import topics as topic_names
from imbot.core.settings import Settings

log = logging.getLogger("imbot.kafka")


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    """What every aiokafka client needs to reach the cluster: the bootstrap servers and,
    for a secured cluster, TLS (the cluster's CA) and SASL credentials."""
    kwargs: dict[str, Any] = {"bootstrap_servers": settings.kafka_bootstrap}
    if settings.kafka_security_protocol != "PLAINTEXT":
        kwargs["security_protocol"] = settings.kafka_security_protocol
    if settings.kafka_tls:
        kwargs["ssl_context"] = ssl_context(settings)
    if settings.kafka_sasl:
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = settings.kafka_sasl_username
        kwargs["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return kwargs


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """A client TLS context trusting the cluster's CA (or the system's when none is set)."""
    cafile = str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
    context: ssl.SSLContext = create_ssl_context(cafile=cafile)
    return context


def producer_kwargs(settings: Settings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        **connection_kwargs(settings),
        "acks": "all",
        "enable_idempotence": settings.kafka_idempotent_producer,
        "linger_ms": 0,
        "request_timeout_ms": 10_000,
    }
    if settings.single_record_batches:
        # Tansu reports wrong end offsets for multi-record batches.
        kwargs["max_batch_size"] = 1
    return kwargs


def consumer_kwargs(settings: Settings) -> dict[str, Any]:
    kwargs: dict[str, Any] = connection_kwargs(settings)
    if settings.kafka_embedded:
        kwargs["fetch_max_wait_ms"] = settings.consumer_fetch_max_wait_ms
    return kwargs


def new_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(**producer_kwargs(settings))


async def ensure_topics(
    settings: Settings, bases: Iterable[str] = (*topic_names.ALL, *topic_names.TOOLS)
) -> None:
    """Create the pipeline's and the operator tools' topics (idempotent)."""
    admin = AIOKafkaAdminClient(**connection_kwargs(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(
                name=settings.topic(base),
                num_partitions=settings.topic_partitions,
                replication_factor=settings.topic_replication,
            )
            for base in bases
            if settings.topic(base) not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
    finally:
        await admin.close()


async def broker_reachable(settings: Settings, timeout: float = 2.0) -> bool:
    """True when an admin client can list topics within ``timeout`` seconds."""
    admin = AIOKafkaAdminClient(
        **connection_kwargs(settings), request_timeout_ms=int(timeout * 1000)
    )
    try:
        await asyncio.wait_for(admin.start(), timeout)
        await asyncio.wait_for(admin.list_topics(), timeout)
        return True
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
