"""`imbot dev` killed with SIGKILL takes its broker, services and simulator with it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from imbot.devtools.broker import EmbeddedBroker


def _alive(pid: int) -> bool:
    """Running (an exited child not yet reaped by its new parent counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_gone(pids: dict[str, int], timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = {name: pid for name, pid in pids.items() if _alive(pid)}
        if not alive:
            return {}
        time.sleep(0.1)
    return alive


def _wait_state(state: Path, wanted: set[str], proc: subprocess.Popen[bytes]) -> dict[str, int]:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the supervisor exited early"
        with contextlib.suppress(FileNotFoundError, ValueError):
            pids: dict[str, int] = json.loads(state.read_text())["pids"]
            if wanted <= set(pids):
                return pids
        time.sleep(0.2)
    raise AssertionError(f"no pids of {sorted(wanted)} in {state}")


def _kill_all(pids: dict[str, int]) -> None:
    """Clean up after a failed assertion: the processes this test caused to start."""
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_imbot_dev_ends_every_child(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMBOT_")}
    env["PYTHONUNBUFFERED"] = "1"
    log = (tmp_path / "dev.out").open("wb")
    dev = subprocess.Popen(
        [sys.executable, "-m", "imbot", "dev"],
        cwd=tmp_path,  # its .imbot/ (database, logs, state) goes here
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    pids: dict[str, int] = {}
    try:
        wanted = {"broker", "simulator", "gateway", "worker", "sender", "console"}
        pids = _wait_state(tmp_path / ".imbot" / "dev.json", wanted, dev)
        deadline = time.monotonic() + 90
        while b"imbot is running" not in (tmp_path / "dev.out").read_bytes():
            assert dev.poll() is None, (tmp_path / "dev.out").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert all(_alive(pid) for pid in pids.values())

        dev.kill()
        dev.wait()

        assert _wait_gone(pids, timeout=15) == {}
    finally:
        dev.kill()
        dev.wait()
        log.close()
        _kill_all(pids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_services_started_off_the_main_thread_end_with_their_parent(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """Where PR_SET_PDEATHSIG cannot be used, each service's parent watch stops it."""
    script = textwrap.dedent(
        f"""
        import threading, time
        from pathlib import Path
        from imbot.cli.devstack import DevStack

        root = Path({str(tmp_path)!r})
        stack = DevStack(
            env={{
                "IMBOT_KAFKA_BOOTSTRAP": {broker.bootstrap!r},
                "IMBOT_KAFKA_EMBEDDED": "true",
                "IMBOT_TOPIC_PREFIX": "sup{os.getpid()}.",
                "IMBOT_TOPIC_PARTITIONS": "2",
                "IMBOT_DATABASE_URL": f"sqlite+aiosqlite:///{{root}}/imbot.db",
            }},
            log_dir=root / "logs",
            state_file=root / "dev.json",
        )
        starter = threading.Thread(target=stack.start)
        starter.start()
        starter.join()
        time.sleep(3600)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMBOT_")}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)
    pids: dict[str, int] = {}
    try:
        pids = _wait_state(tmp_path / "dev.json", {"simulator", "gateway", "worker"}, parent)
        time.sleep(1)  # the services are importing their modules
        assert all(_alive(pid) for pid in pids.values())

        parent.kill()
        parent.wait()

        assert _wait_gone(pids, timeout=15) == {}
    finally:
        parent.kill()
        parent.wait()
        _kill_all(pids)
