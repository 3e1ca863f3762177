"""Everything on one machine: embedded broker, SQLite, simulator, gateway, workers.

Used by ``imbot dev``, by the end-to-end tests and by the start-up benchmark, so
all three run the same processes the same way. Each service is a real child
process (``python -m imbot …``) configured only through ``IMBOT_`` variables,
exactly as on Kubernetes.

The children end with the process that started them, even when it is killed with
SIGKILL (``imbot dev`` killed by an IDE or an OOM killer used to leave the broker,
gateway, workers, sender and simulator running as orphans, holding ports). Two
mechanisms, because neither covers every case:

* ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` (``devtools.processes.ends_with_parent``): the kernel
  signals the child the moment its parent dies. Linux only, and tied to the thread
  that spawned the child, so it is used only when spawning from the main thread. It
  is the only mechanism for the broker (a Rust binary we cannot change).
* every Python child runs under a small launcher (``_LAUNCHER``) whose daemon thread
  watches ``os.getppid()`` against ``IMBOT_PARENT_PID`` and sends the child SIGTERM
  (its normal graceful stop) once the parent is gone, then exits hard 10 s later.
  Portable (macOS, threads), at the cost of polling twice a second.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from imbot.devtools.broker import EmbeddedBroker
from imbot.devtools.processes import ends_with_parent, free_port
from imbot.storage import upgrade

STATE_FILE = Path(".imbot/dev.json")

# Runs ``python -c _LAUNCHER -m <module> <args…>`` as ``python -m <module> <args…>``
# with a thread that stops the process when its parent (IMBOT_PARENT_PID) is gone.
_LAUNCHER = """
import os, runpy, signal, sys, threading, time
def watch(parent):
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    os._exit(1)
parent = int(os.environ.get("IMBOT_PARENT_PID") or 0)
if parent:
    threading.Thread(target=watch, args=(parent,), name="imbot-parent", daemon=True).start()
