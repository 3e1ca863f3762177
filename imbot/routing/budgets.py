"""The money side of a route decision: the budgets a call counts against and their
arithmetic over the policy (``Budgets``), where they stand for a call of a given size
(``budget_view``), and each model's price. The route stage chooses with them, the
model stage reserves and settles with them, and so do ``imbot route --explain``,
``imbot usage`` and the benchmarks."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol

from imbot.core.envelope import Completion, Envelope, QuotaView
from imbot.core.routing import QuotaScope, to_micros
from imbot.core.settings import Policy, Settings
from imbot.routing.choice import Price, scopes_for, standing, worst_case_micros

DEFAULT_OUTPUT_CAP = 1024  # output tokens reserved for a route without max_output_tokens


class BudgetState(Protocol):
    """Where one budget stands (the quota ledger's ``ScopeState``)."""

    @property
    def scope(self) -> QuotaScope: ...
    @property
    def spent_tokens(self) -> int: ...
    @property
    def spent_micros(self) -> int: ...
    @property
    def used_tokens(self) -> int: ...
    @property
    def used_micros(self) -> int: ...


def budget_view(
    states: Sequence[BudgetState], tokens: int, micros: int, downgrade_at: float
) -> QuotaView:
    """Where the budgets stand for a call of this size, as the route stage sees them.

    Only what was spent closes a budget here. Calls in flight hold reservations that may
    settle for less, or belong to a worker that died: they make it "near", and the model
    stage's reservation (atomic, expiring the dead) decides."""
    used = standing([(s.scope, s.used_tokens, s.used_micros) for s in states], tokens, micros)
    view = used.view(downgrade_at, limited=bool(states))
    if view.state == "exhausted":
        spent = [(s.scope, s.spent_tokens, s.spent_micros) for s in states]
        if standing(spent, tokens, micros).fits:
            return view.model_copy(update={"state": "near"})
    return view


@dataclasses.dataclass(frozen=True, slots=True)
class Budgets:
    """The quota arithmetic both the route and the model stage do, over the policy."""

    policy: Policy
    prices: dict[str, Price]
    tenant: str

    @classmethod
    def of(cls, settings: Settings) -> Budgets:
        return cls(settings.policy, policy_prices(settings.policy), tenant_of(settings))

    def scopes(self, env: Envelope, tier: str) -> list[QuotaScope]:
        """The budgets a call for ``env`` counts against. A sandboxed replay is an
        operator's experiment: the app pays for its calls (the tenant's budgets), the
        user and the group whose message it replays do not."""
        if env.replay is not None and env.replay.sandbox:
            return self.scopes_of(tier, user=None, group=None)
        group = env.to if env.chat_type.value != "chat" else None
        return self.scopes_of(tier, user=env.sender, group=group)

    def scopes_of(self, tier: str, *, user: str | None, group: str | None) -> list[QuotaScope]:
        return scopes_for(
            self.policy.routing,
            tier,
            user=user,
            tenant=self.tenant,
            group=group,
            now=datetime.now(UTC),
        )

    def worst_case(self, chain: Sequence[str], input_tokens: int, max_output: int | None) -> int:
        return worst_case_micros(self.prices, chain, input_tokens, max_output or DEFAULT_OUTPUT_CAP)

    def spent_micros(self, model: str | None, completion: Completion | None) -> int:
        """What a finished call cost, in micro-units of the policy's currency."""
        if completion is None:
            return 0
        if completion.cost is not None and completion.currency == self.policy.routing.currency:
            return to_micros(completion.cost)
        price = self.prices.get(model or "")
        if price is None:
            return 0
        return price.micros(completion.input_tokens or 0, completion.output_tokens or 0)


def tenant_of(settings: Settings) -> str:
    """The tenant a tenant quota counts: the Easemob app."""
    return f"{settings.easemob_org}#{settings.easemob_app}"


def policy_prices(policy: Policy) -> dict[str, Price]:
    """Each catalog model's price (in the policy's one currency: ``check_policy``)."""
    return {
        name: Price(entry.price.input, entry.price.output) for name, entry in policy.models.items()
    }
