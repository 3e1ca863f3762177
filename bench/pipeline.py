"""Pipeline under the workload a real app sends: latency against rate, budgets on and off.

The whole system as real processes (embedded broker, gateway, one combined stage worker,
sender, the simulated Easemob) on PostgreSQL, with the **default policy**
(``imbot/core/default_policy.yaml``: tiers, complexity levels, user and tenant budgets,
10-turn history). Only its demo models change, in two variants:

* ``zero`` — replies of 200–600 tokens at once: what the pipeline itself costs;
* ``realistic`` — the same replies, first token after 0.3–2 s, then 30–80 tokens/s, as a
  remote model answers (``DemoConfig``'s knobs, docs/models.md).

Load: open-loop at a fixed total rate, round-robin over ``rate × turn gap`` conversations,
so each user asks again every ``turn gap`` seconds (a user reads the answer before the
next question: the gap is longer than the slowest model answer) and every conversation has
a growing history, hence real complexity scores and real history reads. The questions are
a few hundred Chinese and English ones of every level, made from templates, with follow-ups.

Each point (a configuration at a rate) is a fresh broker, database and stack: warm-up,
then the measured window, while the load goes on until the window's messages are answered
(or their deadline passed). Latency is from just before the callback POST to the first
part of the reply at the simulator. For every rate both configurations run, budgets on
(the default policy) and off (``routing.tiers.*.quota`` and ``tenant_quota`` removed): the
A/B of what budgets cost. Rates go up until a configuration saturates (more than 1% of
its messages not answered within the deadline, or the pipeline's own p99 above 5 s).
CPU per message by process is read from /proc over the measured window.

    python -m bench.pipeline                      # the full curve (≤ 50 minutes)
    python -m bench.pipeline --rates 25,50,100 --latency zero
    python -m bench.pipeline --quick              # a smoke run: seconds per point
    python -m bench.pipeline --from-json results.json   # redo the section and the plot

``bench.pipeline_floor`` is the easy configuration beside it (distinct users, no history,
one free model, no budgets): the overhead floor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from bench.loadgen import percentile
from bench.pipeline_floor import _cpu_seconds, _drop_postgres, _postgres_url
from bench.report import image_link, image_path, write_section
from imbot.cli.devstack import DevStack, simulate
from imbot.core import topics
from imbot.core.envelope import decode_envelope
from imbot.core.settings import DEFAULT_POLICY_FILE
from imbot.devtools.broker import EmbeddedBroker, consume_all
from imbot.simulator.callbacks import build_callback

# Other benchmarks take their fresh PostgreSQL database from here.
__all__ = ["_drop_postgres", "_postgres_url", "main"]

RATES = (25, 50, 75, 100, 125, 150, 175, 200)
DURATION_S = 30.0
# The demo models' shape in each variant (DemoConfig's knobs, docs/models.md).
OUTPUT_TOKENS = (200, 600)
LATENCY: dict[str, dict[str, Any]] = {
    "zero": {"output_tokens": list(OUTPUT_TOKENS)},
    "realistic": {
        "first_token_ms": [300, 2000],
        "tokens_per_s": [30, 80],
        "output_tokens": list(OUTPUT_TOKENS),
    },
}
# The slowest answer a variant's model gives: the deadline and the turn gap build on it.
MODEL_WORST_S = {"zero": 0.0, "realistic": 2.0 + OUTPUT_TOKENS[1] / 30}
# What the pipeline may add to the model's own time before a reply counts as late.
DEADLINE_MARGIN_S = 5.0
SATURATED_SHARE = 0.01  # more than this share not answered within the deadline
SATURATED_P99_MS = 5000.0  # or the pipeline's own p99 (latency minus the model's time) above
HOPS = ("moderate-in", "route", "model", "moderate-out", "send")
CPU_NAMES = ("gateway", "worker", "sender", "broker", "postgres", "simulator")
PLOT = "pipeline-latency.png"
SECTION = "pipeline-realistic"
TITLE = "Pipeline (realistic workload)"


# -- the questions --------------------------------------------------------------------

_LIGHT = [
    *(
        f"{w}用英文怎么说？"
        for w in ("苹果", "图书馆", "人工智能", "地铁站", "生日快乐", "咖啡", "周末", "天气预报")
    ),
    *(f"{c}今天天气怎么样？" for c in ("北京", "上海", "广州", "成都", "杭州", "西安")),
    *(
        f"What's the capital of {c}?"
        for c in ("France", "Japan", "Brazil", "Canada", "Egypt", "Kenya")
    ),
    *(
        f"How do you say '{w}' in Chinese?"
        for w in ("thank you", "good night", "train station", "library", "weekend")
    ),
    "你好", "在吗？", "早上好！", "哈哈，笑死我了", "Hi there!", "Good morning!",
]  # fmt: skip
_MEDIUM = [
    *(
        f"为什么{p}？"
        for p in ("天空是蓝色的", "冬天会下雪", "飞机能飞起来", "面包会发霉", "手机电池会老化", "海水是咸的")
    ),
    *(
        f"{a}和{b}有什么区别？"
        for a, b in (("进程", "线程"), ("股票", "基金"), ("绿茶", "红茶"), ("公积金", "社保"), ("HTTP", "HTTPS"))
    ),
    *(
        f"Can you explain how {t} works?"
        for t in ("a vaccine", "a heat pump", "compound interest", "GPS", "a bicycle gear", "noise cancelling")
    ),
    *(
        f"帮我规划一个{c}{n}天的旅游行程。"
        for c in ("北京", "成都", "厦门", "西安") for n in (2, 3)
    ),
    *(
        f"Should I learn {a} or {b} first? Why?"
        for a, b in (("Python", "JavaScript"), ("piano", "guitar"), ("Spanish", "French"))
    ),
]  # fmt: skip
_STRONG = [
    *(
        f"用Python写一个函数，{t}，并写测试用例。"
        for t in (
            "判断一个字符串是不是回文", "合并两个有序链表", "计算斐波那契数列第n项",
            "解析CSV文件并统计每列的平均值", "实现LRU缓存", "找出数组中出现次数最多的元素",
        )
    ),
    *(f"证明{t}。" for t in ("根号2是无理数", "素数有无穷多个", "1+2+…+n=n(n+1)/2", "三角形内角和是180度")),
    *(
        f"Write a detailed {k} about {t}, at least 800 words, with sections and a summary."
        for k in ("essay", "report") for t in ("remote work", "electric cars", "urban farming", "online privacy")
    ),
    *(
        f"分析一下{t}的优缺点，并比较{u}，给出详细的方案和步骤。"
        for t, u in (
            ("微服务架构", "单体架构"), ("租房", "买房"), ("自建机房", "公有云"), ("Kafka", "RabbitMQ"),
        )
    ),
    *(
        f"Compare {a} and {b} for a write-heavy workload and explain the trade-offs step by step."
        for a, b in (("PostgreSQL", "MySQL"), ("Redis", "Memcached"), ("Cassandra", "MongoDB"))
    ),
    *(
        f"一个水池有{a}个进水管和{b}个出水管，进水管每小时进水{c}吨，出水管每小时出水{d}吨，"
        f"水池容量{e}吨，多久能注满？请列式计算。"
        for a, b, c, d, e in ((2, 1, 3, 2, 40), (3, 2, 5, 4, 60), (4, 1, 2, 3, 25))
    ),
]  # fmt: skip
_FOLLOW_UPS = [
    "能再详细一点吗？", "Can you give me an example?", "那如果数据量增加十倍呢？",
    "谢谢，明白了！", "Why is that?", "用一句话总结一下。", "还有别的办法吗？",
    "Could you make it shorter?",
]  # fmt: skip


def questions() -> list[str]:
    """A few hundred distinct questions of every level, in a fixed shuffled order."""
    base = [*_LIGHT, *_MEDIUM, *_STRONG]
    prefixes = ("", "请问", "我想知道：", "Quick question: ")
    out = list(dict.fromkeys(p + q for p in prefixes for q in base))
    random.Random(17).shuffle(out)
    return out


def question_for(conversation: int, turn: int, pool: list[str]) -> str:
    """Turn ``turn`` of a conversation: a follow-up now and then, else a new question."""
    rng = random.Random(conversation * 1009 + turn)
    if turn and rng.random() < 0.3:
        return rng.choice(_FOLLOW_UPS)
    return pool[rng.randrange(len(pool))]


# -- the policy -----------------------------------------------------------------------


def policy(latency: str, budgets: bool, concurrency: int) -> dict[str, Any]:
    """The default policy with the variant's demo models, with or without budgets."""
    data: dict[str, Any] = yaml.safe_load(DEFAULT_POLICY_FILE.read_text(encoding="utf-8"))
    for entry in data["models"].values():
        if entry.get("provider") == "demo":
            # A remote model takes as many calls at once as the pipeline sends it.
            entry.update(LATENCY[latency], max_concurrency=concurrency)
    # Whole messages: latency here is to the first reply part at Easemob (a streamed
    # answer's first words are bench.streaming's measure).
    data["streaming"] = {"enabled": False, "typing": False}
    if not budgets:
        for tier in data["routing"]["tiers"].values():
            tier.pop("quota", None)
        data["routing"].pop("tenant_quota", None)
    return data


