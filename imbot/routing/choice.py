"""Pure pieces of the route decision: which budgets a call counts against, what it may
cost at most, and where the budgets stand. The route stage and the model stage both
use them (the route chooses with them, the model stage reserves with them), and so
do ``imbot route --explain`` and ``imbot usage``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from imbot.core.envelope import QuotaView
from imbot.core.routing import Budget, Quota, QuotaScope, Routing, to_micros


@dataclass(frozen=True, slots=True)
class Price:
    """List price per million tokens, in the policy's currency."""

    input: float
    output: float

    def micros(self, input_tokens: int, output_tokens: int) -> int:
        # Per million tokens in currency units = micro-units per token.
        return math.ceil(input_tokens * self.input + output_tokens * self.output)


def scopes_for(
    routing: Routing,
    tier: str,
    *,
    user: str | None,
    tenant: str,
    group: str | None,
    now: datetime,
) -> list[QuotaScope]:
    """Every budget a call by ``user`` counts against at ``now`` (UTC days and months);
    without a user (or a group), only the others.

    Only limited budgets are scopes: an unlimited one is neither checked nor counted
    (its spend is still in the reservations, which ``imbot usage`` sums)."""
    day, month = now.strftime("%Y-%m-%d"), now.strftime("%Y-%m")
    owners: list[tuple[str, str, Quota]] = []
    user_tier = routing.tiers.get(tier)
    if user_tier is not None and user is not None:
        owners.append(("user", f"user:{user}", user_tier.quota))
    owners.append(("tenant", f"tenant:{tenant}", routing.tenant_quota))
    if group is not None:
        owners.append(("group", f"group:{group}", routing.group_quota))
    scopes = []
    for who, prefix, quota in owners:
        for period, stamp, budget in (
            ("daily", f"d:{day}", quota.daily),
            ("monthly", f"m:{month}", quota.monthly),
        ):
            if budget.limited:
                scope = _scope(f"{prefix}:{stamp}", f"{who} {period}", budget)
                if who == "tenant":
                    scope = scope.model_copy(update={"shared": True})
                scopes.append(scope)
    return scopes


def _scope(key: str, label: str, budget: Budget) -> QuotaScope:
    micros = None if budget.cost is None else to_micros(budget.cost)
    return QuotaScope(key=key, label=label, tokens=budget.tokens, micros=micros)


def worst_case_micros(
    prices: Mapping[str, Price], chain: Sequence[str], input_tokens: int, output_tokens: int
) -> int:
    """What one call may cost at most: the dearest model of the chain it may fall back
    to, at the full prompt and the output cap (a model without a price costs 0)."""
    return max(
        (prices[m].micros(input_tokens, output_tokens) for m in chain if m in prices), default=0
    )


@dataclass(frozen=True, slots=True)
class Standing:
    """How full the budgets are, read before choosing (not the reservation: that is
    the model stage's atomic step)."""

    share: float  # of the fullest budget
    scope: str | None  # its label
    fits: bool  # whether a call of the estimated size still fits in every budget

    def view(self, downgrade_at: float, *, limited: bool) -> QuotaView:
        if not limited:
            return QuotaView()
        state = "exhausted" if not self.fits else "near" if self.share >= downgrade_at else "ok"
        return QuotaView(state=state, share=round(self.share, 4), scope=self.scope)


def standing(states: Sequence[tuple[QuotaScope, int, int]], tokens: int, micros: int) -> Standing:
    """From each scope with its used tokens and micros (spent + reserved)."""
    share, fullest, refusing = 0.0, None, None
    for scope, used_tokens, used_micros in states:
        limits = ((scope.tokens, used_tokens, tokens), (scope.micros, used_micros, micros))
        for limit, used, extra in limits:
            if limit is None:
                continue
            s = used / limit if limit else 1.0
            if s > share:
                share, fullest = s, scope.label
            if used + extra > limit and refusing is None:
                refusing = scope.label
    return Standing(share=share, scope=refusing or fullest, fits=refusing is None)
