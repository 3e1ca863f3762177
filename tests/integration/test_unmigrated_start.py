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
