"""Fallback chains, circuit breaking and concurrency limits, end to end over HTTP."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from imbot.adapters import ChatMessage, ChatRequest
from imbot.core.errors import ConfigurationError, FatalError, RetryableError
from tests.fakes.providers import FakeOllama, FakeOpenAI, Reply, openai_error
from tests.integration.adapters.conftest import PRICE_CNY, PRICE_USD, CatalogFactory
from tests.integration.adapters.helpers import REQUEST, collect


def openai(fake: FakeOpenAI, **extra: object) -> dict[str, object]:
    return {
        "provider": "openai",
        "base_url": fake.base_url,
        "api_key_env": "OPENAI_API_KEY",
        "price": PRICE_USD,
        **extra,
    }


def circuit_state(model_id: str) -> float | None:
    return REGISTRY.get_sample_value("imbot_model_circuit_state", {"model": model_id})


def overloaded(n: int) -> list[Reply]:
    return [openai_error(503, "engine overloaded", "server_error", None)] * n


async def test_falls_back_to_the_next_model_when_the_first_is_exhausted(
    openai_fake: FakeOpenAI, ollama_fake: FakeOllama, make_catalog: CatalogFactory
) -> None:
    openai_fake.push(*overloaded(3))
    catalog = make_catalog(
        {
            "primary": openai(openai_fake),
            "local": {
                "provider": "ollama",
                "model": "qwen2.5:7b",
                "base_url": ollama_fake.base_url,
                "price": PRICE_CNY,
            },
        }
    )
    result = await catalog.complete(["primary", "local"], REQUEST, deadline_s=5)
    assert result.model_id == "local"
    assert result.provider == "ollama"
    assert result.attempts == 4  # three on the primary, one on the local model
    assert result.currency == "CNY"
    assert len(openai_fake.requests) == 3
    assert len(ollama_fake.requests) == 1


async def test_fatal_error_falls_back_without_retrying(
    openai_fake: FakeOpenAI, openai_fake2: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    openai_fake.push(
        openai_error(
            404, "The model `gpt-9` does not exist", "invalid_request_error", "model_not_found"
        )
    )
    catalog = make_catalog({"a": openai(openai_fake), "b": openai(openai_fake2)})
    result = await catalog.complete(["a", "b"], REQUEST, deadline_s=5)
    assert result.model_id == "b"
    assert result.attempts == 2
    assert len(openai_fake.requests) == 1


async def test_all_models_failing_raises_the_last_error(
    openai_fake: FakeOpenAI, openai_fake2: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    openai_fake.push(*overloaded(3))
    openai_fake2.push(openai_error(400, "bad parameter", "invalid_request_error", None))
    catalog = make_catalog({"a": openai(openai_fake), "b": openai(openai_fake2)})
    with pytest.raises(FatalError) as caught:
        await catalog.complete(["a", "b"], REQUEST, deadline_s=5)
    assert caught.value.reason == "bad_request"
    assert caught.value.status == 400


async def test_retry_after_longer_than_the_deadline_falls_back_at_once(
    openai_fake: FakeOpenAI, openai_fake2: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    openai_fake.push(
        openai_error(
            429, "Rate limit", "requests", "rate_limit_exceeded", headers={"retry-after": "20"}
        )
    )
    catalog = make_catalog({"a": openai(openai_fake), "b": openai(openai_fake2)})
    result = await asyncio.wait_for(catalog.complete(["a", "b"], REQUEST, deadline_s=5), 2)
    assert result.model_id == "b"
    assert len(openai_fake.requests) == 1


async def test_circuit_opens_skips_the_model_then_probes_and_closes(
    openai_fake: FakeOpenAI, openai_fake2: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    breaker = {"failure_threshold": 2, "cooldown_s": 0.3}
    retry = {"max_attempts": 1, "base_delay_s": 0.0, "max_delay_s": 0.0}
    catalog = make_catalog(
        {
            "flaky": openai(openai_fake, circuit=breaker, retry=retry),
            "steady": openai(openai_fake2),
        }
    )
    openai_fake.push(*overloaded(2))
    for _ in range(2):
        result = await catalog.complete(["flaky", "steady"], REQUEST, deadline_s=5)
        assert result.model_id == "steady"
    assert circuit_state("flaky") == 1  # open

    result = await catalog.complete(["flaky", "steady"], REQUEST, deadline_s=5)
    assert result.model_id == "steady"
    assert len(openai_fake.requests) == 2  # skipped while open: no third request

    await asyncio.sleep(0.35)
    assert circuit_state("flaky") == 1
    assert catalog.entry("flaky").breaker.state == "half_open"
    assert circuit_state("flaky") == 2
    result = await catalog.complete(["flaky", "steady"], REQUEST, deadline_s=5)
    assert result.model_id == "flaky"  # the probe went through and succeeded
    assert circuit_state("flaky") == 0


async def test_failed_probe_reopens_the_circuit(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog(
        {
            "flaky": openai(
                openai_fake,
                circuit={"failure_threshold": 1, "cooldown_s": 0.2},
                retry={"max_attempts": 1},
            )
        }
    )
    openai_fake.push(*overloaded(2))
    with pytest.raises(RetryableError):
        await catalog.complete(["flaky"], REQUEST, deadline_s=5)
    with pytest.raises(RetryableError) as caught:
        await catalog.complete(["flaky"], REQUEST, deadline_s=5)
    assert caught.value.code == "circuit_open"
    assert caught.value.retry_after is not None
    await asyncio.sleep(0.25)
    with pytest.raises(RetryableError) as probe:
        await catalog.complete(["flaky"], REQUEST, deadline_s=5)
    assert probe.value.status == 503
    assert circuit_state("flaky") == 1
    assert len(openai_fake.requests) == 2


async def test_bad_requests_do_not_open_the_circuit(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog(
        {"m": openai(openai_fake, circuit={"failure_threshold": 1, "cooldown_s": 30})}
    )
    openai_fake.push(openai_error(400, "bad parameter", "invalid_request_error", None))
    with pytest.raises(FatalError):
        await catalog.complete(["m"], REQUEST, deadline_s=5)
    result = await catalog.complete(["m"], REQUEST, deadline_s=5)
    assert result.model_id == "m"
    assert circuit_state("m") == 0


async def test_stream_falls_back_before_the_first_byte(
    openai_fake: FakeOpenAI, openai_fake2: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    openai_fake.push(*overloaded(3))
    catalog = make_catalog({"a": openai(openai_fake), "b": openai(openai_fake2)})
    text, _, done = await collect(catalog.stream(["a", "b"], REQUEST, deadline_s=5))
    assert text == "你好！有什么可以帮你？"
    assert done.result is not None
    assert done.result.model_id == "b"
    assert done.result.attempts == 4


async def test_concurrency_limit_bounds_calls_in_flight(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    body = openai_fake.completion_body("m")
    openai_fake.push(*[Reply(body=body, delay_s=0.05)] * 8)
    catalog = make_catalog({"m": openai(openai_fake, max_concurrency=2)})
    results = await asyncio.gather(
        *(catalog.complete(["m"], REQUEST, deadline_s=5) for _ in range(8))
    )
    assert len(results) == 8
    assert openai_fake.max_in_flight == 2


async def test_unknown_model_in_a_chain_is_a_configuration_error(
    make_catalog: CatalogFactory,
) -> None:
    catalog = make_catalog({"demo": {"provider": "demo"}})
    with pytest.raises(ConfigurationError, match="unknown model"):
        await catalog.complete(["nope"], REQUEST, deadline_s=1)


async def test_metrics_count_calls_tokens_and_cost(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"metered": openai(openai_fake)})

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before_calls = sample(
        "imbot_model_calls_total", model="metered", provider="openai", outcome="ok"
    )
    before_cost = sample("imbot_model_cost_total", model="metered", currency="USD")
    openai_fake.push(openai_error(500, "oops", "server_error", None))
    await catalog.complete(
        ["metered"], ChatRequest(messages=(ChatMessage(role="user", content="hi"),)), deadline_s=5
    )
    assert (
        sample("imbot_model_calls_total", model="metered", provider="openai", outcome="ok")
        == before_calls + 1
    )
    assert (
        sample(
            "imbot_model_errors_total",
            model="metered",
            provider="openai",
            kind="RetryableError",
            reason="server_error",
        )
        >= 1
    )
    assert sample("imbot_model_tokens_total", model="metered", direction="input") >= 21
    assert sample("imbot_model_cost_total", model="metered", currency="USD") > before_cost
    assert sample("imbot_model_retries_total", model="metered") >= 1
