"""The route and model stages as the tests build them: over any storage that speaks the
stage protocols (the in-memory fakes of tests/fakes/storage.py or the real repositories),
and the default policy with a test's changes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from imbot.adapters import ModelCatalog
from imbot.core.envelope import Envelope
from imbot.core.settings import DEFAULT_POLICY_FILE, Settings, load_settings
from imbot.routing.budgets import Budgets
from imbot.routing.health import OpenCircuits
from imbot.routing.tiers import TierBook
from imbot.streams.boundary import AfterPublish, Emit
from imbot.streams.stages import CallModel, Files, Route


def default_policy() -> dict[str, Any]:
    """The default policy file's data, to change and write with ``settings_with``."""
    data: dict[str, Any] = yaml.safe_load(DEFAULT_POLICY_FILE.read_text(encoding="utf-8"))
    return data


def settings_with(tmp_path: Path, policy: dict[str, Any]) -> Settings:
    """Settings whose policy file is ``policy``, written into ``tmp_path``."""
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, allow_unicode=True), encoding="utf-8")
    return load_settings(policy_file=path, callback_secrets="test")


def route_stage(settings: Settings, store: Any, *, circuits_ttl_s: float | None = None) -> Route:
    """The route stage over ``store``; with ``circuits_ttl_s``, reading model health too."""
    return Route(
        settings.policy,
        store.history,
        tiers=TierBook(settings.policy.routing, store.tiers),
        quota=store.quota,
        budgets=Budgets.of(settings),
        circuits=None
        if circuits_ttl_s is None
        else OpenCircuits(store.health, ttl_s=circuits_ttl_s),
        usage=store.usage,
    )


def model_stage(
    settings: Settings,
    store: Any,
    catalog: ModelCatalog,
    *,
    files: Files | None = None,
    health: bool = False,
) -> CallModel:
    """The model stage over ``store`` and ``catalog``."""
    return CallModel(
        settings.policy,
        catalog,
        audit=store.audit,
        history=store.history,
        usage=store.usage,
        quota=store.quota,
        budgets=Budgets.of(settings),
        files=files,
        health=store.health if health else None,
    )


async def handled(stage: CallModel, env: Envelope, *, within_s: float = 10) -> list[Emit]:
    """What the model stage emits for ``env``, with its after-publish work done (the
    settlement, the usage row) as the boundary does it once the outputs are published."""
    outputs = await stage.handle(env, deadline=time.monotonic() + within_s)
    for after in outputs:
        if isinstance(after, AfterPublish):
            await after.run()
    return [out for out in outputs if isinstance(out, Emit)]