# -- one point ------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    latency: str
    budgets: bool
    rate: float
    duration_s: float
    warmup_s: float
    turn_gap_s: float
    in_flight: int
    tail_load: bool
    log_level: str

    @property
    def deadline_s(self) -> float:
        return MODEL_WORST_S[self.latency] + DEADLINE_MARGIN_S

    @property
    def conversations(self) -> int:
        return max(1, round(self.rate * self.turn_gap_s))

    @property
    def config(self) -> str:
        return f"{self.latency}, budgets {'on' if self.budgets else 'off'}"


@dataclass
class Point:
    """What one configuration did at one rate (ms unless named otherwise)."""

    latency: str
    budgets: bool
    rate: float
    conversations: int
    deadline_ms: float = math.inf  # a reply later than this is late
    measured: int = 0
    answered: int = 0  # a reply of kind "answer" within the deadline
    late: int = 0  # no reply within the deadline
    p50: float = float("nan")
    p90: float = float("nan")
    p99: float = float("nan")
    max: float = float("nan")
    own_p50: float = float("nan")  # latency minus the model's own time: the pipeline's part
    own_p99: float = float("nan")
    model_p50: float = float("nan")
    achieved_rate: float = 0.0
    lag_p99: float = 0.0  # how late the load generator sent (its own CPU starvation)
    post_errors: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU ms per message
    hops: dict[str, float] = field(default_factory=dict)  # stage -> median ms (incl. queueing)
    kinds: dict[str, int] = field(default_factory=dict)  # reply kind -> count
    levels: dict[str, int] = field(default_factory=dict)  # complexity level -> count
    history_turns: float = 0.0  # mean history turns the route read
    output_tokens: float = 0.0  # mean reply tokens
    saturated: str = ""  # why, when it was

    @property
    def config(self) -> str:
        return f"{self.latency}, budgets {'on' if self.budgets else 'off'}"


