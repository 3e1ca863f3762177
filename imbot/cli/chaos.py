"""Chaos: replicas killed and restarted while messages flow, then every message accounted for.

The whole system as real processes, as on Kubernetes: the Easemob simulator, the gateway,
and every stage of the pipeline (moderate-in, route, model, moderate-out) and the sender
at ``replicas`` replicas each, one consumer group per stage, on a real broker and a real
database. Signed callbacks arrive at the gateway at a steady rate: several conversations
(one-to-one chats and group mentions) with several turns each, so the route stage reads
history. Meanwhile a replica is killed every few seconds (every replica once per round,
in random order; by default only while every replica of its stage holds partitions, see
``ChaosRun._killable`` for the broker defect that rule avoids), SIGKILL (a crashed pod) or
SIGTERM (a rolling deploy, a scale-down) in equal numbers and random order, and started
again after a random pause; a process that exits on its own is recorded and started again,
as its supervisor would.

Then, once every accepted message has an outcome and nothing new arrived for a while (or
at a deadline), every msg_id the gateway accepted is accounted for, as the user sees it
at the simulated Easemob (``ext.imbot_reply_to``, ``imbot_part``/``imbot_parts``,
``imbot_kind``):

* **replied**: one complete reply (every part), delivered once;
* **DLQ + fallback**: a record on ``imbot.dlq`` and the complete fallback apology;
* **lost**: neither. Described with its conversation, every topic, partition and offset
  it reached (one read of every topic), the stage it stopped before, whether that stage's
  group committed the partition past it ("skipped") or not ("stuck"), the stage's
  replicas' rebalances and kills around the time the record was written, and which logs
  name it. A stage whose input has partitions no replica holds at the end is reported
  as a stalled group.

A whole reply delivered twice is a duplicate. Easemob has no idempotency key, so a sender
SIGKILLed between Easemob's answer and its ledger commit resends that part (README,
"Delivery guarantee"); the ledger marks such a part ``uncertain``. Those duplicates are
counted apart ("uncertain") from the ones nothing explains.

The gateway is told to answer an accepted message with the intercept code and a failed
publish with the block code (``callback.ai_message: intercept``, ``kafka_failure: block``),
so "accepted" is unambiguous: the gateway said the message is in Kafka. Its publish and
replay-store deadlines are raised (the gateway's own budget is ``bench.gateway``'s
subject, not this one's), so a busy machine does not turn messages away.

Used by ``tests/e2e/test_chaos.py`` (a few minutes, in ``make test``) and ``bench.chaos``
(``make chaos``: more messages, more kills, several runs, figures in docs/benchmarks.md).
Each service logs to ``<work_dir>/logs/<name>.log`` (a restarted replica appends, after a
``chaos:`` line saying what happened to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml

from imbot.cli.devstack import DevStack
from imbot.core import topics
from imbot.core.envelope import ChatType, conversation_id
from imbot.core.kafka import consumer_kwargs, ensure_topics
from imbot.core.settings import DEFAULT_POLICY_FILE, Settings, load_settings
from imbot.simulator.callbacks import ChatType as CallbackChatType
from imbot.simulator.callbacks import build_callback
from imbot.storage import open_storage
from imbot.streams.dlq import dlq_or_none
from imbot.streams.pipeline import PIPELINE, SENDER_STAGES
from imbot.streams.reader import Bounds, SliceReader, base_topic, envelope_or_none

BOT = "ai_bot"
INTERCEPT_CODE = "IMBOT_AI_HANDLED"
UNAVAILABLE_CODE = "IMBOT_UNAVAILABLE"
STAGES = tuple(row.name for row in PIPELINE)  # moderate-in, route, model, moderate-out, send
_INPUT = {row.name: row.input for row in PIPELINE}
_STAGE_OF_TOPIC = {row.input: row.name for row in PIPELINE}
_ORDER = [row.input for row in PIPELINE] + [topics.DELIVERED]
_QUESTIONS = (
    "你好，请介绍一下你自己",
    "今天适合去公园散步吗？",
    "帮我想一个周末的晚餐菜单",
    "怎样才能养成早睡的习惯？",
    "推荐三本适合入门的历史书",
    "解释一下什么是复利",
    "我想学做红烧肉，有什么诀窍",
    "写一句生日祝福给朋友",
    "Python 里列表和元组有什么区别？",
    "周末带孩子去哪里玩比较好",
)


@dataclass(frozen=True)
class ChaosPlan:
    """What one run does. ``seed`` fixes the conversations, victims, signals and pauses
    (not the machine's timing); None picks one, reported in the result."""

    messages: int = 200
    rate: float = 10.0  # callbacks per second, steady
    turns: int = 8  # per conversation: conversations = ceil(messages / turns)
    group_every: int = 4  # every n-th conversation is a group that @-mentions the bot
    replicas: int = 2  # of every stage and of the sender
    partitions: int = 6
    kill_every_s: float = 2.5  # mean gap between kills (uniform in [0.5, 1.5] x this)
    first_kill_s: float = 2.0  # after the load starts
    # Kills go on after the load until there were this many (at most this long after it).
    min_kills: int = 4
    min_kills_within_s: float = 60.0
    down_s: tuple[float, float] = (0.5, 4.0)  # a killed replica starts again after this
    term_timeout_s: float = 60.0  # a SIGTERMed replica that has not exited by then: SIGKILL
    # Kill a replica only while every replica of its stage holds partitions (a broker
    # defect wedges the group otherwise: ChaosRun._killable).
    settled_only: bool = True
    model_latency_ms: int = 500  # the demo models' call time: work is in flight at a kill
    # How long the simulated Easemob takes to answer a send: replies are in flight at a
    # kill or a rebalance too (an idle machine otherwise finishes them within the grace).
    easemob_delay_ms: int = 300
    ready_timeout_s: float = 240.0  # every service up and a first reply through
    settle_timeout_s: float = 150.0  # after the last callback: every accepted msg_id done
    quiet_s: float = 5.0  # and nothing new delivered for this long (a late duplicate)
    seed: int | None = None
    env: tuple[tuple[str, str], ...] = ()  # more IMBOT_ settings for every service


@dataclass
class Kill:
    at_s: float  # since the load started
    replica: str
    signal: str  # SIGKILL | SIGTERM
    exit_code: int | None = None
    exited_after_s: float | None = None
    escalated: bool = False  # SIGTERM not obeyed within term_timeout_s, then SIGKILL
    down_s: float = 0.0


@dataclass
class Crash:
    """A process that exited without being killed by the harness."""

    at_s: float
    name: str
    exit_code: int


@dataclass
class Sent:
    msg_id: str
    conversation: str
    at_s: float
    answer: str  # "accepted", the gateway's code, "http <status>" or the client error


@dataclass(frozen=True)
class Reach:
    topic: str  # base name
    partition: int
    offset: int
    written_ms: float = field(default=0.0, compare=False)  # the record's timestamp

    def __str__(self) -> str:
        return f"{self.topic}[p{self.partition}@{self.offset}]"


@dataclass
class Lost:
    msg_id: str
    conversation: str
    sent_at_s: float
    reached: list[Reach]
    dlq: list[str]
    replies: dict[str, list[int]]  # kind -> part indexes delivered
    stopped_before: str  # the stage whose input is the last topic reached
    # That stage's group committed the partition past the record, or not; None: unreadable.
    committed_past: bool | None
    committed: str  # the committed offset, said
    log_mentions: dict[str, int]
    timeline: list[str]  # that stage's replicas around the time the record was written

    @property
    def how(self) -> str:
        """``DLQ, no reply``: a stage gave up on it and the user got nothing (the send
        stage has no fallback); ``skipped``: committed past without an output or a DLQ
        record (issue 16's loss); ``stuck``: the group never got to it."""
        if self.dlq:
            return "DLQ, no reply"
        if self.committed_past is None:
            return "unknown"
        return "skipped" if self.committed_past else "stuck"

    def describe(self, *, timeline: bool = True) -> str:
        reached = " -> ".join(map(str, self.reached)) or "no topic (not even imbot.inbound)"
        replies = (
            ", ".join(f"{kind} parts {parts}" for kind, parts in self.replies.items()) or "none"
        )
        logs = ", ".join(f"{name} {n}" for name, n in self.log_mentions.items()) or "none"
        return (
            f"msg_id {self.msg_id} (conversation {self.conversation}, sent at"
            f" {self.sent_at_s:.1f} s): reached {reached}; stopped before"
            f" {self.stopped_before}; DLQ: {', '.join(self.dlq) or 'none'}; replies seen:"
            f" {replies}; {self.committed}; log lines naming it: {logs}"
            + "".join(f"\n      {line}" for line in (self.timeline if timeline else ()))
        )


@dataclass
class Duplicate:
    msg_id: str
    conversation: str
    kind: str
    parts: dict[int, int]  # part index -> times delivered
    uncertain: bool  # the ledger marked a resent part: the Easemob window after a SIGKILL

    def describe(self) -> str:
        why = "ledger: uncertain (sender killed mid-send)" if self.uncertain else "unexplained"
        return (
            f"msg_id {self.msg_id} ({self.conversation}): {self.kind} delivered"
            f" {self.parts} times per part; {why}"
        )


@dataclass
class ChaosResult:
    plan: ChaosPlan
    seed: int
    log_dir: Path
    sent: list[Sent] = field(default_factory=list)
    replied_once: int = 0
    dlq_fallback: int = 0
    answer_and_fallback: int = 0  # an answer that came after a DLQ record's fallback
    refused_but_answered: int = 0  # the gateway timed out, the record still got through
    lost: list[Lost] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    crashes: list[Crash] = field(default_factory=list)
    # Every accepted msg_id had an outcome, every group settled, and all was quiet before
    # the deadline.
    settled: bool = False
    held_at_end: dict[str, list[int]] = field(default_factory=dict)  # replica -> partitions
    unassigned_at_end: dict[str, list[int]] = field(default_factory=dict)  # stage -> nobody's
    ready_s: float = 0.0
    load_s: float = 0.0
    settle_s: float = 0.0
    wall_s: float = 0.0

    @property
    def accepted(self) -> list[Sent]:
        return [s for s in self.sent if s.answer == "accepted"]

    @property
    def refused(self) -> Counter[str]:
        return Counter(s.answer for s in self.sent if s.answer != "accepted")

    @property
    def unexplained_duplicates(self) -> list[Duplicate]:
        killed_sender = any(k.signal == "SIGKILL" or k.escalated for k in self._sender_kills)
        return [d for d in self.duplicates if not (d.uncertain and killed_sender)]

    @property
    def _sender_kills(self) -> list[Kill]:
        return [k for k in self.kills if k.replica.startswith("send-")]

    def kills_by_signal(self) -> Counter[str]:
        return Counter(k.signal for k in self.kills)

    def lost_by_stage(self) -> Counter[str]:
        """``"<stage it stopped before>: <how>"`` (``Lost.how``) -> how many."""
        return Counter(f"{item.stopped_before}: {item.how}" for item in self.lost)

    def figures(self) -> dict[str, Any]:
        by_signal = self.kills_by_signal()
        return {
            "seed": self.seed,
            "sent": len(self.sent),
            "accepted": len(self.accepted),
            "replied_once": self.replied_once,
            "dlq_fallback": self.dlq_fallback,
            "lost": len(self.lost),
            "lost_before": dict(self.lost_by_stage()),
            "unassigned_at_end": dict(self.unassigned_at_end),
            "duplicated": len(self.duplicates),
            "duplicated_uncertain": len(self.duplicates) - len(self.unexplained_duplicates),
            "sigkill": by_signal["SIGKILL"],
            "sigterm": by_signal["SIGTERM"],
            "sigterm_escalated": sum(k.escalated for k in self.kills),
            "crashes": len(self.crashes),
            "refused": dict(self.refused),
            "settled": self.settled,
            "ready_s": round(self.ready_s, 1),
            "load_s": round(self.load_s, 1),
            "settle_s": round(self.settle_s, 1),
            "wall_s": round(self.wall_s, 1),
        }

    def report(self) -> str:
        """Everything a failing test or a bad run needs to say, in one text."""
        lines = [f"chaos run (seed {self.seed}): {self.figures()}", f"logs: {self.log_dir}"]
        lines += [
            "kills: "
            + ", ".join(
                f"{k.at_s:.1f}s {k.replica} {k.signal}"
                + (" (escalated to SIGKILL)" if k.escalated else "")
                + f" exit {k.exit_code}"
                for k in self.kills
            )
        ]
        if self.crashes:
            lines.append(
                "exited on their own: "
                + ", ".join(f"{c.at_s:.1f}s {c.name} exit {c.exit_code}" for c in self.crashes)
            )
        lines.append(
            "partitions held at the end: "
            + ", ".join(f"{name} {parts}" for name, parts in self.held_at_end.items())
        )
        if self.unassigned_at_end:
            lines.append(
                "STALLED GROUPS (input partitions no replica holds at the end): "
                + ", ".join(f"{stage} {parts}" for stage, parts in self.unassigned_at_end.items())
            )
        # The first few in full (with their stage's timeline), then one line each.
        for i, item in enumerate(self.lost[:_LISTED]):
            lines.append(f"LOST {item.describe(timeline=i < _TIMELINES)}")
        if len(self.lost) > _LISTED:
            lines.append(f"... and {len(self.lost) - _LISTED} more lost: {self.lost_by_stage()}")
        lines += [f"DUPLICATE {d.describe()}" for d in self.duplicates]
        return "\n".join(lines)


_LISTED = 40  # lost messages a report describes
_TIMELINES = 8  # of which this many with their stage's timeline


def chaos_policy(path: Path, model_latency_ms: int) -> Path:
    """The default policy (its routing tiers, quotas and history) with demo models that
    take ``model_latency_ms``, and the gateway's answers told apart (see the module doc)."""
    policy: dict[str, Any] = yaml.safe_load(DEFAULT_POLICY_FILE.read_text(encoding="utf-8"))
    for model in policy["models"].values():
        if model.get("provider") == "demo":
            model["latency_ms"] = model_latency_ms
    # Whole replies: the checks below count complete messages at the simulated Easemob
    # (a streamed answer is checked by tests/e2e/test_streaming.py).
    policy["streaming"] = {"enabled": False, "typing": False}
    policy["callback"].update(
        ai_message="intercept",
        intercept_code=INTERCEPT_CODE,
        kafka_failure="block",
        kafka_failure_code=UNAVAILABLE_CODE,
    )
    path.write_text(yaml.safe_dump(policy, allow_unicode=True, sort_keys=False), "utf-8")
    return path


@dataclass(frozen=True)
class _Turn:
    conversation: str
    sender: str
    chat_type: CallbackChatType
    group: str | None
    text: str


def _script(plan: ChaosPlan, rng: random.Random, tag: str) -> list[_Turn]:
    """Turn-major: every conversation's first turn, then every second one, …"""
    count = math.ceil(plan.messages / plan.turns)
    out: list[_Turn] = []
    for turn in range(plan.turns):
        for c in range(count):
            if len(out) == plan.messages:
                return out
            text = f"{rng.choice(_QUESTIONS)}（第{turn + 1}轮）"
            if plan.group_every and c % plan.group_every == plan.group_every - 1:
                group = f"9{tag}{c:04d}"
                sender = f"m{tag}{c:04d}x{turn % 3}"  # three members take turns
                key = conversation_id(ChatType.group, bot=BOT, sender=sender, group_id=group)
                out.append(_Turn(key, sender, "groupchat", group, f"@AI {text}"))
            else:
                sender = f"u{tag}{c:04d}"
                key = conversation_id(ChatType.direct, bot=BOT, sender=sender, group_id=None)
                out.append(_Turn(key, sender, "chat", None, text))
    return out


def _events(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a service's log (tracebacks and other text skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        if line.startswith(b"{"):
            with contextlib.suppress(orjson.JSONDecodeError):
                event = orjson.loads(line)
                if isinstance(event, dict):
                    out.append(event)
    return out


def _now_ms() -> float:
    return time.time() * 1000


class ChaosRun:
    """One run: start everything, send and kill, wait for quiescence, account, stop."""

    def __init__(
        self,
        plan: ChaosPlan,
        *,
        bootstrap: str,
        database_url: str,
        work_dir: Path,
        out: Callable[[str], None] = lambda _: None,
        cwd: Path | None = None,
    ) -> None:
        self.plan = plan
        self.seed = plan.seed if plan.seed is not None else random.SystemRandom().randrange(10**9)
        self.rng = random.Random(self.seed)
        self.out = out
        self.work_dir = work_dir
        self.log_dir = work_dir / "logs"
        self.tag = uuid.uuid4().hex[:6]
        self.secret = "chaos-secret"
        self.org, self.app = "demo-org", "demo-app"
        prefix = f"x{self.tag}."
        env = {
            "IMBOT_KAFKA_BOOTSTRAP": bootstrap,
            "IMBOT_KAFKA_EMBEDDED": "true",
            "IMBOT_TOPIC_PREFIX": prefix,
            "IMBOT_TOPIC_PARTITIONS": str(plan.partitions),
            "IMBOT_DATABASE_URL": database_url,
            "IMBOT_POLICY_FILE": str(chaos_policy(work_dir / "policy.yaml", plan.model_latency_ms)),
            "IMBOT_CALLBACK_SECRETS": self.secret,
            "IMBOT_EASEMOB_ORG": self.org,
            "IMBOT_EASEMOB_APP": self.app,
            "IMBOT_SENDER_REPLICAS": str(plan.replicas),
            "IMBOT_PUBLISH_TIMEOUT_MS": "1000",
            "IMBOT_CALLBACK_REPLAY_TIMEOUT_MS": "500",
            "IMBOT_LOG_JSON": "true",
            "IMBOT_LOG_LEVEL": "INFO",
            **dict(plan.env),
        }
        self.settings: Settings = load_settings(
            kafka_bootstrap=bootstrap,
            kafka_embedded=True,
            topic_prefix=prefix,
            topic_partitions=plan.partitions,
        )
        self.stack = DevStack(
            console=False,
            env=env,
            log_dir=self.log_dir,
            state_file=work_dir / "dev.json",
            secret=self.secret,
            cwd=cwd,
        )
        self.replicas = [
            f"{stage}-{chr(ord('a') + i)}" for stage in STAGES for i in range(plan.replicas)
        ]
        self.result = ChaosResult(plan=plan, seed=self.seed, log_dir=self.log_dir)
        self._down: set[str] = set()  # killed by us, not started again yet
        self._t0 = time.monotonic()  # the load's start (set again when it starts)
        self._t0_wall = time.time()
        self._offsets: dict[tuple[str, int], tuple[str, int | str | None]] = {}
        self._loading = False

    # -- processes ---------------------------------------------------------------

    def _args(self, stage: str) -> list[str]:
        if stage == "send":
            return ["-m", "imbot", "sender"]
        return ["-m", "imbot", "worker", "--stage", stage]

    def _mark(self, name: str, event: str, **extra: object) -> None:
        """A line in the service's own log saying what the harness did to it."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        line = {"ts": round(time.time(), 3), "logger": "chaos", "event": f"chaos: {event}", **extra}
        with (self.log_dir / f"{name}.log").open("ab") as handle:
            handle.write(orjson.dumps(line) + b"\n")

    async def _start(self) -> None:
        stack = self.stack
        env = stack.base_env()
        # As an operator migrates (an initContainer), with the services' own code: a run
        # from another checkout gets that checkout's schema.
        migrate = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "imbot",
            "migrate",
            env=env,
            cwd=stack.cwd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        said, _ = await migrate.communicate()
        if migrate.returncode != 0:
            raise RuntimeError(f"imbot migrate failed: {said.decode(errors='replace')}")
        await ensure_topics(self.settings)
        stack.add_service(
            "simulator",
            [
                "-m", "imbot.simulator",
                "--port", str(stack.simulator_port),
                "--gateway-url", stack.callback_url,
                "--secret", self.secret,
                "--org", self.org,
                "--app", self.app,
                "--client-id", env["IMBOT_EASEMOB_CLIENT_ID"],
                "--client-secret", env["IMBOT_EASEMOB_CLIENT_SECRET"],
            ],
        )  # fmt: skip
        stack.add_service("gateway", ["-m", "imbot", "gateway"])
        # Spawned from this (the main) thread: the kernel stops them if we die.
        for name in self.replicas:
            stack.add_service(name, self._args(name.rsplit("-", 1)[0]))

    def _stage_topic(self, replica: str) -> str:
        return self.settings.topic(_INPUT[replica.rsplit("-", 1)[0]])

    def _settled_groups(self) -> bool:
        """Every replica holds part of its stage's input, and together all of it."""
        for stage in STAGES:
            held = [self._held(n) for n in self.replicas if n.rsplit("-", 1)[0] == stage]
            if not all(held) or set().union(*held) != set(range(self.plan.partitions)):
                return False
        return True

    async def _wait_ready(self) -> None:
        """Gateway and simulator answer, one message goes through every stage (then the
        simulated Easemob takes its time to answer), and (best effort: a busy broker may
        take long) every replica owns part of its input."""
        stack = self.stack
        deadline = time.monotonic() + self.plan.ready_timeout_s
        urls = [
            f"http://127.0.0.1:{stack.gateway_port}/readyz",
            f"{stack.simulator_url}/_sim/messages",
        ]
        async with httpx.AsyncClient(timeout=5) as client:
            for url in urls:
                while True:
                    stack.check_alive()
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(url)).status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"not ready: {url}; see {self.log_dir}")
                    await asyncio.sleep(0.2)
            user = f"w{self.tag}"
            body = build_callback(
                sender=user, to=BOT, text="你好", secret=self.secret, org=self.org, app=self.app
            )
            while True:  # the gateway may refuse while the producer warms up
                answer = await self._post(client, body)
                if answer == "accepted":
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the gateway never accepted a message: {answer}")
                await asyncio.sleep(0.5)
            while True:
                stack.check_alive()
                got = await client.get(f"{stack.simulator_url}/_sim/messages", params={"to": user})
                if got.json()["messages"]:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no reply through the pipeline; see {self.log_dir}")
                await asyncio.sleep(0.5)
            injected = await client.post(
                f"{stack.simulator_url}/_sim/inject",
                json={"delay_ms": self.plan.easemob_delay_ms},
            )
            injected.raise_for_status()
        group_deadline = min(deadline, time.monotonic() + 60)
        while not self._settled_groups() and time.monotonic() < group_deadline:  # noqa: ASYNC110 - polling logs
            await asyncio.sleep(0.5)

    async def _kill(self, name: str, sig: signal.Signals, down_s: float) -> None:
        stack = self.stack
        kill = Kill(at_s=self._elapsed(), replica=name, signal=sig.name, down_s=down_s)
        self.result.kills.append(kill)
        self._down.add(name)
        try:
            proc = stack.procs.pop(name)
            self._mark(name, f"{sig.name} sent")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            started = time.monotonic()
            while proc.poll() is None:
                if not kill.escalated and time.monotonic() - started > self.plan.term_timeout_s:
                    kill.escalated = True
                    self._mark(name, "did not stop in time: SIGKILL sent")
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                await asyncio.sleep(0.05)
            kill.exit_code = proc.returncode
            kill.exited_after_s = round(time.monotonic() - started, 2)
            self.out(f"  {kill.at_s:6.1f}s {sig.name} {name}: exit {proc.returncode}")
            await asyncio.sleep(down_s)
            self._mark(name, "started again", after=sig.name)
            stack.start_again(name)
        finally:
            self._down.discard(name)

    async def _chaos(self) -> None:
        """Kills at random gaps while the load runs (and after it until ``min_kills``):
        every replica once per round, in random order; SIGKILL and SIGTERM in equal
        numbers (every two kills), in random order."""
        plan = self.plan
        signals: list[signal.Signals] = []
        victims: list[str] = []
        tasks: list[asyncio.Task[None]] = []
        await asyncio.sleep(plan.first_kill_s)
        overtime = math.inf  # a slow machine: kills go on after the load, up to min_kills
        while self._loading or (
            len(self.result.kills) < plan.min_kills and time.monotonic() < overtime
        ):
            if not self._loading and overtime == math.inf:
                overtime = time.monotonic() + plan.min_kills_within_s
            if not victims:  # rounds: every replica once per round, in random order
                victims = self.rng.sample(self.replicas, len(self.replicas))
            up = [name for name in victims if self._killable(name)]
            if up:
                if not signals:  # each pair of kills: one of each, in random order
                    signals = self.rng.sample([signal.SIGKILL, signal.SIGTERM], 2)
                name = up[-1]
                victims.remove(name)
                sig = signals.pop()
                down = self.rng.uniform(*plan.down_s)
                tasks.append(asyncio.create_task(self._kill(name, sig, down)))
            await asyncio.sleep(plan.kill_every_s * self.rng.uniform(0.5, 1.5))
        await asyncio.gather(*tasks)

    def _killable(self, name: str) -> bool:
        """Up; and with ``settled_only``, every replica of its stage holds partitions.

        Tansu wedges a consumer group for good when its last member leaves (LeaveGroup,
        a SIGTERMed replica's goodbye) while another member's JoinGroup is pending (a
        restarted replica joining): that member never gets an assignment, nor does any
        later one (plain aiokafka shows it; a real Kafka completes the join). Killing only
        replicas of settled groups keeps the run about our code; every kill still lands
        while messages are in flight and forces rebalances."""
        if name in self._down or name not in self.stack.procs:
            return False
        if not self.plan.settled_only:
            return True
        stage = name.rsplit("-", 1)[0]
        peers = [n for n in self.replicas if n.rsplit("-", 1)[0] == stage]
        return all(n not in self._down and n in self.stack.procs and self._held(n) for n in peers)

    async def _supervise(self) -> None:
        """A process that exits on its own is recorded and started again (its supervisor)."""
        while True:
            for name, proc in list(self.stack.procs.items()):
                if name in self._down or proc.poll() is None:
                    continue
                self.stack.procs.pop(name)
                self.result.crashes.append(Crash(self._elapsed(), name, proc.returncode))
                self.out(f"  {self._elapsed():6.1f}s {name} exited on its own: {proc.returncode}")
                self._mark(name, "exited on its own; started again", exit_code=proc.returncode)
                self.stack.start_again(name)
            await asyncio.sleep(0.5)

    def _elapsed(self) -> float:
        return round(time.monotonic() - self._t0, 2)

    # -- load ------------------------------------------------------------------

    async def _post(self, client: httpx.AsyncClient, body: dict[str, Any]) -> str:
        try:
            resp = await client.post(
                self.stack.callback_url,
                content=orjson.dumps(body),
                headers={"Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            return type(exc).__name__
        if resp.status_code != 200:
            return f"http {resp.status_code}"
        answer = resp.json()
        if answer.get("valid") is False and answer.get("code") == INTERCEPT_CODE:
            return "accepted"
        return str(answer.get("code") or answer)

    async def _send(self, client: httpx.AsyncClient, turn: _Turn) -> None:
        at = self._elapsed()
        body = build_callback(
            sender=turn.sender,
            to=turn.group or BOT,
            text=turn.text,
            secret=self.secret,
            org=self.org,
            app=self.app,
            chat_type=turn.chat_type,
            group_id=turn.group,
            mention=[BOT] if turn.group else None,
        )
        answer = await self._post(client, body)
        self.result.sent.append(Sent(body["msg_id"], turn.conversation, at, answer))

    async def _load(self) -> None:
        script = _script(self.plan, self.rng, self.tag)
        tasks: list[asyncio.Task[None]] = []
        async with httpx.AsyncClient(timeout=10) as client:
            start = time.monotonic()
            for n, turn in enumerate(script):
                delay = start + n / self.plan.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                # Its own task: a slow answer does not hold back the next callback.
                tasks.append(asyncio.create_task(self._send(client, turn)))
            await asyncio.gather(*tasks)
        self._loading = False

    # -- accounting ------------------------------------------------------------

    async def _delivered(self, client: httpx.AsyncClient) -> list[dict[str, Any]]:
        got = await client.get(f"{self.stack.simulator_url}/_sim/messages")
        got.raise_for_status()
        return list(got.json()["messages"])

    @staticmethod
    def _by_msg(messages: list[dict[str, Any]]) -> dict[str, dict[str, Counter[int]]]:
        """msg_id -> reply kind -> part index -> times delivered."""
        out: dict[str, dict[str, Counter[int]]] = {}
        for m in messages:
            ext = m.get("ext") or {}
            msg_id = ext.get("imbot_reply_to")
            if msg_id is None:
                continue
            kinds = out.setdefault(str(msg_id), {})
            kinds.setdefault(str(ext.get("imbot_kind", "answer")), Counter())[
                int(ext.get("imbot_part", 0))
            ] += 1
        return out

    @staticmethod
    def _parts_expected(messages: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for m in messages:
            ext = m.get("ext") or {}
            if "imbot_reply_to" in ext:
                key = (str(ext["imbot_reply_to"]), str(ext.get("imbot_kind", "answer")))
                out[key] = max(out.get(key, 1), int(ext.get("imbot_parts", 1)))
        return out

    @staticmethod
    def _complete(parts: Counter[int], expected: int) -> bool:
        return all(parts[i] >= 1 for i in range(expected))

    def _has_outcome(
        self,
        msg_id: str,
        replies: dict[str, dict[str, Counter[int]]],
        expected: dict[tuple[str, str], int],
    ) -> bool:
        return any(
            self._complete(parts, expected.get((msg_id, kind), 1))
            for kind, parts in replies.get(msg_id, {}).items()
        )

    async def _settle(self) -> None:
        """Until every accepted msg_id has a complete reply (or fallback), no replica is
        down, every group has settled (each replica holds partitions), and nothing new was
        delivered for ``quiet_s``; or the deadline."""
        deadline = time.monotonic() + self.plan.settle_timeout_s
        seen, quiet_since = -1, time.monotonic()
        accepted = [s.msg_id for s in self.result.accepted]
        async with httpx.AsyncClient(timeout=10) as client:
            while time.monotonic() < deadline:
                messages = await self._delivered(client)
                if len(messages) != seen:
                    seen, quiet_since = len(messages), time.monotonic()
                replies, expected = self._by_msg(messages), self._parts_expected(messages)
                pending = [m for m in accepted if not self._has_outcome(m, replies, expected)]
                if (
                    not pending
                    and not self._down
                    and time.monotonic() - quiet_since >= self.plan.quiet_s
                    and self._settled_groups()  # a group stuck in a rebalance shows here
                ):
                    self.result.settled = True
                    return
                await asyncio.sleep(0.5)

    async def _scan(self) -> tuple[dict[str, list[Reach]], dict[str, list[str]]]:
        """Every record of every pipeline topic: msg_id -> where it was, and its DLQ records."""
        settings = self.settings
        reached: dict[str, list[Reach]] = {}
        dlq: dict[str, list[str]] = {}
        names = [settings.topic(t) for t in (*_ORDER, topics.DLQ)]
        async with SliceReader(settings, names, Bounds(), missing_ok=True, idle_s=5.0) as reader:
            async for batch in reader.batches():
                for record in batch:
                    base = base_topic(record.topic, settings) or record.topic
                    if base == topics.DLQ:
                        rec = dlq_or_none(record.value)
                        if rec is not None and rec.msg_id is not None:
                            dlq.setdefault(rec.msg_id, []).append(
                                f"{rec.stage}: {rec.reason or rec.error_kind}"
                            )
                        continue
                    env = envelope_or_none(record.value)
                    if env is not None:
                        reached.setdefault(env.msg_id, []).append(
                            Reach(base, record.partition, record.offset, record.timestamp)
                        )
        return reached, dlq

    async def _committed_offset(self, topic: str, partition: int) -> tuple[str, int | str | None]:
        """The group reading ``topic`` and its committed offset of the partition (None:
        nothing committed; a text: unreadable). Read once per partition."""
        key = (topic, partition)
        if key not in self._offsets:
            from aiokafka import AIOKafkaConsumer, TopicPartition

            from imbot.streams.worker import consumer_group

            stage = _STAGE_OF_TOPIC[topic]
            group = consumer_group(self.settings, SENDER_STAGES if stage == "send" else [stage])
            consumer = AIOKafkaConsumer(
                group_id=group, enable_auto_commit=False, **consumer_kwargs(self.settings)
            )
            offset: int | str | None
            try:
                async with asyncio.timeout(15):
                    await consumer.start()
                    offset = await consumer.committed(
                        TopicPartition(self.settings.topic(topic), partition)
                    )
            except Exception as exc:  # a diagnosis: never the reason a report fails
                offset = f"unreadable ({type(exc).__name__})"
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()
            self._offsets[key] = (group, offset)
        return self._offsets[key]

    async def _committed(self, reach: Reach) -> tuple[bool | None, str]:
        """Whether the stage reading ``reach``'s topic committed its partition past it."""
        if reach.topic not in _STAGE_OF_TOPIC:
            return None, "no stage reads it"
        group, offset = await self._committed_offset(reach.topic, reach.partition)
        where = f"{reach.topic}/p{reach.partition}"
        if isinstance(offset, str):
            return None, f"{group}'s committed offset of {where} {offset}"
        if offset is None:
            return False, f"{group} has committed nothing on {where}"
        past = offset > reach.offset
        said = "PAST the record" if past else "not past the record"
        return past, f"{group} committed {where} at {offset} ({said})"

    def _incarnations(self, replica: str) -> list[list[dict[str, Any]]]:
        """The replica's log events, split where the harness started it again."""
        out: list[list[dict[str, Any]]] = [[]]
        for event in _events(self.log_dir / f"{replica}.log"):
            if event.get("logger") == "chaos" and "started again" in str(event.get("event")):
                out.append([])
            out[-1].append(event)
        return out

    def _held(self, replica: str) -> set[int]:
        """The input partitions the replica's current incarnation holds, by its log."""
        topic = self._stage_topic(replica)
        held: set[int] = set()
        for event in self._incarnations(replica)[-1]:
            if event.get("event") == "partitions assigned":
                held = {
                    int(p.rsplit(":", 1)[1])
                    for p in event.get("partitions") or []
                    if p.rsplit(":", 1)[0] == topic
                }
            elif event.get("event") in ("partitions revoked", "worker stopping"):
                held = set()
        return held

    def _assignments_at_end(self) -> None:
        """Which partitions each replica holds now; a stage whose input has partitions
        nobody holds has a stalled group."""
        result = self.result
        for stage in STAGES:
            names = [n for n in self.replicas if n.rsplit("-", 1)[0] == stage]
            held = {name: self._held(name) for name in names}
            result.held_at_end.update({n: sorted(h) for n, h in held.items()})
            missing = set(range(self.plan.partitions)) - set().union(*held.values())
            if missing:
                result.unassigned_at_end[stage] = sorted(missing)

    _TIMELINE = frozenset(
        {
            "partitions assigned",
            "partitions revoked",
            "worker ready",
            "worker stopping",
            "left the group",
        }
    )

    def _timeline(self, reach: Reach) -> list[str]:
        """What the replicas of the stage reading ``reach`` did from 5 s before the record
        was written to 15 s after (seconds since the load started)."""
        stage = _STAGE_OF_TOPIC.get(reach.topic)
        if stage is None or not reach.written_ms:
            return []
        topic = self.settings.topic(reach.topic)
        start, end = reach.written_ms / 1000 - 5, reach.written_ms / 1000 + 15
        lines: list[tuple[float, str]] = [
            (reach.written_ms / 1000, f"(the record written to {reach})")
        ]
        for name in (n for n in self.replicas if n.rsplit("-", 1)[0] == stage):
            for event in (e for inc in self._incarnations(name) for e in inc):
                ts = float(event.get("ts") or 0)
                what = str(event.get("event"))
                if not start <= ts <= end:
                    continue
                if not (
                    what in self._TIMELINE
                    or what.startswith("chaos:")
                    or event.get("level") in ("warning", "error", "critical")
                ):
                    continue
                extra = {
                    k: v for k, v in event.items() if k not in ("ts", "level", "logger", "event")
                }
                if "partitions" in extra and isinstance(extra["partitions"], list):
                    extra["partitions"] = [
                        int(p.rsplit(":", 1)[1])
                        for p in extra["partitions"]
                        if p.rsplit(":", 1)[0] == topic
                    ]
                said = " ".join(f"{k}={v}" for k, v in extra.items() if k != "exc")
                lines.append((ts, f"{name}: {what} {said}".rstrip()))
        lines.sort(key=lambda item: item[0])
        return [f"{ts - self._t0_wall:+7.2f}s {text}" for ts, text in lines]

    def _log_mentions(self, msg_id: str) -> dict[str, int]:
        needle = msg_id.encode()
        out: dict[str, int] = {}
        for path in sorted(self.log_dir.glob("*.log")):
            n = sum(1 for line in path.read_bytes().splitlines() if needle in line)
            if n:
                out[path.name] = n
        return out

    async def _uncertain(self, msg_ids: list[str]) -> set[tuple[str, int]]:
        """(ledger id, part) rows the sender marked as possibly shown twice."""
        if not msg_ids:
            return set()
        from imbot.sender.service import fallback_ledger_id

        out: set[tuple[str, int]] = set()
        try:
            # check=False: the services may run another checkout's migrations.
            store = await open_storage(self.stack.env["IMBOT_DATABASE_URL"], check=False)
            try:
                for msg_id in msg_ids:
                    for ledger_id in (msg_id, fallback_ledger_id(msg_id)):
                        for part, row in (await store.deliveries.ledger(ledger_id)).items():
                            if (row.error or "").startswith("uncertain"):
                                out.add((msg_id, part))
            finally:
                await store.close()
        except Exception as exc:  # then no duplicate is explained: the report says why
            self.out(f"the delivery ledger could not be read: {type(exc).__name__}: {exc}")
        return out

    async def _account(self) -> None:
        result = self.result
        self._assignments_at_end()
        async with httpx.AsyncClient(timeout=10) as client:
            messages = await self._delivered(client)
        replies, expected = self._by_msg(messages), self._parts_expected(messages)
        reached, dlq = await self._scan()
        conversation = {s.msg_id: s.conversation for s in result.sent}
        accepted = {s.msg_id: s for s in result.accepted}

        # Duplicates: any msg_id of ours (accepted or not) with a whole reply twice, or
        # two different complete replies.
        twice: list[tuple[str, str, dict[int, int]]] = []
        for msg_id, kinds in replies.items():
            if msg_id not in conversation:
                continue  # the warm-up message
            complete_kinds = [
                k for k, parts in kinds.items() if self._complete(parts, expected[(msg_id, k)])
            ]
            for kind, parts in kinds.items():
                n = expected[(msg_id, kind)]
                if all(parts[i] >= 2 for i in range(n)):
                    twice.append((msg_id, kind, dict(parts)))
            answers = [k for k in complete_kinds if k != "fallback"]
            if len(answers) > 1:
                twice.append((msg_id, "+".join(answers), {}))
        uncertain = await self._uncertain([m for m, _, _ in twice])
        for msg_id, kind, delivered in twice:
            resent = bool(delivered) and all(
                (msg_id, part) in uncertain for part, n in delivered.items() if n > 1
            )
            result.duplicates.append(
                Duplicate(msg_id, conversation[msg_id], kind, delivered, uncertain=resent)
            )

        for msg_id in replies:
            if (
                msg_id in conversation
                and msg_id not in accepted
                and self._has_outcome(msg_id, replies, expected)
            ):
                result.refused_but_answered += 1

        for msg_id, sent in accepted.items():
            kinds = replies.get(msg_id, {})
            complete = {
                k for k, parts in kinds.items() if self._complete(parts, expected[(msg_id, k)])
            }
            answered = complete - {"fallback"}
            if answered and "fallback" in complete and msg_id in dlq:
                result.answer_and_fallback += 1
            elif answered:
                result.replied_once += 1
            elif "fallback" in complete and msg_id in dlq:
                result.dlq_fallback += 1
            else:
                where = sorted(
                    reached.get(msg_id, []), key=lambda r: (_ORDER.index(r.topic), r.offset)
                )
                last = where[-1].topic if where else None
                if last is None:
                    stopped = "imbot.inbound (the gateway said accepted)"
                elif last in _STAGE_OF_TOPIC:
                    stopped = _STAGE_OF_TOPIC[last]
                else:
                    stopped = f"the user (reached {last})"
                past, committed = (
                    await self._committed(where[-1])
                    if where
                    else (None, "no committed offset to read")
                )
                result.lost.append(
                    Lost(
                        msg_id=msg_id,
                        conversation=sent.conversation,
                        sent_at_s=sent.at_s,
                        reached=where,
                        dlq=dlq.get(msg_id, []),
                        replies={k: sorted(p.elements()) for k, p in kinds.items()},
                        stopped_before=stopped,
                        committed_past=past,
                        committed=committed,
                        log_mentions=self._log_mentions(msg_id),
                        timeline=self._timeline(where[-1]) if where else [],
                    )
                )

    # -- the run ---------------------------------------------------------------

    async def run(self) -> ChaosResult:
        plan, result = self.plan, self.result
        began = time.monotonic()
        supervisor: asyncio.Task[None] | None = None
        try:
            await self._start()
            await self._wait_ready()
            result.ready_s = time.monotonic() - began
            self.out(
                f"ready after {result.ready_s:.0f} s; {plan.messages} messages at {plan.rate}/s,"
                f" a kill every ~{plan.kill_every_s} s (seed {self.seed})"
            )
            supervisor = asyncio.create_task(self._supervise())
            self._t0, self._t0_wall = time.monotonic(), time.time()
            self._loading = True
            await asyncio.gather(self._load(), self._chaos())
            result.load_s = time.monotonic() - self._t0
            settle_from = time.monotonic()
            await self._settle()
            result.settle_s = time.monotonic() - settle_from
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
            supervisor = None
            await self._account()
        finally:
            if supervisor is not None:
                supervisor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await supervisor
            await asyncio.to_thread(self.stack.stop)
            result.wall_s = time.monotonic() - began
        return result


async def run_chaos(
    plan: ChaosPlan,
    *,
    bootstrap: str,
    database_url: str,
    work_dir: Path,
    out: Callable[[str], None] = lambda _: None,
    cwd: Path | None = None,
) -> ChaosResult:
    """One chaos run on the broker at ``bootstrap`` and the (migrated or empty) database
    at ``database_url``; logs and state under ``work_dir``. ``cwd``: where the services
    run (another checkout's ``imbot`` there is imported first), None: this one."""
    await asyncio.to_thread(work_dir.mkdir, parents=True, exist_ok=True)
    run = ChaosRun(
        plan, bootstrap=bootstrap, database_url=database_url, work_dir=work_dir, out=out, cwd=cwd
    )
    return await run.run()
