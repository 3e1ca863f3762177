"""``imbot replay``, ``imbot trace`` and ``imbot dlq list|show|requeue``: the operator's
tools on the topics. Every command prints JSON lines on stdout (one per record, then a
summary) and keeps progress and errors on stderr, so its output can be piped to ``jq``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from imbot.core.logs import configure_logging
from imbot.core.settings import Settings, load_settings

# The stage names come from the pipeline table, which imports only the topic names: the
# parser does not load the stream machinery.
from imbot.streams.pipeline import STAGE_NAMES

if TYPE_CHECKING:
    from imbot.streams.dlq import DlqFilter
    from imbot.streams.reader import Bounds, Progress

_TIME_FORMS = "ISO 8601 (local time without an offset), ms epoch, or an age like 15m / 2h / 1d"

_SANDBOX_HELP = (
    "Sandboxed by default: every stage's input leads to the sender, so each replayed"
    " envelope is marked with this run's id and sandbox=true, and the send stage puts its"
    " reply on imbot.sandbox (see imbot trace) instead of sending it to the user. --deliver"
    " really delivers (the mark stays, with sandbox=false). A record that is no envelope is"
    " replayed byte for byte, unmarked, and counted. Sandboxed or not, a replay through the"
    " model stage calls the model again, and pays for it."
)

_IDEMPOTENT_HELP = (
    "Requeueing or delivering twice is harmless: every stage is idempotent per msg_id, and"
    " the sender's delivery ledger never sends a part twice, nor a second reply to a message"
    " already answered."
)


def _settings() -> Settings:
    settings = load_settings()
    configure_logging(settings.log_level, json=settings.log_json)
    return settings


def _progress(args: argparse.Namespace, label: str) -> Progress | None:
    """A progress line on stderr: with --progress, or by default when stderr is a terminal."""
    from imbot.streams.reader import Progress

    wanted = args.progress if args.progress is not None else sys.stderr.isatty()
    return Progress(label) if wanted else None


def _bounds(args: argparse.Namespace) -> Bounds:
    from imbot.streams.reader import Bounds, parse_time

    return Bounds(
        partition=args.partition,
        from_offset=getattr(args, "from_offset", None),
        to_offset=getattr(args, "to_offset", None),
        since_ms=parse_time(args.since) if args.since else None,
        until_ms=parse_time(args.until) if args.until else None,
    )


# -- replay, trace ------------------------------------------------------------


def cmd_replay(args: argparse.Namespace) -> int:
    from imbot.streams.reader import print_json
    from imbot.streams.replay import replay

    settings = _settings()
    summary = asyncio.run(
        replay(
            settings,
            args.topic,
            _bounds(args),
            conversation=args.conversation,
            msg_id=args.msg_id,
            to_stage=args.to_stage,
            dry_run=args.dry_run,
            limit=args.limit,
            deliver=args.deliver,
            rate=args.rate,
            progress=_progress(args, "replay"),
        )
    )
    print_json(summary.as_json())
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from imbot.streams.reader import parse_time, print_json
    from imbot.streams.trace import trace

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


# -- dlq ----------------------------------------------------------------------


def _filter(args: argparse.Namespace) -> DlqFilter:
    from imbot.streams.dlq import DlqFilter

    return DlqFilter(
        stage=args.stage, reason=args.reason, conversation=args.conversation, msg_id=args.msg_id
    )


def cmd_dlq_list(args: argparse.Namespace) -> int:
    from imbot.streams.dlq import list_dlq
    from imbot.streams.reader import print_json

    settings = _settings()
    summary = asyncio.run(list_dlq(settings, _bounds(args), _filter(args), limit=args.limit))
    print_json(summary.as_json())
    return 0


def cmd_dlq_show(args: argparse.Namespace) -> int:
    from imbot.streams.dlq import show_dlq

    shown = asyncio.run(
        show_dlq(_settings(), offset=args.offset, partition=args.partition, msg_id=args.msg_id)
    )
    if not shown:
        print("imbot: no such DLQ record", file=sys.stderr)
    return 0 if shown else 1


def cmd_dlq_requeue(args: argparse.Namespace) -> int:
    from imbot.streams.dlq import requeue
    from imbot.streams.reader import print_json

    settings = _settings()
    summary = asyncio.run(
        requeue(
            settings,
            _bounds(args),
            _filter(args),
            force=args.force,
            dry_run=args.dry_run,
            rate=args.rate,
            limit=args.limit,
        )
    )
    print_json(summary.as_json())
    return 0


# -- the parsers --------------------------------------------------------------


def _time_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--since", help=f"{what} stamped at or after: {_TIME_FORMS}")
    parser.add_argument("--until", help=f"{what} stamped before (same forms as --since)")


def _rate_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rate",
        type=float,
        help="produce at most this many records per second (default: as fast as it can)",
    )


def _add_replay(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    replay = sub.add_parser(
        "replay",
        help="re-produce a slice of a topic (or DLQ records) to a stage's input, sandboxed",
        description=(
            "Read a slice of one pipeline topic (no consumer group, nothing committed) and"
            " re-produce each selected record with its original key to the input topic of a"
            " stage: by default the topic itself (the stage that reads it runs again), and for"
            " an imbot.dlq record the input of the stage that failed it, with the original"
            f" bytes. {_SANDBOX_HELP} {_IDEMPOTENT_HELP} A replay after a fallback reply is"
            " recorded in imbot.delivered as a duplicate, not delivered. Prints one JSON line"
            " per record, then a summary with the replay's id."
        ),
    )
    replay.add_argument("--topic", required=True, help="base topic name, e.g. imbot.dlq")
    replay.add_argument("--partition", type=int, help="only this partition")
    replay.add_argument("--from-offset", type=int, help="first offset (inclusive)")
    replay.add_argument("--to-offset", type=int, help="last offset (inclusive)")
    _time_args(replay, "records")
    replay.add_argument("--conversation", help="only records keyed by this conversation id")
    replay.add_argument("--msg-id", help="only records of this Easemob msg_id")
    replay.add_argument(
        "--to-stage", choices=STAGE_NAMES, help="replay into this stage's input topic instead"
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="print what would be replayed, produce nothing"
    )
    replay.add_argument("--limit", type=int, help="replay at most this many records")
    replay.add_argument(
        "--deliver",
        action="store_true",
        help="really deliver the replies to the users (default: sandboxed to imbot.sandbox)",
    )
    _rate_arg(replay)
    replay.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress line on stderr: done/total, rate, ETA (default: when stderr is a TTY)",
    )
    replay.set_defaults(func=cmd_replay)


def _add_trace(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    trace = sub.add_parser(
        "trace",
        help="print every record of one msg_id on every topic, DLQ included, in time order",
        description=(
            "Scan every pipeline topic, imbot.sandbox and imbot.dlq for one Easemob msg_id"
            " and print each stage's view as a JSON line in time order (topic, offset, stamps,"
            " verdicts, route, completion, reply length, delivery, DLQ error; never the user's"
            " text), then a summary. A replayed record's view carries its replay mark (the"
            " run's id, sandboxed or not); a sandboxed replay's answer is the view on"
            " imbot.sandbox (sandboxed_reply). Exit status 1 when nothing was found."
        ),
    )
    trace.add_argument("msg_id")
    trace.add_argument("--since", help=f"scan from this time ({_TIME_FORMS})")
    trace.add_argument("--until", help="scan records stamped before this time")
    trace.set_defaults(func=cmd_trace)


def _dlq_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", choices=STAGE_NAMES, help="only records this stage failed")
    parser.add_argument(
        "--reason",
        help="only this reason (a fatal error's: bad_request, quota_exhausted, …) or error kind",
    )
    _time_args(parser, "DLQ records")
    parser.add_argument("--conversation", help="only records of this conversation id")
    parser.add_argument("--msg-id", help="only records of this Easemob msg_id")
    parser.add_argument("--partition", type=int, help="only this partition of imbot.dlq")
    parser.add_argument("--limit", type=int, help="at most this many records")


def _add_dlq(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dlq = sub.add_parser("dlq", help="list, show and requeue the records stages gave up on")
    dlq_sub = dlq.add_subparsers(dest="action", required=True)
    listing = dlq_sub.add_parser(
        "list",
        help="one JSON line per DLQ record (no user text), then counts by stage and reason",
        description=(
            "One JSON line per record of imbot.dlq: partition, offset, stage, reason, error"
            " kind and text (free of user text), attempts, msg_id, conversation, time, source"
            " and whether it was requeued; then a summary with counts by stage and by reason."
            " The record's original bytes (the user's message) are never printed: see show."
        ),
    )
    _dlq_filters(listing)
    listing.set_defaults(func=cmd_dlq_list)
    show = dlq_sub.add_parser(
        "show",
        help="the whole DLQ record, its original bytes (the user's message) included",
        description=(
            "Print whole imbot.dlq records, their original bytes included. Those bytes are the"
            " user's message: this command exists for an operator who explicitly asks for"
            " them; do not paste its output where user data may not go. Name the record by"
            " OFFSET (with --partition; without it, the records at that offset on every"
            " partition) or by --msg-id. Exit status 1 when nothing was found."
        ),
    )
    show.add_argument("offset", type=int, nargs="?", help="the record's offset in imbot.dlq")
    show.add_argument("--partition", type=int, help="the record's partition of imbot.dlq")
    show.add_argument("--msg-id", help="the records of this Easemob msg_id")
    show.set_defaults(func=cmd_dlq_show)
    requeue = dlq_sub.add_parser(
        "requeue",
        help="send DLQ records' original bytes back to the failed stage, once each",
        description=(
            "Send each selected record's original bytes, with its original key, back to the"
            " input topic of the stage that failed it, unchanged (not sandboxed: the reply"
            " reaches the user), and mark it on imbot.dlq.requeued, which every operator's"
            " machine reads: a record already requeued is skipped unless --force. The mark is"
            f" written after the broker acknowledged the record. {_IDEMPOTENT_HELP} Prints one"
            " JSON line per record, then a summary."
        ),
    )
    _dlq_filters(requeue)
    requeue.add_argument(
        "--force", action="store_true", help="requeue records that were requeued before too"
    )
    requeue.add_argument(
        "--dry-run", action="store_true", help="print what would be requeued, produce nothing"
    )
    _rate_arg(requeue)
    requeue.set_defaults(func=cmd_dlq_requeue)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_replay(sub)
    _add_trace(sub)
    _add_dlq(sub)
