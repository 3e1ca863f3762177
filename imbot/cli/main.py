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


def cmd_console(args: argparse.Namespace) -> int:
    from imbot.console.app import main

    main(_settings())
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    import asyncio

    from imbot.storage import open_database, upgrade

    settings = load_settings()
    where = settings.database_url.split("@")[-1]
    if args.check:
        # Exit 2 (a ConfigurationError naming both revisions) when the database is behind:
        # for an initContainer or a deploy script that must not start services early.
        async def check() -> None:
            await (await open_database(settings.database_url)).close()

        asyncio.run(check())
        print(f"database is at the code's migration: {where}")
        return 0
    upgrade(settings.database_url)
    print(f"database migrated: {where}")
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
        metrics = "\n                        ".join(
            f"{url}   ({name})" for name, url in stack.metrics_urls().items()
        )
        print(
            f"""
imbot is running (first reply after {took:.1f}s).

  Easemob callback URL  {stack.callback_url}
  operator console      {stack.console_url}   (operator token: {stack.console_token or "see IMBOT_CONSOLE_TOKENS"}; viewer: {stack.console_viewer_token or "—"})
  callback secret       {stack.secret}   (IMBOT_CALLBACK_SECRETS)
  Kafka (embedded)      {env["IMBOT_KAFKA_BOOTSTRAP"]}
  database              {env["IMBOT_DATABASE_URL"]}
  Easemob simulator     {stack.simulator_url}   (messages: {stack.simulator_url}/_sim/messages)
  metrics               {metrics}
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
    return all(policy.models[m].provider == "demo" for m in names)


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
    sub.add_parser(
        "console", help="serve the operator console (pipeline, conversations, DLQ, money)"
    ).set_defaults(func=cmd_console)
    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.add_argument(
        "--check", action="store_true", help="apply nothing; exit 2 when migrations are behind"
    )
    migrate.set_defaults(func=cmd_migrate)
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
    from imbot.cli.feedback import add_parsers as add_feedback_parsers
    from imbot.cli.ops import add_parsers as add_ops_parsers
    from imbot.cli.routing import add_parsers

    add_parsers(sub)
    add_ops_parsers(sub)
    add_feedback_parsers(sub)
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
