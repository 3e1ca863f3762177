"""``imbot route --explain``, ``imbot usage`` and ``imbot users set-tier``: the routing
policy and the budgets, seen and changed from the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from imbot.core.envelope import ChatType, Content, Envelope, Turn, conversation_id
from imbot.core.errors import ConfigurationError, StorageError, StorageUnavailable
from imbot.core.routing import MICROS, QuotaScope
from imbot.core.settings import Settings, load_settings

# The parser (every `imbot` command builds it) loads none of the machinery below.
if TYPE_CHECKING:
    from imbot.storage import ScopeState, Storage


class _Offline:
    """Stands in for the database when it cannot be opened: no history, no tiers set,
    nothing spent. ``route --explain`` says so in its output."""

    async def history_window(self, *_: Any, **__: Any) -> tuple[Turn, ...]:
        return ()

    async def clear_history(self, conversation_id: str) -> None:
        return None

    async def tier_of(self, user_id: str) -> str | None:
        return None

    async def states(self, scopes: Sequence[QuotaScope]) -> list[ScopeState]:
        from imbot.storage import ScopeState

        return [ScopeState(s) for s in scopes]


async def _open(settings: Settings) -> tuple[Storage | None, str]:
    from imbot.storage import open_storage

    try:
        return await open_storage(settings.database_url), "database"
    except (ConfigurationError, StorageError, StorageUnavailable, OSError) as exc:
        return None, f"unavailable ({type(exc).__name__}): no history, tiers or spend read"


def _envelope(args: argparse.Namespace, settings: Settings) -> Envelope:
    chat_type = ChatType(args.chat_type)
    bot = args.bot or settings.policy.bots[0].id
    group = args.group if chat_type is not ChatType.direct else None
    return Envelope(
        msg_id=f"explain-{uuid.uuid4().hex[:12]}",
        conversation_id=conversation_id(chat_type, bot=bot, sender=args.user, group_id=group),
        chat_type=chat_type,
        sender=args.user,
        to=group or bot,
        bot=bot,
        content=Content(type=args.type, text=args.text),
    )


async def explain(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from imbot.routing.budgets import Budgets
    from imbot.routing.complexity import score_complexity
    from imbot.routing.tiers import TierBook
    from imbot.streams.stages import Route

    storage, source = await _open(settings)
    offline = _Offline()
    history = storage.history if storage else offline
    tiers = storage.tiers if storage else offline
    quota = storage.quota if storage else offline
    stage = Route(
        settings.policy,
        history,
        tiers=TierBook(settings.policy.routing, tiers),
        quota=quota,
        budgets=Budgets.of(settings),
    )
    env = _envelope(args, settings)
    started = time.perf_counter()
    try:
        outputs = await stage.handle(env, deadline=time.monotonic() + 10)
    finally:
        if storage is not None:
            await storage.close()
    took_ms = (time.perf_counter() - started) * 1000
    result: dict[str, Any] = {"storage": source, "decision_ms": round(took_ms, 3)}
    if not outputs:
        return {**result, "outcome": "ignored", "why": "nothing to answer (empty or ignored type)"}
    out = outputs[0].envelope
    if out.reply is not None:
        result.update(outcome="answered_without_model", reply_kind=out.reply.kind)
        result["reply"] = out.reply.text
    else:
        result["outcome"] = "model"
    if out.route is not None:
        route = out.route.model_dump(mode="json", exclude={"history", "system_prompt"})
        route["history_turns"] = len(out.route.history)
        route["fallbacks"] = route["models"][1:]
        route["model"] = route["models"][0] if route["models"] else None
        if out.route.score is not None:
            route["contributions"] = score_complexity(
                args.text, turns=len(out.route.history)
            ).contributions
        result["route"] = route
    return result


def cmd_route(args: argparse.Namespace) -> int:
    settings = load_settings()
    settings.policy  # noqa: B018 - a broken policy fails here, with its file and key
    print(json.dumps(asyncio.run(explain(args, settings)), ensure_ascii=False, indent=2))
    return 0


def _since(value: str | None) -> datetime | None:
    """ISO 8601 (naive = UTC), or a span back from now: 30m, 12h, 7d."""
    if not value:
        return None
    units = {"m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].isdigit():
        return datetime.now(UTC) - timedelta(seconds=int(value[:-1]) * units[value[-1]])
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigurationError(f"--since {value!r}: use ISO 8601 or 30m / 12h / 7d") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


async def usage_report(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from imbot.routing.budgets import Budgets
    from imbot.routing.tiers import TierBook
    from imbot.storage import open_storage

    policy = settings.policy
    since = _since(args.since)
    storage = await open_storage(settings.database_url)
    try:
        rows = await storage.quota.spend(user_id=args.user, since=since)
        report: dict[str, Any] = {
            "currency": policy.routing.currency,
            "since": since.isoformat() if since else None,
            "spend": [
                {
                    "user": r.user_id,
                    "tier": r.tier,
                    "model": r.model,
                    "calls": r.calls,
                    "tokens": r.tokens,
                    "cost": r.micros / MICROS,
                }
                for r in rows
            ],
            "total_cost": sum(r.micros for r in rows) / MICROS,
        }
        if args.user and policy.routing.enabled:
            tier = await TierBook(policy.routing, storage.tiers).tier_of(args.user)
            scopes = Budgets.of(settings).scopes_of(tier, user=args.user, group=None)
            states = await storage.quota.states(scopes)
            report["tier"] = tier
            report["budgets"] = [_budget(s) for s in states]
        return report
    finally:
        await storage.close()


def _budget(state: ScopeState) -> dict[str, Any]:
    scope = state.scope
    out: dict[str, Any] = {"budget": scope.label, "key": scope.key}
    if scope.tokens is not None:
        out.update(tokens_limit=scope.tokens, tokens_used=state.used_tokens)
        out["tokens_left"] = max(0, scope.tokens - state.used_tokens)
    if scope.micros is not None:
        out.update(cost_limit=scope.micros / MICROS, cost_used=state.used_micros / MICROS)
        out["cost_left"] = max(0, scope.micros - state.used_micros) / MICROS
    out["reserved_cost"] = state.reserved_micros / MICROS
    return out


def cmd_usage(args: argparse.Namespace) -> int:
    settings = load_settings()
    print(json.dumps(asyncio.run(usage_report(args, settings)), ensure_ascii=False, indent=2))
    return 0


async def _set_tier(settings: Settings, user: str, tier: str | None) -> None:
    from imbot.storage import open_storage

    storage = await open_storage(settings.database_url)
    try:
        await storage.tiers.set_tier(user, tier)
    finally:
        await storage.close()


async def _list_tiers(settings: Settings) -> dict[str, str]:
    from imbot.storage import open_storage

    storage = await open_storage(settings.database_url)
    try:
        return await storage.tiers.all_tiers()
    finally:
        await storage.close()


def cmd_users(args: argparse.Namespace) -> int:
    settings = load_settings()
    routing = settings.policy.routing
    if args.action == "list":
        table = asyncio.run(_list_tiers(settings))
        print(
            json.dumps(
                {"table": table, "policy": routing.users, "default": routing.default_tier},
                ensure_ascii=False,
                indent=2,
            )
        )
        return 0
    tier = None if args.action == "clear-tier" else args.tier
    if tier is not None and tier not in routing.tiers:
        known = ", ".join(sorted(routing.tiers)) or "none (routing.tiers is empty)"
        raise ConfigurationError(f"unknown tier {tier!r}; the policy's tiers: {known}")
    asyncio.run(_set_tier(settings, args.user, tier))
    print(json.dumps({"user": args.user, "tier": tier}, ensure_ascii=False))
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    route = sub.add_parser(
        "route",
        help="explain which model a message would go to, and why (no model is called)",
    )
    route.add_argument("--explain", action="store_true", help="print the decision as JSON")
    route.add_argument("--user", default="alice")
    route.add_argument("--bot", default="")
    route.add_argument("--chat-type", default="chat", choices=[t.value for t in ChatType])
    route.add_argument("--group", default="group-1", help="group id for group/chatroom")
    route.add_argument("--type", default="txt", help="message body type (txt, img, audio, …)")
    route.add_argument("text")
    route.set_defaults(func=cmd_route)
    usage = sub.add_parser("usage", help="spend and budgets left, by user, tier and model")
    usage.add_argument("--user")
    usage.add_argument("--since", help="ISO 8601 (UTC if naive) or 30m / 12h / 7d")
    usage.set_defaults(func=cmd_usage)
    users = sub.add_parser("users", help="user tiers (server-side; never from the client)")
    users_sub = users.add_subparsers(dest="action", required=True)
    set_tier = users_sub.add_parser("set-tier", help="set a user's tier")
    set_tier.add_argument("user")
    set_tier.add_argument("tier")
    clear = users_sub.add_parser("clear-tier", help="back to the policy's tier for the user")
    clear.add_argument("user")
    users_sub.add_parser("list", help="tiers set in the table and in the policy")
    users.set_defaults(func=cmd_users)