def _postgres_backends(database: str) -> dict[int, float]:
    """CPU seconds of each PostgreSQL backend serving ``database`` (by its process title)."""
    found: dict[int, float] = {}
    needle = f" {database} ".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            if needle in (entry / "cmdline").read_bytes().replace(b"\0", b" "):
                found[int(entry.name)] = _cpu_seconds(int(entry.name))
        except OSError:
            continue
    return found


@dataclass
class CpuSnapshot:
    procs: dict[str, float]
    backends: dict[int, float]
    own: float

    @classmethod
    def take(cls, pids: dict[str, int], database: str) -> CpuSnapshot:
        procs: dict[str, float] = {}
        for name, pid in pids.items():
            with contextlib.suppress(OSError):
                procs[name] = _cpu_seconds(pid)
        times = os.times()
        return cls(procs, _postgres_backends(database), times.user + times.system)

    def since(self, before: CpuSnapshot, messages: int) -> dict[str, float]:
        """CPU ms per message of each process between two snapshots."""
        per = 1000 / max(1, messages)
        out = {n: (v - before.procs.get(n, v)) * per for n, v in self.procs.items()}
        # A backend that started in the window counts whole; one that ended is lost.
        out["postgres"] = sum(v - before.backends.get(p, 0.0) for p, v in self.backends.items())
        out["postgres"] *= per
        out["loadgen"] = (self.own - before.own) * per
        return out


