"""``imbot feedback report``: how satisfied users are with the answers, by model and tier.

Reads the feedback table the sender's feedback stage writes (docs/feedback.md) and joins
each rating to the answer it rates (``storage.FeedbackLog.report``). Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from imbot.cli.routing import _since
from imbot.core.settings import Settings, load_settings


async def feedback_report(settings: Settings, since: str | None) -> dict[str, Any]:
    from imbot.storage import open_storage

    storage = await open_storage(settings.database_url)
    try:
        report = await storage.feedback.report(_since(since))
    finally:
        await storage.close()
    return report.as_json()


def cmd_feedback(args: argparse.Namespace) -> int:
    settings = load_settings()
    print(
        json.dumps(asyncio.run(feedback_report(settings, args.since)), ensure_ascii=False, indent=2)
    )
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    feedback = sub.add_parser("feedback", help="users' ratings of the bot's answers")
    actions = feedback.add_subparsers(dest="action", required=True)
    report = actions.add_parser(
        "report",
        help="satisfaction by model and tier (up, down, share of up) as JSON",
        description=(
            "Join every rating in the feedback table to the answer it rates (the reply's"
            " Easemob msg id in the delivery ledger, then the answer's usage row for the"
            " model and its quota reservation for the tier) and print, per model and"
            " tier, the ups, the downs and the share of ups. 'unmatched' counts ratings"
            " of a reply the ledger does not know (a wrong id, or a reply not sent by"
            " this deployment)."
        ),
    )
    report.add_argument("--since", help="ISO 8601 (UTC if naive) or 30m / 12h / 7d")
    report.set_defaults(func=cmd_feedback)
