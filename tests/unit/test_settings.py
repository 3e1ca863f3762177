from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from imbot.core.errors import ConfigurationError
from imbot.core.settings import DEFAULT_POLICY_FILE, load_policy, load_settings


def test_callback_secrets_are_comma_separated_for_rotation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMBOT_CALLBACK_SECRETS", "new-secret, old-secret,")
    assert load_settings().secret_values() == ["new-secret", "old-secret"]


def test_secrets_are_not_shown_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMBOT_CALLBACK_SECRETS", "hunter2")
    monkeypatch.setenv("IMBOT_EASEMOB_CLIENT_SECRET", "s3cr3t")
    text = repr(load_settings())
    assert "hunter2" not in text
    assert "s3cr3t" not in text


def test_the_default_policy_is_valid() -> None:
    policy = load_policy(DEFAULT_POLICY_FILE)
    assert "ai_bot" in policy.bot_ids
    # The tiers pick the models: a cheap and a strong demo model, labelled as demo.
    assert policy.routes["default"].models == ()
    assert policy.routing.enabled
    free = policy.routing.tiers[policy.routing.default_tier]
    assert set(free.models) == {level.name for level in policy.routing.levels}
    assert all(policy.models[m].provider == "demo" for m in policy.routing.model_names())


def test_route_naming_an_unknown_model_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("models: {demo: {provider: demo}}\nroutes: {default: {models: [gpt-x]}}\n")
    with pytest.raises(ConfigurationError, match="unknown model 'gpt-x'"):
        load_policy(path)


@pytest.mark.parametrize(
    ("models", "error"),
    [
        # A model worker used to be the only one to refuse these (when it opened the
        # catalog); the gateway and the route workers started on them.
        ("{gpt: {provider: openai, model: gpt-4o}}", "price"),
        ("{gpt: {provider: opnai, price: {input: 1, output: 2, currency: CNY}}}", "opnai"),
        (
            "{gpt: {provider: openai, price: {input: 1, output: 2, currency: CNY}, tmeout_s: 3}}",
            "tmeout_s",
        ),
        (
            "{gpt: {provider: openai, price: {input: 1, output: 2, currency: USD}}}",
            "one currency per policy",
        ),
    ],
)
def test_a_models_block_a_model_worker_would_refuse_is_refused_at_load(
    tmp_path: Path, models: str, error: str
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(f"models: {models}\nroutes: {{default: {{models: [gpt]}}}}\n")
    with pytest.raises(ConfigurationError, match=error):
        load_policy(path)


def test_unknown_keys_are_rejected_so_typos_do_not_pass_silently(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("callback: {ai_mesage: intercept}\n")
    with pytest.raises(ConfigurationError, match="ai_mesage"):
        load_policy(path)


def test_bad_yaml_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("bots: [\n")
    with pytest.raises(ConfigurationError, match="not valid YAML"):
        load_policy(path)


def test_the_cli_offers_exactly_the_pipeline_stages() -> None:
    """Read from the parser itself: the choices ``imbot worker --stage`` really accepts."""
    from imbot.cli.main import build_parser
    from imbot.streams.stages import STAGES

    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    [stage] = [a for a in commands.choices["worker"]._actions if a.dest == "stage"]
    assert set(stage.choices or ()) == set(STAGES)


def test_kafka_security_reaches_every_client_and_faust(tmp_path: Path) -> None:
    """SASL_SSL with SCRAM (Strimzi's KafkaUser): aiokafka's clients and Faust's get the
    protocol, the mechanism, the credentials and a TLS context trusting the given CA."""
    import ssl

    import faust

    from imbot.core.kafka import connection_kwargs, consumer_kwargs, producer_kwargs
    from imbot.streams.faust_app import broker_credentials

    plain = load_settings()
    assert connection_kwargs(plain) == {"bootstrap_servers": plain.kafka_bootstrap}
    assert broker_credentials(plain) is None
    secured = load_settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="imbot",
        kafka_sasl_password="s3cret",
    )
    for kwargs in (connection_kwargs(secured), producer_kwargs(secured), consumer_kwargs(secured)):
        assert kwargs["security_protocol"] == "SASL_SSL"
        assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
        assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == ("imbot", "s3cret")
        assert isinstance(kwargs["ssl_context"], ssl.SSLContext)
    credentials = broker_credentials(secured)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL"
    assert credentials.mechanism.value == "SCRAM-SHA-512"
    assert "s3cret" not in repr(secured)  # the password never in a repr (or a log line)
    tls_only = load_settings(kafka_security_protocol="SSL")
    assert isinstance(broker_credentials(tls_only), faust.SSLCredentials)
    assert "sasl_mechanism" not in connection_kwargs(tls_only)
