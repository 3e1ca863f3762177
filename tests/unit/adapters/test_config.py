"""The catalog schema's timeout rules (no network)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from imbot.core.catalog import OllamaConfig, OpenAIConfig

PRICE = {"input": 1, "output": 2, "currency": "USD"}


def test_stream_timers_default_to_the_attempt_timeout_and_at_most_30s_idle() -> None:
    cfg = OpenAIConfig.model_validate({"provider": "openai", "price": PRICE})
    assert (cfg.stream_first_byte_s, cfg.stream_idle_s) == (60.0, 30.0)
    short = OpenAIConfig.model_validate({"provider": "openai", "price": PRICE, "timeout_s": 10})
    assert (short.stream_first_byte_s, short.stream_idle_s) == (10.0, 10.0)
    local = OllamaConfig.model_validate({"provider": "ollama", "price": PRICE})
    assert local.stream_first_byte_s == 120.0  # room for loading the model


def test_stream_timers_can_be_set_separately() -> None:
    cfg = OpenAIConfig.model_validate(
        {"provider": "openai", "price": PRICE, "first_byte_timeout_s": 5, "idle_timeout_s": 45}
    )
    assert (cfg.stream_first_byte_s, cfg.stream_idle_s) == (5.0, 45.0)


def test_first_byte_timeout_cannot_exceed_the_attempt_timeout() -> None:
    with pytest.raises(ValidationError, match="first_byte_timeout_s"):
        OpenAIConfig.model_validate(
            {"provider": "openai", "price": PRICE, "timeout_s": 10, "first_byte_timeout_s": 20}
        )
