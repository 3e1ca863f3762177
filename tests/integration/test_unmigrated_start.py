"""Services refuse to start on a database whose schema is behind, with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("service", [["worker"], ["sender"]])
def test_a_service_refuses_an_unmigrated_database(tmp_path: Path, service: list[str]) -> None:
    env = {
        **os.environ,
        "IMBOT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/never-migrated.db",
        "IMBOT_KAFKA_BOOTSTRAP": "127.0.0.1:1",  # never reached: the check comes first
    }
    done = subprocess.run(
        [sys.executable, "-m", "imbot", *service],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "run `imbot migrate` first" in done.stderr


def test_migrate_check_says_whether_the_database_is_behind(tmp_path: Path) -> None:
    """``imbot migrate --check`` (an initContainer's or a deploy script's gate) applies
    nothing: exit 2 while behind, 0 once migrated."""
    env = {**os.environ, "IMBOT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/db.sqlite"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "imbot", "migrate", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    behind = run("--check")
    assert behind.returncode == 2
    assert "run `imbot migrate` first" in behind.stderr
    assert run().returncode == 0
    assert run("--check").returncode == 0
