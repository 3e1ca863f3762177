"""The whole system as real processes: simulator, gateway, stage worker, sender."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from imbot.cli.devstack import DevStack
from imbot.core.settings import DEFAULT_POLICY_FILE
from imbot.devtools.broker import EmbeddedBroker


@pytest.fixture(scope="package", params=["sqlite", "postgresql"])
def stack(
    request: pytest.FixtureRequest, broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DevStack]:
    root: Path = tmp_path_factory.mktemp("stack")
    if request.param == "sqlite":
        db_url = f"sqlite+aiosqlite:///{root}/imbot.db"
    else:
        db_url = str(request.getfixturevalue("pg_url"))
    # Whole replies: these tests count messages at the simulated Easemob (an answer
    # streamed as it is written has its own stack, test_streaming.py).
    policy = yaml.safe_load(DEFAULT_POLICY_FILE.read_text(encoding="utf-8"))
    policy["streaming"] = {"enabled": False, "typing": False}
    with running_stack(
        root, broker, db_url, policy, prefix="e", env={"IMBOT_STAGE_DEADLINE_S": "20"}
    ) as dev:
        yield dev


@contextlib.contextmanager
def running_stack(
    root: Path,
    broker: EmbeddedBroker,
    db_url: str,
    policy: dict[str, Any],
    *,
    prefix: str,
    console: bool = True,
    env: dict[str, str] | None = None,
) -> Iterator[DevStack]:
    """The whole system on ``broker`` and ``db_url`` with ``policy``, topics under a prefix
    of its own (starting with ``prefix``), ready; stopped afterwards."""
    policy_file = root / "policy.yaml"
    policy_file.write_text(yaml.safe_dump(policy, allow_unicode=True), encoding="utf-8")
    dev = DevStack(
        console=console,
        env={
            "IMBOT_POLICY_FILE": str(policy_file),
            "IMBOT_KAFKA_BOOTSTRAP": broker.bootstrap,
            "IMBOT_KAFKA_EMBEDDED": "true",
            "IMBOT_TOPIC_PREFIX": f"{prefix}{uuid.uuid4().hex[:6]}.",
            "IMBOT_TOPIC_PARTITIONS": "3",
            "IMBOT_DATABASE_URL": db_url,
            "IMBOT_CALLBACK_SECRETS": "e2e-secret",
            **(env or {}),
        },
        log_dir=root / "logs",
        state_file=root / "dev.json",
    )
    dev.start()
    try:
        dev.wait_ready(timeout=60)
        yield dev
    finally:
        dev.stop()
