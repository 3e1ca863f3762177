"""Chaos before a release: many messages, many kills, several runs; nothing may be lost.

Each run is ``imbot.cli.chaos`` on a fresh embedded broker and a fresh PostgreSQL
database (127.0.0.1:5432, trust auth; ``IMBOT_TEST_PG_DSN`` names the admin database):
the gateway, the simulated Easemob, and every stage and the sender at two replicas,
replicas killed (SIGKILL and SIGTERM, at random) and started again while signed
callbacks arrive at a steady rate. Per run it prints what happened to every message the
gateway accepted (replied once, DLQ + fallback, lost, duplicated), the kills by signal and
the wall time; a lost or duplicated message is described in full (its conversation, the
topics it reached, the stage it stopped before, that stage's committed offset, the logs
that name it) and the run's logs are kept. The figures go to the "Chaos" section of
docs/benchmarks.md. Exit status 1 when any run lost a message or delivered a whole reply
twice without the ledger's explanation.

    python -m bench.chaos --messages 1000 --rate 25 --runs 10     # make chaos
    python -m bench.chaos --messages 250 --rate 10 --kill-every 1.5 --runs 1   # the suite's
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import asyncpg

from bench.report import write_section
from imbot.cli.chaos import ChaosPlan, ChaosResult, run_chaos
from imbot.devtools.broker import EmbeddedBroker

PG_ADMIN_DSN = os.environ.get("IMBOT_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


async def _admin(statement: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def checkout(rev: str) -> Path:
    """The ``imbot`` package of commit ``rev`` in a directory of its own: the services run
    there (their ``import imbot`` finds it first), e.g. HEAD while the tree is being edited."""
    root = Path(tempfile.mkdtemp(prefix="imbot-chaos-checkout-"))
    repo = Path(__file__).resolve().parent.parent
    tree = subprocess.run(
        ["git", "archive", rev, "imbot"], cwd=repo, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=tree, check=True)
    return root


async def one_run(plan: ChaosPlan, index: int, cwd: Path | None = None) -> ChaosResult:
    work = Path(tempfile.mkdtemp(prefix=f"imbot-chaos-{index}-"))
    name = f"imbot_chaos_{uuid.uuid4().hex[:10]}"
    await _admin(f'CREATE DATABASE "{name}"')
    try:
        with EmbeddedBroker() as broker:
            result = await run_chaos(
                plan,
                bootstrap=broker.bootstrap,
                database_url=f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}",
                work_dir=work,
                out=lambda line: print(line, flush=True),
                cwd=cwd,
            )
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    if result.lost or result.duplicates or result.crashes:
        print(result.report(), flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _row(n: int | str, r: ChaosResult) -> str:
    f = r.figures()
    lost_where = ", ".join(f"{k} {v}" for k, v in sorted(r.lost_by_stage().items()))
    dup = f"{f['duplicated']}" + (
        f" ({f['duplicated_uncertain']} uncertain)" if f["duplicated_uncertain"] else ""
    )
    refused = sum(r.refused.values())
    return (
        f"| {n} | {f['sent']} | {f['accepted']}"
        + (f" ({refused} refused)" if refused else "")
        + f" | {f['replied_once']} | {f['dlq_fallback']}"
        + f" | {f['lost']}"
        + (f" (before {lost_where})" if lost_where else "")
        + f" | {dup} | {f['sigkill']} | {f['sigterm']}"
        + (f" ({f['sigterm_escalated']} escalated)" if f["sigterm_escalated"] else "")
        + f" | {f['crashes']}"
        + f" | {', '.join(r.unassigned_at_end) or '-'} | {f['wall_s']:.0f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=25.0, help="callbacks per second")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--turns", type=int, default=8, help="turns per conversation")
    parser.add_argument("--kill-every", type=float, default=2.0, help="mean seconds between kills")
    parser.add_argument("--model-ms", type=int, default=500, help="the demo models' call time")
    parser.add_argument(
        "--easemob-ms", type=int, default=300, help="the simulated Easemob's answer time"
    )
    parser.add_argument("--seed", type=int, default=None, help="of the first run (then +1 each)")
    parser.add_argument(
        "--checkout", metavar="REV", help="run the services from this commit's imbot/"
    )
    parser.add_argument(
        "--anytime",
        action="store_true",
        help="kill replicas of unsettled groups too (Tansu may wedge a group then)",
    )
    parser.add_argument("--no-write", action="store_true", help="leave docs/benchmarks.md alone")
    parser.add_argument(
        "--section",
        default="chaos:Chaos",
        metavar="NAME:TITLE",
        help="the section of docs/benchmarks.md to write (another one for a baseline)",
    )
    args = parser.parse_args(argv)
    # Resolved now: the branch may move while the runs take their time.
    head = subprocess.run(
        ["git", "rev-parse", "--short", args.checkout or "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    cwd = checkout(head) if args.checkout else None
    results: list[ChaosResult] = []
    try:
        for i in range(args.runs):
            plan = ChaosPlan(
                messages=args.messages,
                rate=args.rate,
                turns=args.turns,
                kill_every_s=args.kill_every,
                model_latency_ms=args.model_ms,
                easemob_delay_ms=args.easemob_ms,
                seed=None if args.seed is None else args.seed + i,
                settled_only=not args.anytime,
            )
            print(f"run {i + 1}/{args.runs}", flush=True)
            result = asyncio.run(one_run(plan, i + 1, cwd))
            print(f"run {i + 1}: {result.figures()}", flush=True)
            results.append(result)
    finally:
        if cwd is not None:
            shutil.rmtree(cwd, ignore_errors=True)

    lost_where: Counter[str] = Counter()
    for r in results:
        lost_where.update(r.lost_by_stage())
    rows = [
        "| run | sent | accepted | replied once | DLQ + fallback | lost | duplicated"
        " | SIGKILL | SIGTERM | exited on their own | stalled groups | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row(i + 1, r) for i, r in enumerate(results)),
    ]
    totals = {
        "accepted": sum(len(r.accepted) for r in results),
        "lost": sum(len(r.lost) for r in results),
        "dup": sum(len(r.unexplained_duplicates) for r in results),
        "uncertain": sum(len(r.duplicates) - len(r.unexplained_duplicates) for r in results),
        "kills": sum(len(r.kills) for r in results),
        "bad_runs": sum(1 for r in results if r.lost or r.unexplained_duplicates),
    }
    plan = results[0].plan
    load = os.getloadavg()
    code = f"commit {head}" if args.checkout else f"the working tree on {head}"
    body = "\n".join(
        [
            *rows,
            "",
            f"**{totals['lost']} lost and {totals['dup']} whole replies delivered twice (besides"
            f" {totals['uncertain']} the ledger marked uncertain) of {totals['accepted']} accepted"
            f" messages, in {totals['bad_runs']} of {len(results)} runs, through"
            f" {totals['kills']} kills.**"
            + (
                " Lost messages stopped before: "
                + ", ".join(f"{k} ({v})" for k, v in sorted(lost_where.items()))
                + "."
                if lost_where
                else ""
            ),
            "",
            f"The services ran {code}. Each run: a fresh embedded broker (Tansu) and"
            " PostgreSQL database; the gateway,"
            f" the simulated Easemob, and moderate-in, route, model, moderate-out and the sender"
            f" at {plan.replicas} replicas each ({plan.partitions} partitions per topic, default"
            f" group timeouts and revoke/stop graces). {plan.messages} signed callbacks at"
            f" {plan.rate:g}/s: conversations of {plan.turns} turns (every {plan.group_every}th"
            f" a group @-mentioning the bot), the default policy (routing tiers, quotas,"
            f" history) with demo models taking {plan.model_latency_ms} ms, the simulated"
            f" Easemob answering a send after {plan.easemob_delay_ms} ms. From"
            f" {plan.first_kill_s:g} s into the load until its end, a replica every"
            f" {plan.kill_every_s * 0.5:g}-{plan.kill_every_s * 1.5:g} s (each replica once per"
            f" round, in random order"
            + (
                ", only while every replica of its stage holds partitions: Tansu wedges a group"
                " whose last member leaves while another one's join is pending"
                if plan.settled_only
                else ""
            )
            + f"), SIGKILL and SIGTERM in equal numbers, started again"
            f" {plan.down_s[0]:g}-{plan.down_s[1]:g} s after it exited. Then every msg_id the"
            " gateway accepted (answered with the intercept code: the record is in Kafka) must"
            " have one complete reply at the simulated Easemob, or a DLQ record and the fallback"
            " apology. 'lost … skipped' = the stage's group committed past the record (no"
            " output, no DLQ record); 'stuck' = it never got to it; 'DLQ, no reply' = a stage"
            " gave up on it and the user got nothing (the send stage has no fallback reply:"
            " it would go through the send stage itself); 'stalled groups' = stages"
            " with input partitions no replica held at the end."
            " 'duplicated' = a whole reply delivered twice; 'uncertain' = its resent"
            " part is marked so in the delivery ledger (a sender SIGKILLed between Easemob's"
            " answer and its ledger commit: Easemob has no idempotency key). 'refused' = the"
            " gateway answered with the fail policy (not counted). 'wall s' includes start-up"
            " (about 15 s) and waiting for quiescence."
            f" Everything on the same {os.cpu_count()} cores (load average {load[0]:.1f} at the"
            " end, other sessions' work included).",
        ]
    )
    print(body)
    if not args.no_write:
        name, _, title = args.section.partition(":")
        command = "python -m bench.chaos " + shlex.join(argv or sys.argv[1:])
        write_section(name, title or name, command, body)
    return 1 if totals["lost"] or totals["dup"] else 0


if __name__ == "__main__":
    sys.exit(main())
