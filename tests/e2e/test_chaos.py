"""Chaos: two replicas of every stage and of the sender, killed and restarted under load.

The gateway, the simulated Easemob, and moderate-in, route, model, moderate-out and send at
two replicas each, as real processes on the embedded broker and PostgreSQL. Signed
callbacks arrive at 10/s (conversations of several turns, chats and group mentions) while
a random replica is killed every few seconds, SIGKILL or SIGTERM, and started again (only
while its stage's group is settled: ``ChaosRun._killable`` says which broker defect that
avoids). Then
every msg_id the gateway accepted must have one complete reply at the user, or a DLQ
record and the fallback apology; no reply may reach the user twice (except a part the
sender's ledger marked uncertain after a SIGKILL: Easemob has no idempotency key). The
harness (``imbot.cli.chaos``) waits for quiescence with a deadline and names every lost
msg_id with its conversation, the topics it reached and the stage it stopped before.
``make chaos`` runs the same with more messages and kills, several times.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imbot.cli.chaos import ChaosPlan, run_chaos
from imbot.devtools.broker import EmbeddedBroker

# About 25 s of load and 8-10 kills (each replica about once). About 1 min on 2 cores when
# every message is answered; about 3.5 min when one is lost (the settle deadline is waited
# out). The timeout covers a busy machine on top of that.
PLAN = ChaosPlan(messages=250, rate=10.0, turns=8, kill_every_s=2.0)


@pytest.mark.timeout(600)
async def test_every_accepted_message_is_answered_once_while_replicas_are_killed(
    broker: EmbeddedBroker, pg_url: str, tmp_path: Path
) -> None:
    result = await run_chaos(
        PLAN, bootstrap=broker.bootstrap, database_url=pg_url, work_dir=tmp_path, out=print
    )
    report = result.report()
    print(report)
    # The chaos really happened, with both signals, on a load that really got in.
    kills = result.kills_by_signal()
    assert kills["SIGKILL"] >= 1, report
    assert kills["SIGTERM"] >= 1, report
    assert len(result.accepted) >= len(result.sent) // 2, report
    # Every accepted msg_id has its outcome, and no whole reply reached the user twice.
    assert [lost.describe() for lost in result.lost] == [], report
    assert [d.describe() for d in result.unexplained_duplicates] == [], report
    outcomes = result.replied_once + result.dlq_fallback + result.answer_and_fallback
    assert outcomes == len(result.accepted), report