def _profile(pids: dict[str, int], seconds: float) -> list[subprocess.Popen[bytes]]:
    """py-spy on the worker and the sender over the measured window, collapsed stacks into
    ``$IMBOT_BENCH_PROFILE/<process>-<pid>.txt`` (nothing when the variable is unset;
    ``IMBOT_BENCH_PROFILE_GIL=1`` samples only the thread holding the GIL)."""
    out = os.environ.get("IMBOT_BENCH_PROFILE")
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not out or not Path(spy).exists():
        return []
    Path(out).mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [
                spy,
                "record",
                "--nonblocking",
                "--format",
                "raw",
                "-r",
                "200",
                "-d",
                str(max(1, round(seconds))),
                "-p",
                str(pid),
                "-o",
                f"{out}/{name}-{pid}.txt",
                # Only the thread holding the GIL: Python's own CPU. Without it a thread
                # waiting for a core (two cores, a dozen busy processes) looks busy too.
                *(["--gil"] if os.environ.get("IMBOT_BENCH_PROFILE_GIL") else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
        if name in ("worker", "sender", "gateway")
    ]


async def _drive(plan: Plan, stack: DevStack, pids: dict[str, int], database: str) -> Point:
    """Send the schedule, poll the simulator for replies, return the measured window."""
    pool = questions()
    rate, conversations = plan.rate, plan.conversations
    first_measured = round(plan.warmup_s * rate)
    end_measured = first_measured + max(2, round(plan.duration_s * rate))
    env = stack.env
    sent_at: dict[str, float] = {}
    lags: list[float] = []
    replies: dict[str, float] = {}  # msg_id -> ms epoch of its first reply part
    errors = 0
    window: dict[str, CpuSnapshot] = {}
    profilers: list[subprocess.Popen[bytes]] = []
    done = asyncio.Event()  # every measured message has had a reply

    def msg_id(n: int) -> str:
        return str(7 * 10**17 + n)

    measured = [msg_id(n) for n in range(first_measured, end_measured)]

    async def poll(session: aiohttp.ClientSession) -> None:
        # The simulator stamps and appends a message in one step: ``since`` the newest
        # stamp seen misses nothing (a reply at that very millisecond comes twice).
        since = 0.0
        while True:
            async with session.get(
                f"{stack.simulator_url}/_sim/messages", params={"since": repr(since)}
            ) as resp:
                messages = (await resp.json(loads=orjson.loads))["messages"]
            for m in messages:
                at = float(m["received_at"])
                since = max(since, at)
                reply_to = (m.get("ext") or {}).get("imbot_reply_to")
                if reply_to is not None:
                    replies[reply_to] = min(at, replies.get(reply_to, at))
            if "end" in window and all(k in replies for k in measured):
                done.set()
            await asyncio.sleep(1.0)

    async def post(session: aiohttp.ClientSession, n: int, scheduled: float) -> None:
        nonlocal errors
        conversation, turn = n % conversations, n // conversations
        body = orjson.dumps(
            build_callback(
                sender=f"u{conversation:05d}",
                to="ai_bot",
                text=question_for(conversation, turn, pool),
                secret=stack.secret,
                org=env["IMBOT_EASEMOB_ORG"],
                app=env["IMBOT_EASEMOB_APP"],
                msg_id=msg_id(n),
            )
        )
        now = time.time()
        lags.append((now - scheduled) * 1000)
        sent_at[msg_id(n)] = now * 1000
        try:
            async with session.post(
                stack.callback_url, data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
        except (aiohttp.ClientError, TimeoutError):
            errors += 1

    connector = aiohttp.TCPConnector(limit=256)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        poller = asyncio.create_task(poll(session))
        posts: set[asyncio.Task[None]] = set()
        start = time.time() + 0.2
        window_end = start + end_measured / rate
        for n in itertools.count():
            scheduled = start + n / rate
            if n == end_measured and not plan.tail_load:
                break
            # The load goes on until the window's messages are answered or late.
            if n > end_measured and (done.is_set() or scheduled > window_end + plan.deadline_s):
                break
            delay = scheduled - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if n == first_measured:
                window["start"] = CpuSnapshot.take(pids, database)
                profilers = _profile(pids, plan.duration_s)
            if n == end_measured:
                window["end"] = CpuSnapshot.take(pids, database)
            task = asyncio.create_task(post(session, n, scheduled))
            posts.add(task)
            task.add_done_callback(posts.discard)
        if "end" not in window:
            window["end"] = CpuSnapshot.take(pids, database)
        for profiler in profilers:
            profiler.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                done.wait(), timeout=max(0.0, window_end + plan.deadline_s + 1.5 - time.time())
            )
        if poller.done():
            poller.result()  # the poller failed: say why rather than report nothing answered
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        await asyncio.gather(*posts, return_exceptions=True)

    point = Point(plan.latency, plan.budgets, rate, conversations)
    point.measured = len(measured)
    point.post_errors = errors
    point.cpu = window["end"].since(window["start"], len(measured))
    point.lag_p99 = percentile(lags, 0.99)
    span_s = (sent_at[measured[-1]] - sent_at[measured[0]]) / 1000
    point.achieved_rate = (len(measured) - 1) / span_s if span_s > 0 else float("nan")
    latencies = {k: replies[k] - sent_at[k] for k in measured if k in replies}
    # A message still unanswered when the run gave up on it counts as infinitely late: the
    # percentiles are over every measured message, not only over those that made it.
    unanswered = [math.inf] * (len(measured) - len(latencies))
    values = [*latencies.values(), *unanswered]
    point.p50, point.p90 = percentile(values, 0.5), percentile(values, 0.9)
    point.p99, point.max = percentile(values, 0.99), max(values)
    deadline_ms = point.deadline_ms = plan.deadline_s * 1000
    point.late = sum(1 for v in values if v > deadline_ms)
    answers = await _read_delivered(stack, point, latencies, len(replies), unanswered)
    point.answered = sum(1 for k in answers if latencies[k] <= deadline_ms)
    return point


async def _read_delivered(
    stack: DevStack, point: Point, latencies: dict[str, float], count: int, unanswered: list[float]
) -> set[str]:
    """Per-hop medians, the model's own time, reply kinds and levels of the measured
    messages, from the envelopes on ``imbot.delivered`` (one record tells it all).
    Returns the msg_ids whose reply was a model's answer."""
    records = await consume_all(
        stack.env["IMBOT_KAFKA_BOOTSTRAP"],
        f"{stack.env['IMBOT_TOPIC_PREFIX']}{topics.DELIVERED}",
        count,
        timeout=15,
    )
    gaps: dict[str, list[float]] = {h: [] for h in HOPS}
    own: list[float] = list(unanswered)
    model: list[float] = []
    history: list[int] = []
    tokens: list[int] = []
    kinds: dict[str, int] = {}
    levels: dict[str, int] = {}
    answers: set[str] = set()
    seen: set[str] = set()
    for _, value in records:
        env = decode_envelope(value)
        if env.msg_id not in latencies or env.msg_id in seen:
            continue
        seen.add(env.msg_id)
        stamps = {"gateway": env.received_at, **env.stamps}
        for prev, name in itertools.pairwise(("gateway", *HOPS)):
            if prev in stamps and name in stamps:
                gaps[name].append(stamps[name] - stamps[prev])
        kind = env.reply.kind if env.reply is not None else "none"
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == "answer":
            answers.add(env.msg_id)
        if env.route is not None:
            level = env.route.level or env.route.rule
            levels[level] = levels.get(level, 0) + 1
            history.append(len(env.route.history))
        spent = 0.0
        if env.completion is not None:
            spent = env.completion.latency_ms
            model.append(spent)
            tokens.append(env.completion.output_tokens or 0)
        own.append(latencies[env.msg_id] - spent)
    point.hops = {h: statistics.median(v) for h, v in gaps.items() if v}
    point.own_p50, point.own_p99 = percentile(own, 0.5), percentile(own, 0.99)
    point.model_p50 = percentile(model, 0.5)
    point.kinds, point.levels = kinds, levels
    point.history_turns = statistics.fmean(history) if history else 0.0
    point.output_tokens = statistics.fmean(tokens) if tokens else 0.0
    return answers


def run_point(plan: Plan) -> Point:
    """One configuration at one rate on a fresh broker, database and stack."""
    root = Path(tempfile.mkdtemp(prefix="imbot-bench-pipeline-"))
    policy_file = root / "policy.yaml"
    policy_file.write_text(
        yaml.safe_dump(
            policy(plan.latency, plan.budgets, plan.in_flight),
            allow_unicode=True,
            sort_keys=False,
        ),
        encoding="utf-8",
    )
    with EmbeddedBroker() as broker:
        db_url = _postgres_url()
        database = db_url.rsplit("/", 1)[1]
        stack = DevStack(
            console=False,
            env={
                "IMBOT_KAFKA_BOOTSTRAP": broker.bootstrap,
                "IMBOT_KAFKA_EMBEDDED": "true",
                "IMBOT_TOPIC_PREFIX": f"r{uuid.uuid4().hex[:6]}.",
                "IMBOT_DATABASE_URL": db_url,
                "IMBOT_POLICY_FILE": str(policy_file),
                "IMBOT_LOG_LEVEL": plan.log_level,
                # Calls at once per stage: a model that takes seconds needs rate × seconds.
                "IMBOT_STAGE_MAX_IN_FLIGHT": str(plan.in_flight),
                # Our pipeline, not Easemob's limit: pacing at the app's 100 calls/s would
                # cap every rate above it (bench.sender_throughput measures pacing).
                "IMBOT_EASEMOB_RATE_LIMIT": "0",
            },
            log_dir=root / "logs",
            state_file=root / "dev.json",
        )
        stack.start()
        try:
            stack.wait_ready(timeout=60)
            # The worker has joined its group and every stage answered once.
            simulate(stack.simulator_url, "你好", sender="warmup", timeout=90)
            pids = dict(stack.pids())
            if broker.pid is not None:
                pids["broker"] = broker.pid
            point = asyncio.run(_drive(plan, stack, pids, database))
            stack.check_alive()
        finally:
            stack.stop()
            _drop_postgres(db_url)
    point.saturated = _saturated(point)
    if not point.saturated or os.environ.get("IMBOT_BENCH_DROP_LOGS"):
        shutil.rmtree(root, ignore_errors=True)  # kept when the point failed or saturated
    else:
        print(f"  logs kept in {root}/logs", flush=True)
    return point


def _saturated(point: Point) -> str:
    if point.late > SATURATED_SHARE * point.measured:
        return f"{point.late} of {point.measured} not answered within the deadline"
    if point.own_p99 > SATURATED_P99_MS:
        return f"the pipeline's own p99 over {SATURATED_P99_MS / 1000:g} s ({_s(point.own_p99)})"
    return ""


# -- the report -----------------------------------------------------------------------


def _s(ms: float) -> str:
    """Milliseconds as seconds; a message never answered is shown as "never"."""
    if ms != ms:
        return "—"
    return "never" if ms == math.inf else f"{ms / 1000:.2f}"


def _config_table(points: list[Point]) -> list[str]:
    rows = [
        "| msg/s | sent msg/s (lag p99 ms, errors) | conversations | answered in time | p50 s "
        "| p90 s | p99 s | max s | pipeline's own p50 / p99 s | model p50 s | history turns "
        "| levels (light/medium/strong) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        levels = "/".join(str(p.levels.get(n, 0)) for n in ("light", "medium", "strong"))
        other = {k: v for k, v in p.kinds.items() if k != "answer"}
        answered = f"{p.answered}/{p.measured}" + (f" ({other})" if other else "")
        mark = " **saturated**" if p.saturated else ""
        rows.append(
            f"| {p.rate:.0f}{mark} | {p.achieved_rate:.1f} ({p.lag_p99:.0f}, {p.post_errors})"
            f" | {p.conversations} | {answered} | {_s(p.p50)} | {_s(p.p90)}"
            f" | {_s(p.p99)} | {_s(p.max)} | {_s(p.own_p50)} / {_s(p.own_p99)}"
            f" | {_s(p.model_p50)} | {p.history_turns:.1f} | {levels} |"
        )
    return rows


def _ms(ms: float) -> str:
    """Milliseconds (the ratio's own precision); "never" for a message never answered."""
    return "never" if ms == math.inf else f"{ms:.0f}"


def _ab_table(points: list[Point]) -> list[str]:
    rows = [
        "| latency | msg/s | p99 budgets on ms | p99 budgets off ms | on / off |",
        "|---|---|---|---|---|",
    ]
    by = {(p.latency, p.budgets, p.rate): p for p in points}
    for latency, rate in sorted({(p.latency, p.rate) for p in points}):
        on, off = by.get((latency, True, rate)), by.get((latency, False, rate))
        if on is None or off is None:
            continue
        both = math.isfinite(on.p99) and math.isfinite(off.p99) and off.p99 > 0
        ratio = f"{on.p99 / off.p99:.2f}×" if both else "—"
        rows.append(f"| {latency} | {rate:.0f} | {_ms(on.p99)} | {_ms(off.p99)} | {ratio} |")
    return rows


def _cpu_table(points: list[Point]) -> list[str]:
    rows = [
        "| configuration | msg/s | " + " | ".join(CPU_NAMES) + " | imbot (all but simulator) "
        "| all | load generator |",
        "|---|---|" + "---|" * (len(CPU_NAMES) + 3),
    ]
    for p in points:
        cpu = [p.cpu.get(c, float("nan")) for c in CPU_NAMES]
        ours = sum(cpu) - p.cpu.get("simulator", 0.0)
        rows.append(
            f"| {p.config} | {p.rate:.0f} | "
            + " | ".join(f"{c:.2f}" for c in cpu)
            + f" | **{ours:.1f}** | {sum(cpu):.1f} | {p.cpu.get('loadgen', float('nan')):.1f} |"
        )
    return rows


def _hop_table(points: list[Point]) -> list[str]:
    rows = [
        "| configuration | msg/s | " + " | ".join(HOPS) + " |",
        "|---|---|" + "---|" * len(HOPS),
    ]
    for p in points:
        rows.append(
            f"| {p.config} | {p.rate:.0f} | "
            + " | ".join(f"{p.hops.get(h, float('nan')):.0f}" for h in HOPS)
            + " |"
        )
    return rows


def _highest_under(points: list[Point], latency: str, budgets: bool, limit_ms: float) -> str:
    rates = [
        p.rate
        for p in points
        if p.latency == latency and p.budgets == budgets and not p.saturated
        and (p.p99 if latency == "zero" else p.own_p99) < limit_ms
    ]  # fmt: skip
    return f"{max(rates):.0f} msg/s" if rates else "none of the rates run"


def plot(points: list[Point], path: Path, smoke: bool) -> bool:
    """p50 and p99 against the rate, budgets on and off, one panel per model latency."""
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
        from matplotlib import ticker  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        print("matplotlib is missing (pip install -e '.[bench]'): no plot", flush=True)
        return False
    variants = [v for v in LATENCY if any(p.latency == v for p in points)]
    fig, axes = plt.subplots(1, len(variants), figsize=(6.2 * len(variants), 4.4), squeeze=False)
    colours = {True: "tab:red", False: "tab:blue"}
    for ax, latency in zip(axes[0], variants, strict=True):
        mine = [p for p in points if p.latency == latency]
        finite = [v for p in mine for v in (p.p99, p.deadline_ms) if math.isfinite(v)]
        # A percentile that was never answered is drawn at the top of the panel.
        ceiling = max(finite, default=1000.0) * 1.3

        def seconds(values: list[float], ceiling: float = ceiling) -> list[float]:
            return [(v if math.isfinite(v) else ceiling) / 1000 for v in values]

        for budgets in (True, False):
            series = sorted((p for p in mine if p.budgets == budgets), key=lambda p: p.rate)
            if not series:
                continue
            rates = [p.rate for p in series]
            label = "budgets on (default)" if budgets else "budgets off"
            style = {"color": colours[budgets]}
            ax.plot(rates, seconds([p.p99 for p in series]), "-o", label=f"p99, {label}", **style)
            ax.plot(
                rates, seconds([p.p50 for p in series]), "--o", alpha=0.6,
                label=f"p50, {label}", **style,
            )  # fmt: skip
            if latency != "zero":
                ax.plot(
                    rates, seconds([p.own_p99 for p in series]), ":",
                    label=f"pipeline's own p99, {label}", **style,
                )  # fmt: skip
            saturated = [p for p in series if p.saturated]
            ax.plot(
                [p.rate for p in saturated], seconds([p.p99 for p in saturated]), "kx",
                markersize=11,
            )  # fmt: skip
        if latency == "zero":
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="-.")
        model = "zero-latency model" if latency == "zero" else "model: 0.3–2 s, then 30–80 tokens/s"
        ax.set_title(f"{model}{' — SMOKE RUN, not a measurement' if smoke else ''}", fontsize=10)
        ax.set_xlabel("offered AI messages per second")
        ax.set_ylabel("callback → first reply part (s)")
        ax.set_yscale("log")
        plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        # Minor ticks labelled at 2 and 5 of each decade only: all of them overlap.
        ax.yaxis.set_minor_formatter(
            ticker.FuncFormatter(
                lambda v, _: (
                    f"{v:g}" if round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""
                )
            )
        )
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xticks(sorted({p.rate for p in mine}))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        "imbot pipeline, default policy, PostgreSQL, one box\n(× saturated; never answered: top)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


@dataclass
class Setup:
    """How a run was made: what the section says about it (kept with the points)."""

    command: str
    quick: bool
    duration_s: float
    warmup_s: dict[str, float]
    turn_gap_s: dict[str, float]
    in_flight: int
    log_level: str
    started: str = ""  # when the run began (the section's stamp is when it was written)
    load_average: str = ""  # the machine's at the end of the run (other work included)


def report(points: list[Point], setup: Setup, write: bool) -> None:
    variants = list(LATENCY)
    points = sorted(points, key=lambda p: (variants.index(p.latency), not p.budgets, p.rate))
    path = image_path(PLOT) if write else Path(tempfile.gettempdir()) / PLOT
    plotted = plot(points, path, setup.quick)
    if not write:
        print(f"plot: {path}", flush=True)
    rows: list[str] = []
    if setup.quick:
        rows += [
            "**Smoke run (`--quick`): a few seconds per point on a shared machine, to show that "
            "the benchmark runs end to end. These are not measurements: the full run is "
            "`python -m bench.pipeline`.**",
            "",
        ]
    for config in dict.fromkeys(p.config for p in points):
        rows += [f"**{config}**", "", *_config_table([p for p in points if p.config == config]), ""]
    rows += ["Budgets' cost, same rate, same run:", "", *_ab_table(points), ""]
    if not plotted:
        rows += ["(No plot: matplotlib is missing; `pip install -e '.[bench]'`.)", ""]
    elif write:
        rows += [image_link(path, "latency against rate, budgets on and off"), ""]
    rows += [
        "CPU milliseconds per message while the measured window ran, by process (postgres: the "
        "backends of the run's database; the simulator stands in for Easemob and also answers "
        "the benchmark's polling):",
        "",
        *_cpu_table(points),
        "",
        "Median milliseconds per hop, each including the Kafka hop into that stage and its "
        "queueing (model: the model's own time included):",
        "",
        *_hop_table(points),
        "",
    ]
    targets = []
    at50 = {p.budgets: p for p in points if p.latency == "zero" and p.rate == 50}
    if (
        True in at50
        and False in at50
        and math.isfinite(at50[True].p99)
        and math.isfinite(at50[False].p99)
    ):
        targets.append(
            f"at 50 msg/s the default policy's p99 is {at50[True].p99 / at50[False].p99:.2f}× "
            "the budget-free p99 (target ≤ 1.25×)"
        )
    if any(p.latency == "zero" for p in points):
        targets.append(
            "the highest rate with p99 under 1 s is "
            f"{_highest_under(points, 'zero', True, 1000)} with budgets and "
            f"{_highest_under(points, 'zero', False, 1000)} without (target ≥ 100 msg/s with)"
        )
    if any(p.latency == "realistic" for p in points):
        targets.append(
            "with the realistic model, the highest rate at which the pipeline's own p99 "
            f"stays under 1 s is {_highest_under(points, 'realistic', True, 1000)} with budgets "
            f"and {_highest_under(points, 'realistic', False, 1000)} without"
        )
    cpu50 = [p for p in points if p.rate == 50 and p.budgets]
    if cpu50:
        targets.append(
            "CPU per message across all processes at 50 msg/s with budgets: "
            + ", ".join(
                f"{p.latency} {sum(p.cpu.get(c, 0.0) for c in CPU_NAMES):.1f} ms" for p in cpu50
            )
            + " (target ≤ 8 ms)"
        )
    label = ", ".join
    rows += [
        "Setup: the default policy (tiers, levels, user and tenant budgets, 10-turn history); "
        f"demo models replying {OUTPUT_TOKENS[0]}–{OUTPUT_TOKENS[1]} tokens, `zero` at once, "
        "`realistic` with the first token after 0.3–2 s and then 30–80 tokens/s; PostgreSQL; "
        "embedded broker; one combined stage worker; stage in-flight limit and demo "
        f"`max_concurrency` {setup.in_flight}; sender pacing off; log level {setup.log_level}; "
        f"everything, the load generator included, on the same {os.cpu_count()} cores. "
        f"Open-loop load at each rate, measured for {setup.duration_s:g} s after a warm-up of "
        f"{label(f'{v} {w:g} s' for v, w in setup.warmup_s.items())}, round-robin over rate × "
        f"turn gap conversations (turn gap {label(f'{v} {g:g} s' for v, g in setup.turn_gap_s.items())}: "
        "longer than the slowest answer, as a user reads before asking again), "
        f"{len(questions())} distinct questions plus follow-ups; "
        + (
            "the load stops with the window (`--quick`). "
            if setup.quick
            else "the load goes on until the window's messages are answered or late. "
        )
        + "A fresh broker, database and stack per point. "
        "Latency: callback POST → first reply part at the simulator; the pipeline's own part "
        "is that minus the model's time. Answered in time: a model's answer within the "
        f"model's slowest answer + {DEADLINE_MARGIN_S:g} s. Saturated: more than "
        f"{SATURATED_SHARE:.0%} late, or the pipeline's own p99 over "
        f"{SATURATED_P99_MS / 1000:g} s; a configuration stops at its first saturated rate. "
    ]
    if setup.load_average:
        rows[-1] += (
            f"Load average at the end {setup.load_average} (other work on the machine included)."
        )
    if setup.started:
        rows[-1] += f" The run began {setup.started}."
    if targets and not setup.quick:
        rows += ["", "Against issue 17's targets: " + "; ".join(targets) + "."]
    body = "\n".join(rows)
    print(body)
    if write:
        write_section(SECTION, TITLE, setup.command, body)


# -- main -----------------------------------------------------------------------------


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", help="msg/s, comma-separated (default 25,50,…,200)")
    parser.add_argument("--duration", type=float, help="measured seconds per point (30)")
    parser.add_argument("--warmup", type=float, help="seconds of load before the window")
    parser.add_argument("--turn-gap", type=float, help="seconds between a user's turns")
    parser.add_argument("--latency", choices=("zero", "realistic", "both"), default="both")
    parser.add_argument("--budgets", choices=("on", "off", "both"), default="both")
    parser.add_argument("--in-flight", type=int, default=2048, help="stage in-flight limit")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--no-stop", action="store_true", help="go on past saturation")
    parser.add_argument("--quick", action="store_true", help="smoke run: 25, 50 msg/s, 4 s")
    parser.add_argument("--json", type=Path, help="write every point's figures here too")
    parser.add_argument("--from-json", type=Path, help="redo section and plot from --json output")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    return parser.parse_args()


def _command(argv: list[str]) -> str:
    """The command line as given, without the output-only options."""
    skip = {"--json", "--from-json"}
    kept: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in skip:
            next(it, None)
        elif arg != "--no-write" and arg.split("=", 1)[0] not in skip:
            kept.append(arg)
    return " ".join(["python -m bench.pipeline", *kept])


def _save(path: Path, setup: Setup, points: list[Point]) -> None:
    # The json module: a figure nobody measured stays NaN (orjson would write null).
    data = {"setup": asdict(setup), "points": [asdict(p) for p in points]}
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")


def main() -> None:
    args = _arguments()
    if args.from_json:
        data = json.loads(args.from_json.read_text(encoding="utf-8"))
        saved = [Point(**p) for p in data["points"]]
        report(saved, Setup(**data["setup"]), write=not args.no_write)
        return
    variants = ["zero", "realistic"] if args.latency == "both" else [args.latency]
    budgets = [True, False] if args.budgets == "both" else [args.budgets == "on"]
    if args.rates:
        rates = [float(r) for r in args.rates.split(",")]
    else:
        rates = [25.0, 50.0] if args.quick else [float(r) for r in RATES]
    duration = args.duration or (4.0 if args.quick else DURATION_S)
    # A user asks again after reading the answer: the gap outlasts the slowest one.
    gaps = {v: args.turn_gap or max(8.0, MODEL_WORST_S[v] + 8.0) for v in variants}
    warmups = {
        v: args.warmup if args.warmup is not None else (2.0 if args.quick else max(10.0, gaps[v]))
        for v in variants
    }
    setup = Setup(
        command=_command(sys.argv[1:]),
        quick=args.quick,
        duration_s=duration,
        warmup_s=warmups,
        turn_gap_s=gaps,
        in_flight=args.in_flight,
        log_level=args.log_level,
        started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    points: list[Point] = []
    stopped: set[tuple[str, bool]] = set()
    for i, rate in enumerate(rates):
        # Alternate which configuration goes first, so drift on the machine hits both.
        order = budgets if i % 2 == 0 else budgets[::-1]
        for latency, on in itertools.product(variants, order):
            if (latency, on) in stopped:
                continue
            plan = Plan(
                latency=latency,
                budgets=on,
                rate=rate,
                duration_s=duration,
                warmup_s=warmups[latency],
                turn_gap_s=gaps[latency],
                in_flight=args.in_flight,
                tail_load=not args.quick,
                log_level=args.log_level,
            )
            began = time.monotonic()
            point = run_point(plan)
            points.append(point)
            cpu = sum(point.cpu.get(c, 0.0) for c in CPU_NAMES)
            print(
                f"{plan.config} @ {rate:g}/s: p50 {_s(point.p50)} s, p99 {_s(point.p99)} s, "
                f"own p99 {_s(point.own_p99)} s, late {point.late}/{point.measured}, "
                f"{cpu:.1f} CPU ms/msg, {time.monotonic() - began:.0f} s"
                + (f"; saturated: {point.saturated}" if point.saturated else ""),
                flush=True,
            )
            if point.saturated and not args.no_stop:
                stopped.add((latency, on))
            if args.json:
                _save(args.json, setup, points)
        if len(stopped) == len(variants) * len(budgets):
            break
    setup.load_average = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    report(points, setup, write=not args.no_write)


if __name__ == "__main__":
    main()
