"""The demo model and catalog configuration (no network needed for these)."""

from __future__ import annotations

import time

import pytest

from imbot.adapters import ChatMessage, ChatRequest, build_catalog
from imbot.core.errors import ConfigurationError
from imbot.core.settings import DEFAULT_POLICY_FILE, load_policy
from tests.integration.adapters.helpers import REQUEST, collect


async def test_default_policy_builds_and_the_demo_says_what_it_is() -> None:
    catalog = build_catalog(load_policy(DEFAULT_POLICY_FILE).models, env={})
    # Every model of the default policy is a demo model (no keys needed); ask each.
    try:
        results = [await catalog.complete([m], REQUEST, deadline_s=5) for m in catalog.model_ids]
    finally:
        await catalog.aclose()
    assert results
    for model_id, result in zip(catalog.model_ids, results, strict=True):
        assert result.text.startswith("【演示模型 demo】")
        assert "你好" in result.text  # echoes the question
        assert result.provider == "demo"
        assert result.model_id == model_id
        assert result.usage is not None
        price = catalog.entry(model_id).config.price
        assert result.cost == price.cost(result.usage.input_tokens, result.usage.output_tokens)
        assert result.currency == price.currency
        assert result.latency_ms < 50


async def test_demo_summarises_long_questions_and_streams() -> None:
    long_question = "请详细介绍一下" + "北京的历史" * 50
    request = ChatRequest(messages=(ChatMessage(role="user", content=long_question),))
    catalog = build_catalog({"demo": {"provider": "demo", "latency_ms": 50}}, env={})
    started = time.monotonic()
    text, _, done = await collect(catalog.stream(["demo"], request, deadline_s=5))
    assert time.monotonic() - started >= 0.05
    assert text.startswith("【演示模型 demo】")
    assert "…" in text
    assert len(text) < 150
    assert done.result is not None
    assert done.result.text == text


@pytest.mark.parametrize(
    ("models", "match"),
    [
        (
            {"x": {"provider": "nope", "price": {"input": 0, "output": 0, "currency": "CNY"}}},
            "invalid models",
        ),
        ({"x": {"provider": "openai"}}, "price"),
        (
            {"x": {"provider": "openai", "price": {"input": -1, "output": 0, "currency": "USD"}}},
            "input",
        ),
        (
            {"x": {"provider": "openai", "price": {"input": 1, "output": 1, "currency": "EUR"}}},
            "currency",
        ),
        ({"x": {"provider": "demo", "colour": "blue"}}, "colour"),
        (
            {
                "x": {
                    "provider": "openai",
                    "api_key_env": "MISSING_KEY",
                    "price": {"input": 1, "output": 1, "currency": "USD"},
                }
            },
            "MISSING_KEY",
        ),
    ],
)
def test_bad_configuration_is_refused(models: dict[str, dict[str, object]], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        build_catalog(models, env={})


async def test_model_defaults_to_the_catalog_key() -> None:
    catalog = build_catalog(
        {
            "gpt-4o-mini": {
                "provider": "openai",
                "api_key_env": "K",
                "price": {"input": 0.15, "output": 0.6, "currency": "USD"},
            }
        },
        env={"K": "sk-x"},
    )
    try:
        assert catalog.entry("gpt-4o-mini").config.model == "gpt-4o-mini"
        assert catalog.model_ids == ("gpt-4o-mini",)
    finally:
        await catalog.aclose()