module = sys.argv[2]
sys.argv[:] = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _port_or_free(preferred: int) -> int:
    """``preferred`` when nothing listens there, else any free port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


@dataclass
class DevStack:
    """Starts and stops the whole system. ``env`` overrides come on top of os.environ."""

    env: dict[str, str] = field(default_factory=dict)
    log_dir: Path = Path(".imbot/logs")
    gateway_port: int = 0
    simulator_port: int = 0
    secret: str = "dev-callback-secret"
    state_file: Path = STATE_FILE
    usual_ports: bool = False  # gateway on 8080 and simulator on 8090 when they are free
    # Where the services run (their `import cli` comes from here first): a benchmark
    # runs an older checkout side by side. None: this process's working directory.
    cwd: Path | None = None
    broker: EmbeddedBroker | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Each worker's and the sender's Prometheus port (IMBOT_WORKER_METRICS_PORT per
    # process: two processes on one port would stop the second).
    metrics_ports: dict[str, int] = field(default_factory=dict)
    # The operator console (docs/console.md): whether it runs (benchmarks leave it out:
    # it scrapes every /metrics page every few seconds), its port, development logins.
    console: bool = True
    console_port: int = 0
    console_token: str = ""  # an operator's
    console_viewer_token: str = ""
    _args: dict[str, list[str]] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)
    _metrics_base: int = 0

    def base_env(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        if "IMBOT_KAFKA_BOOTSTRAP" not in env:
            if self.broker is None:
                self.broker = EmbeddedBroker()
                self.broker.start()
            env["IMBOT_KAFKA_BOOTSTRAP"] = self.broker.bootstrap
            env["IMBOT_KAFKA_EMBEDDED"] = "true"
        self.gateway_port = self.gateway_port or int(env.get("IMBOT_GATEWAY_PORT") or 0)
        if not self.gateway_port:
            self.gateway_port = _port_or_free(8080) if self.usual_ports else free_port()
        if not self.simulator_port:
            self.simulator_port = _port_or_free(8090) if self.usual_ports else free_port()
        env["IMBOT_GATEWAY_PORT"] = str(self.gateway_port)
        # IMBOT_WORKER_METRICS_PORT, when set, is the first of the ports the stage
        # processes get one each (the worker's, then the sender's, …); else usual ports
        # from 9101 when free (`imbot dev`), free ones otherwise.
        self._metrics_base = int(env.pop("IMBOT_WORKER_METRICS_PORT", "") or 0)
        env.setdefault("IMBOT_CALLBACK_SECRETS", self.secret)
        self.secret = env["IMBOT_CALLBACK_SECRETS"].split(",")[0].strip()
        env.setdefault("IMBOT_DATABASE_URL", "sqlite+aiosqlite:///./.imbot/imbot.db")
        env.setdefault("IMBOT_EASEMOB_BASE_URL", f"http://127.0.0.1:{self.simulator_port}")
        env.setdefault("IMBOT_EASEMOB_CLIENT_ID", "dev-client")
        env.setdefault("IMBOT_EASEMOB_CLIENT_SECRET", "dev-client-secret")
        env.setdefault("IMBOT_EASEMOB_ORG", "demo-org")
        env.setdefault("IMBOT_EASEMOB_APP", "demo-app")
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.env = env
        return env

    @property
    def callback_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}/easemob/callback"

    @property
    def simulator_url(self) -> str:
        return f"http://127.0.0.1:{self.simulator_port}"

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        """Start ``python <args>`` (``args`` begins with ``-m module``) as service ``name``."""
        assert args[0] == "-m", args
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = (self.log_dir / f"{name}.log").open("ab")
        self._logs.append(out)
        self._args[name] = args
        extra = {"IMBOT_PARENT_PID": str(os.getpid())}
        if args[2:3] in (["worker"], ["sender"]):
            extra["IMBOT_WORKER_METRICS_PORT"] = str(self._metrics_port(name))
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, *args],
            env={**env, **extra},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=self.cwd,
            start_new_session=True,  # Ctrl-C in the terminal reaches `imbot dev` only
            preexec_fn=ends_with_parent(),  # only prctl after fork: no locks, no imports
        )

    def _metrics_port(self, name: str) -> int:
        """The service's own metrics port, kept across its restarts."""
        if name not in self.metrics_ports:
            if self._metrics_base:
                port = self._metrics_base + len(self.metrics_ports)
            elif self.usual_ports:
                port = _port_or_free(9101 + len(self.metrics_ports))
            else:
                port = free_port()
            self.metrics_ports[name] = port
        return self.metrics_ports[name]

    def metrics_urls(self) -> dict[str, str]:
        """Every service's /metrics: the gateway's and each stage process's."""
        urls = {"gateway": f"http://127.0.0.1:{self.gateway_port}/metrics"}
        urls.update({n: f"http://127.0.0.1:{p}/metrics" for n, p in self.metrics_ports.items()})
        return urls

    def start(self, *, worker_stages: tuple[str, ...] | None = None) -> None:
        env = self.base_env()
        url = env["IMBOT_DATABASE_URL"]
        if url.startswith("sqlite") and ":///./" in url:
            Path(url.split(":///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        upgrade(url)
        from imbot.core.kafka import ensure_topics
        from imbot.core.settings import load_settings

        settings = load_settings(
            kafka_bootstrap=env["IMBOT_KAFKA_BOOTSTRAP"],
            kafka_embedded=env.get("IMBOT_KAFKA_EMBEDDED", "").lower() == "true",
            topic_prefix=env.get("IMBOT_TOPIC_PREFIX", ""),
        )
        # In a thread of its own, as ``upgrade`` does: ``asyncio.run`` here would
        # replace (and leave unset) the event loop of a caller inside pytest-asyncio.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(asyncio.run, ensure_topics(settings)).result()
        self._spawn(
            "simulator",
            [
                "-m", "imbot.simulator",
                "--port", str(self.simulator_port),
                "--gateway-url", self.callback_url,
                "--secret", self.secret,
                "--org", env["IMBOT_EASEMOB_ORG"],
                "--app", env["IMBOT_EASEMOB_APP"],
                "--client-id", env["IMBOT_EASEMOB_CLIENT_ID"],
                "--client-secret", env["IMBOT_EASEMOB_CLIENT_SECRET"],
            ],
            env,
        )  # fmt: skip
        self._spawn("gateway", ["-m", "imbot", "gateway"], env)
        stage_args: list[str] = []
        for stage in worker_stages or ():
            stage_args += ["--stage", stage]
        self._spawn("worker", ["-m", "imbot", "worker", *stage_args], env)
        self._spawn("sender", ["-m", "imbot", "sender"], env)
        if self.console:
            env.update(self._console_env(env))  # kept in self.env: a restart keeps them
            self._spawn("console", ["-m", "imbot", "console"], env)
        self.write_state()

    # -- the operator console -------------------------------------------------

    def _console_env(self, env: dict[str, str]) -> dict[str, str]:
        """The console's port, a development login (unless tokens are configured) and
        the /metrics pages it reads in place of a Prometheus."""
        if not self.console_port:
            self.console_port = _port_or_free(8070) if self.usual_ports else free_port()
        extra = {"IMBOT_CONSOLE_PORT": str(self.console_port)}
        if not env.get("IMBOT_CONSOLE_TOKENS"):
            self.console_token = self.console_token or secrets.token_urlsafe(18)
            self.console_viewer_token = self.console_viewer_token or secrets.token_urlsafe(18)
            extra["IMBOT_CONSOLE_TOKENS"] = (
                f"dev:operator:{self.console_token},dev-viewer:viewer:{self.console_viewer_token}"
            )
        if not env.get("IMBOT_CONSOLE_METRICS_URLS"):
            extra["IMBOT_CONSOLE_METRICS_URLS"] = ",".join(self.metrics_urls().values())
        return extra

    @property
    def console_url(self) -> str:
        return f"http://127.0.0.1:{self.console_port}/"

    def add_service(self, name: str, args: list[str]) -> None:
        """Start one more service (``["-m", "imbot", "worker", "--stage", "model"]``)
        with the stack's environment, e.g. a second replica of a stage."""
        self._spawn(name, args, self.env)
        self.write_state()

    def terminate(self, name: str, timeout: float = 30.0) -> int:
        """Stop a service gracefully (SIGTERM, as Kubernetes does); its exit code."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()

    def restart(self, name: str) -> None:
        """Kill a service hard (SIGKILL, like a crashed pod) and start it again."""
        args = self._args[name]
        self.kill(name)
        self._spawn(name, args, self.env)

    def start_again(self, name: str) -> None:
        """Start a service that was stopped (``terminate`` or ``kill``) with its arguments."""
        self._spawn(name, self._args[name], self.env)

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def write_state(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(
            json.dumps(
                {
                    "callback_url": self.callback_url,
                    "simulator_url": self.simulator_url,
                    "kafka_bootstrap": self.env.get("IMBOT_KAFKA_BOOTSTRAP"),
                    "database_url": self.env.get("IMBOT_DATABASE_URL"),
                    "pid": os.getpid(),
                    "pids": self.pids(),
                }
            )
        )

    def pids(self) -> dict[str, int]:
        """Process id of every service, the embedded broker's included."""
        pids = {name: proc.pid for name, proc in self.procs.items()}
        if self.broker is not None and self.broker.pid is not None:
            pids["broker"] = self.broker.pid
        return pids

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        checks = {
            "gateway": f"http://127.0.0.1:{self.gateway_port}/readyz",
            "simulator": f"{self.simulator_url}/_sim/messages",
        }
        pending = dict(checks)
        while pending and time.monotonic() < deadline:
            self.check_alive()
            for name, url in list(pending.items()):
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url, timeout=1.0).status_code == 200:
                        del pending[name]
            time.sleep(0.1)
        if pending:
            raise RuntimeError(f"not ready after {timeout}s: {sorted(pending)}; see {self.log_dir}")

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with code {proc.returncode}; see {self.log_dir}/{name}.log"
                )

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in list(self.procs.items()):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            del self.procs[name]
        for handle in self._logs:
            handle.close()
        self._logs.clear()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None


