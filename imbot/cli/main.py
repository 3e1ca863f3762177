"""The ``imbot`` command: one entry point for every service and tool."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Sequence

from imbot.core.errors import ConfigurationError
from imbot.core.logs import configure_logging
from imbot.core.settings import Settings, load_settings

# The stages `imbot worker --stage` and `imbot replay --to-stage` accept are the rows of the
# pipeline table; streams.pipeline imports nothing but the topic names, so the parser does
# not load the stream machinery.
from imbot.streams.pipeline import PROCESSING_STAGES, SENDER_STAGES, STAGE_NAMES


def _settings() -> Settings:
    settings = load_settings()
    configure_logging(settings.log_level, json=settings.log_json)
    settings.policy  # noqa: B018 - validate the policy file before anything starts
    return settings


def cmd_gateway(args: argparse.Namespace) -> int:
    from imbot.gateway.app import main

    main(_settings())
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from imbot.streams.worker import main

    main(_settings(), args.stage or PROCESSING_STAGES)
    return 0


def cmd_sender(args: argparse.Namespace) -> int:
    from imbot.streams.worker import main

    main(_settings(), SENDER_STAGES)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from imbot.storage import upgrade

    settings = load_settings()
    upgrade(settings.database_url)
    print(f"database migrated: {settings.database_url.split('@')[-1]}")
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from imbot.cli.devstack import DevStack, simulate

    started = time.monotonic()
    stack = DevStack(usual_ports=True)
    # SIGTERM (kill, Ctrl-C in some terminals, a supervisor) must stop the children too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        stack.start()
        stack.wait_ready(timeout=60)
        env = stack.env
        print("imbot dev is starting…", flush=True)
        result = simulate(stack.simulator_url, "你好", timeout=60)
        took = time.monotonic() - started
        replies = result["replies"]
        first = replies[0]["body"]["msg"] if isinstance(replies, list) and replies else "(none yet)"
        print(
            f"""
imbot is running (first reply after {took:.1f}s).

  Easemob callback URL  {stack.callback_url}
  callback secret       {stack.secret}   (IMBOT_CALLBACK_SECRETS)
  Kafka (embedded)      {env["IMBOT_KAFKA_BOOTSTRAP"]}
  database              {env["IMBOT_DATABASE_URL"]}
  Easemob simulator     {stack.simulator_url}   (messages: {stack.simulator_url}/_sim/messages)
  metrics               http://127.0.0.1:{stack.gateway_port}/metrics
  logs                  {stack.log_dir}/

  model: {"DEMO MODEL (canned replies, not an LLM) — configure a real provider in the policy file" if _demo_only() else "as configured in the policy file"}
  first reply: {first}