def simulate(
    simulator_url: str,
    text: str,
    *,
    sender: str = "alice",
    bot: str = "ai_bot",
    chat_type: str = "chat",
    group_id: str | None = None,
    timeout: float = 30.0,
) -> dict[str, object]:
    """Fire one signed callback through the simulator and wait for the reply it receives."""
    target = sender if chat_type == "chat" else (group_id or "")
    with httpx.Client(base_url=simulator_url, timeout=timeout + 5) as client:
        before = len(client.get("/_sim/messages", params={"to": target}).json()["messages"])
        request: dict[str, object] = {
            "from": sender,
            "to": bot,
            "text": text,
            "chat_type": chat_type,
        }
        if chat_type != "chat":
            request.update(to=group_id, group_id=group_id, mention=[bot])
        screen = {"chat": "user", "group": "group", "groupchat": "group"}.get(chat_type, "room")
        streams_before = _finished_streams(client, screen, target)
        fired = client.post("/_sim/callback", json=request)
        fired.raise_for_status()
        deadline = time.monotonic() + timeout
        seen = before
        while True:
            # A reply is a message (not a cmd: a typing indicator), or a stream message
            # once it has finished (docs/streaming.md), shown as a message here.
            wait = max(0.0, min(0.5, deadline - time.monotonic()))
            waited = client.get(
                "/_sim/wait", params={"to": target, "count": seen + 1, "timeout": wait}
            )
            waited.raise_for_status()
            messages = waited.json()["messages"]
            seen = len(messages)
            replies = [m for m in messages[before:] if m.get("type") != "cmd"]
            streams = _finished_streams(client, screen, target)[len(streams_before) :]
            if replies or streams or time.monotonic() >= deadline:
                return {"callback": fired.json(), "replies": replies + streams}


def _finished_streams(client: httpx.Client, screen: str, target: str) -> list[dict[str, object]]:
    """The finished stream messages ``target``'s screen shows, as messages."""
    items = client.get("/_sim/screen", params={screen: target}).raise_for_status().json()["items"]
    return [
        {
            "id": i["id"],
            "from": i["from"],
            "to": [target],
            "type": "txt",
            "body": {"msg": i["text"]},
            "ext": i["ext"],
            "stream": True,
        }
        for i in items
        if i["kind"] == "stream" and i["finished"]
    ]