Try:  .venv/bin/imbot simulate "介绍一下你自己"      Stop: Ctrl-C
""",
            flush=True,
        )
        while True:
            stack.check_alive()
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()


def _demo_only() -> bool:
    policy = load_settings().policy
    names = {m for r in policy.routes.values() for m in r.models} | policy.routing.model_names()
    return all(policy.models[m].get("provider") == "demo" for m in names)


def cmd_simulate(args: argparse.Namespace) -> int:
    from imbot.cli.devstack import STATE_FILE, simulate

    url = args.simulator_url
    if not url:
        if not STATE_FILE.exists():
            print(
                "no running `imbot dev` found (start it, or pass --simulator-url)", file=sys.stderr
            )
            return 2
        url = json.loads(STATE_FILE.read_text())["simulator_url"]
    result = simulate(url, args.text, sender=args.sender, bot=args.bot, timeout=args.timeout)
    replies = result["replies"]
    print(json.dumps(replies, ensure_ascii=False, indent=2))
    return 0


def cmd_moderate(args: argparse.Namespace) -> int:
    from imbot.moderation import Moderator

    settings = load_settings()
    moderator = Moderator.from_config(
        settings.policy.moderation, base_dir=settings.policy_file.parent
    )
    check = moderator.check_output if args.output else moderator.check_input
    result = check(args.text)
    print(json.dumps(result.to_json(), ensure_ascii=False, indent=2))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    import asyncio

    from imbot.streams.replay import Bounds, parse_time, print_json, replay

    settings = _settings()
    bounds = Bounds(
        partition=args.partition,
        from_offset=args.from_offset,
        to_offset=args.to_offset,
        since_ms=parse_time(args.since) if args.since else None,
        until_ms=parse_time(args.until) if args.until else None,
    )
    summary = asyncio.run(
        replay(
            settings,
            args.topic,
            bounds,
            conversation=args.conversation,
            msg_id=args.msg_id,
            to_stage=args.to_stage,
            dry_run=args.dry_run,
            limit=args.limit,
        )
    )
    print_json(summary.as_json())
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    import asyncio

    from imbot.streams.replay import parse_time, print_json, trace

    settings = _settings()
    result = asyncio.run(
        trace(
            settings,
            args.msg_id,
            since_ms=parse_time(args.since) if args.since else None,
            until_ms=parse_time(args.until) if args.until else None,
        )
    )
    for view in result.views:
        print_json(view)
    print_json(result.summary())
    return 0 if result.views else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imbot", description="LLMs behind an Easemob IM app")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "dev", help="run everything locally (embedded Kafka, SQLite, simulator, demo model)"
    ).set_defaults(func=cmd_dev)
    sub.add_parser("gateway", help="serve the Easemob before-send callback").set_defaults(
        func=cmd_gateway
    )
    worker = sub.add_parser("worker", help="run pipeline stages (default: all processing stages)")
    worker.add_argument(
        "--stage",
        action="append",
        choices=STAGE_NAMES,
        help="run only this stage (repeatable)",
    )
    worker.set_defaults(func=cmd_worker)
    sub.add_parser("sender", help="deliver replies through the Easemob REST API").set_defaults(
        func=cmd_sender
    )
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)
    simulate = sub.add_parser("simulate", help="send a signed test callback and print the reply")
    simulate.add_argument("text")
    simulate.add_argument("--sender", default="alice")
    simulate.add_argument("--bot", default="ai_bot")
    simulate.add_argument("--timeout", type=float, default=30.0)
    simulate.add_argument("--simulator-url", default="")
    simulate.set_defaults(func=cmd_simulate)
    moderate = sub.add_parser("moderate", help="print the moderation verdict for a text as JSON")
    moderate.add_argument("text")
    moderate.add_argument(
        "--output", action="store_true", help="review as a model answer (moderate-out)"
    )
    moderate.set_defaults(func=cmd_moderate)
    replay = sub.add_parser(
        "replay",
        help="re-produce a slice of a topic (or DLQ records) to a stage's input",
        description=(
            "Read a slice of one pipeline topic (no consumer group, nothing committed) and"
            " re-produce each selected record with its original key to the input topic of a"
            " stage: by default the topic itself (the stage that reads it runs again), and for"
            " an imbot.dlq record the input of the stage that failed it, with the original"
            " bytes. Replaying is safe: every stage and the sender are idempotent per msg_id,"
            " and the sender's delivery ledger never sends a part twice, nor a second reply"
            " to a message already answered (a replay after a fallback reply is recorded in"
            " imbot.delivered as a duplicate, not delivered). Replaying through the model"
            " stage calls the model again. Prints one JSON line per record, then a summary."
        ),
    )
    replay.add_argument("--topic", required=True, help="base topic name, e.g. imbot.dlq")
    replay.add_argument("--partition", type=int, help="only this partition")
    replay.add_argument("--from-offset", type=int, help="first offset (inclusive)")
    replay.add_argument("--to-offset", type=int, help="last offset (inclusive)")
    replay.add_argument(
        "--since", help="records stamped at or after: ISO 8601 (local time), ms epoch, or 15m/2h"
    )
    replay.add_argument("--until", help="records stamped before (same forms as --since)")
    replay.add_argument("--conversation", help="only records keyed by this conversation id")
    replay.add_argument("--msg-id", help="only records of this Easemob msg_id")
    replay.add_argument(
        "--to-stage",
        choices=STAGE_NAMES,
        help="replay into this stage's input topic instead",
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="print what would be replayed, produce nothing"
    )
    replay.add_argument("--limit", type=int, help="replay at most this many records")
    replay.set_defaults(func=cmd_replay)
    trace = sub.add_parser(
        "trace",
        help="print every record of one msg_id on every topic, DLQ included, in time order",
        description=(
            "Scan every pipeline topic for one Easemob msg_id and print each stage's view as"
            " a JSON line in time order (topic, offset, stamps, verdicts, route, completion,"
            " reply length, delivery, DLQ error; never the user's text), then a summary."
            " Exit status 1 when nothing was found."
        ),
    )
    trace.add_argument("msg_id")
    trace.add_argument("--since", help="scan from this time (ISO 8601, ms epoch, or 15m/2h)")
    trace.add_argument("--until", help="scan records stamped before this time")
    trace.set_defaults(func=cmd_trace)
    from imbot.cli.routing import add_parsers

    add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigurationError as exc:
        print(f"imbot: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
