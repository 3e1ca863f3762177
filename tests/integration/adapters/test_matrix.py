"""What the issue asks of every provider, run against each provider's fake over real
HTTP: the class of every documented error, malformed bodies, gateway errors, TCP
resets mid-stream, slow answers, streams that stall, and where the request id comes
from. Provider-specific behaviour (request shape, token exchange, safety flags,
framing quirks) stays in the per-provider modules.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from _pytest.mark.structures import ParameterSet

from imbot.adapters import ModelCatalog, StreamEvent
from imbot.core.errors import (
    ConfigurationError,
    ContentRejected,
    FatalError,
    ImbotError,
    RetryableError,
)
from tests.fakes.providers import (
    FAKES,
    MALFORMED_BODY,
    REPLY_PARTS,
    REPLY_TEXT,
    FakeDashScope,
    FakeProvider,
    FakeSpark,
    Reply,
    anthropic_error,
    dashscope_error,
    ernie_error,
    ollama_error,
    openai_error,
    plain_error,
    spark_error,
)
from tests.integration.adapters.conftest import CatalogFactory
from tests.integration.adapters.helpers import REQUEST, collect, deltas, drain, entry_for

PROVIDERS = list(FAKES)
# A frame no provider would send, in each provider's framing.
GARBAGE = {name: b"data: {not json\n\n" for name in PROVIDERS} | {"ollama": b"{not json\n"}
# Where each provider's request id comes from (header first, as in the reference §0).
REQUEST_ID_PREFIX = {
    "openai": "req_",  # header x-request-id (the body id is chatcmpl-…)
    "anthropic": "req_018E",  # header request-id (the body id is msg_…)
    "ernie": "as-8fq2k1x0ab",  # body id
    "dashscope": FakeDashScope.REQUEST_ID,  # header x-request-id = body request_id
    "spark": "cha000b",  # body sid
    "ollama": "local-",  # none sent: generated locally
}


@pytest.fixture(params=PROVIDERS)
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[FakeProvider]:
    async with FAKES[request.param]() as started:
        yield started


def catalog_for(make: CatalogFactory, fake: FakeProvider, **extra: object) -> ModelCatalog:
    return make({"m": entry_for(fake, **extra)})


def first_text_frame(reply: Reply) -> int:
    return reply.first_frame_with(REPLY_PARTS[0])


async def ask(catalog: ModelCatalog, *, streamed: bool, deadline_s: float = 5) -> tuple[str, int]:
    """One call through the catalog, streamed or not: (reply text, attempts)."""
    if streamed:
        text, _, done = await collect(catalog.stream(["m"], REQUEST, deadline_s=deadline_s))
        assert done.result is not None
        return text, done.result.attempts
    result = await catalog.complete(["m"], REQUEST, deadline_s=deadline_s)
    return result.text, result.attempts


# -- the class of every documented error --------------------------------------


@dataclass(frozen=True)
class Raises:
    kind: type[ImbotError]
    reason: str | None = None  # FatalError.reason
    stage: str | None = None  # ContentRejected.stage
    clear_history: bool | None = None


RETRIED = None  # the outcome "retried once, then the default success"
CONFIG = Raises(ConfigurationError)
BAD_REQUEST = Raises(FatalError, "bad_request")
CONTEXT = Raises(FatalError, "context_length")
QUOTA = Raises(FatalError, "quota_exhausted")
BILLING = Raises(FatalError, "billing")


def case(provider: str, name: str, reply: Reply, outcome: Raises | None) -> ParameterSet:
    return pytest.param(provider, reply, outcome, id=f"{provider}-{name}")


ERROR_CASES = [
    # OpenAI and compatible servers (§1.4, Qianfan v2 §4.4, DashScope compatible §6)
    case("openai", "429-rate_limit", openai_error(429, "Rate limit", "requests", "rate_limit_exceeded"), RETRIED),
    case("openai", "408", openai_error(408, "Request timed out"), RETRIED),
    case("openai", "500", openai_error(500, "The server had an error", "server_error"), RETRIED),
    case("openai", "503", openai_error(503, "engine overloaded", "server_error"), RETRIED),
    case("openai", "qianfan-429-rpm", openai_error(429, "rpm exceeded", "rate_limit_exceeded", "rpm_rate_limit_exceeded"), RETRIED),
    case("openai", "401", openai_error(401, "Incorrect API key", "invalid_request_error", "invalid_api_key"), CONFIG),
    case("openai", "403-region", openai_error(403, "Country not supported", "invalid_request_error", "unsupported_country_region_territory"), CONFIG),
    case("openai", "404-model", openai_error(404, "The model does not exist", "invalid_request_error", "model_not_found"), CONFIG),
    case("openai", "400-bad-param", openai_error(400, "Invalid value for 'temperature'", "invalid_request_error"), BAD_REQUEST),
    case("openai", "400-context", openai_error(400, "maximum context length is 128000 tokens", "invalid_request_error", "context_length_exceeded"), CONTEXT),
    case("openai", "429-insufficient_quota", openai_error(429, "You exceeded your current quota", "insufficient_quota", "insufficient_quota"), QUOTA),
    case("openai", "qianfan-400-invalid_model", openai_error(400, "model not found", "invalid_request_error", "invalid_model"), CONFIG),
    case("openai", "qianfan-401-no_permission", openai_error(401, "no permission", "access_denied", "no_parameter_permission"), CONFIG),
    case("openai", "qianfan-400-tokens_too_long", openai_error(400, "Prompt tokens too long", "invalid_request_error", "tokens_too_long"), CONTEXT),
    case("openai", "qianfan-400-malformed_json", openai_error(400, "malformed json", "invalid_request_error", "malformed_json"), BAD_REQUEST),
    case("openai", "compat-400-data_inspection_failed", openai_error(400, "<400> InternalError.Algo.DataInspectionFailed: Input text data may contain inappropriate content.", "data_inspection_failed", "data_inspection_failed"), Raises(ContentRejected, stage="input", clear_history=True)),
    # Anthropic (§2.4)
    case("anthropic", "429", anthropic_error(429, "rate_limit_error", "Number of requests has exceeded your rate limit"), RETRIED),
    case("anthropic", "529", anthropic_error(529, "overloaded_error", "Overloaded"), RETRIED),
    case("anthropic", "500", anthropic_error(500, "api_error", "Internal server error"), RETRIED),
    case("anthropic", "504", anthropic_error(504, "timeout_error", "Request timed out"), RETRIED),
    case("anthropic", "401", anthropic_error(401, "authentication_error", "invalid x-api-key"), CONFIG),
    case("anthropic", "403", anthropic_error(403, "permission_error", "no access to this model"), CONFIG),
    case("anthropic", "404", anthropic_error(404, "not_found_error", "model: claude-9"), CONFIG),
    case("anthropic", "400", anthropic_error(400, "invalid_request_error", "messages: roles must alternate"), BAD_REQUEST),
    case("anthropic", "400-prompt-too-long", anthropic_error(400, "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"), CONTEXT),
    case("anthropic", "400-credit", anthropic_error(400, "invalid_request_error", "Your credit balance is too low to access the API"), BILLING),
    case("anthropic", "402", anthropic_error(402, "billing_error", "Payment required"), BILLING),
    case("anthropic", "413", anthropic_error(413, "request_too_large", "Request exceeds the maximum size"), BAD_REQUEST),
    # ERNIE v1: every error is an HTTP 200 with error_code (§3.5)
    case("ernie", "2-unavailable", ernie_error(2, "Service temporarily unavailable"), RETRIED),
    case("ernie", "18-qps", ernie_error(18, "Open api qps request limit reached"), RETRIED),
    case("ernie", "336000-internal", ernie_error(336000, "Internal error"), RETRIED),
    case("ernie", "336100-high-load", ernie_error(336100, "Server high load"), RETRIED),
    case("ernie", "336501-rpm", ernie_error(336501, "Rate limit reached for RPM"), RETRIED),
    case("ernie", "336502-tpm", ernie_error(336502, "Rate limit reached for TPM"), RETRIED),
    case("ernie", "336003-bad-messages", ernie_error(336003, "the number of messages should be odd"), BAD_REQUEST),
    case("ernie", "336103-too-long", ernie_error(336103, "the max input characters is 20000"), CONTEXT),
    case("ernie", "17-daily-limit", ernie_error(17, "Open api daily request limit reached"), QUOTA),
    case("ernie", "19-total-limit", ernie_error(19, "Open api total request limit reached"), QUOTA),
    case("ernie", "6-no-permission", ernie_error(6, "No permission to access data"), CONFIG),
    case("ernie", "336005-no-api", ernie_error(336005, "API name not exist"), CONFIG),
    # DashScope native (§5.4)
    case("dashscope", "429-RateQuota", dashscope_error(429, "Throttling.RateQuota", "Requests rate limit exceeded"), RETRIED),
    case("dashscope", "429-AllocationQuota", dashscope_error(429, "Throttling.AllocationQuota", "Allocated quota exceeded, please increase your quota limit."), RETRIED),
    case("dashscope", "500-InternalError", dashscope_error(500, "InternalError.Algo", "An internal error has occured"), RETRIED),
    case("dashscope", "503", dashscope_error(503, "ServiceUnavailable", "Service is busy"), RETRIED),
    case("dashscope", "401-InvalidApiKey", dashscope_error(401, "InvalidApiKey", "Invalid API-key provided."), CONFIG),
    case("dashscope", "403-AccessDenied", dashscope_error(403, "AccessDenied", "Access denied."), CONFIG),
    case("dashscope", "404-ModelNotFound", dashscope_error(404, "ModelNotFound", "Model not found."), CONFIG),
    case("dashscope", "400-stream-only", dashscope_error(400, "invalid_parameter_error", "This model only support stream mode"), CONFIG),
    case("dashscope", "400-InvalidParameter", dashscope_error(400, "InvalidParameter", "temperature should be in [0, 2)"), BAD_REQUEST),
    case("dashscope", "400-EmptyInput", dashscope_error(400, "BadRequest.EmptyInput", "Required input parameter missing"), BAD_REQUEST),
    case("dashscope", "400-input-length", dashscope_error(400, "InvalidParameter", "Range of input length should be [1, 30720]"), CONTEXT),
    case("dashscope", "429-free-quota", dashscope_error(429, "Throttling.AllocationQuota", "Free allocated quota exceeded."), QUOTA),
    case("dashscope", "400-Arrearage", dashscope_error(400, "Arrearage", "Access denied, please make sure your account is in good standing."), BILLING),
    case("dashscope", "400-DataInspectionFailed", dashscope_error(400, "DataInspectionFailed", "Input data may contain inappropriate content."), Raises(ContentRejected, stage="input", clear_history=True)),
    # Spark HTTP: codes from §8.6 in either envelope (§7.4)
    case("spark", "10007-busy", spark_error(10007, "previous question still being answered"), RETRIED),
    case("spark", "10110-busy", spark_error(10110, "service busy"), RETRIED),
    case("spark", "11202-qps", spark_error(11202, "per-second rate exceeded"), RETRIED),
    case("spark", "10005-nested-400", spark_error(10005, "invalid param model:spark-lite", status=400, nested=True), BAD_REQUEST),
    case("spark", "10907-too-long", spark_error(10907, "token count over limit"), CONTEXT),
    case("spark", "11201-daily", spark_error(11201, "daily quota exceeded"), QUOTA),
    case("spark", "11200-not-authorised", spark_error(11200, "AppIdNoAuthError", status=401, nested=True), CONFIG),
    case("spark", "11200-volume", spark_error(11200, "tokens exhausted: volume over limit", status=403, nested=True), QUOTA),
    case("spark", "10016-not-enabled", spark_error(10016, "app id not authorised for this version"), CONFIG),
    case("spark", "10016-tokens-used-up", spark_error(10016, "token quota exhausted"), QUOTA),
    case("spark", "10015-blacklisted", spark_error(10015, "appid in blacklist"), CONFIG),
    case("spark", "10013-input", spark_error(10013, "input content audit failed"), Raises(ContentRejected, stage="input")),
    case("spark", "10014-output", spark_error(10014, "output contains sensitive content"), Raises(ContentRejected, stage="output")),
    case("spark", "10019-warn", spark_error(10019, "conversation tends toward violation"), Raises(ContentRejected, clear_history=True)),
    # Ollama native (§9.4)
    case("ollama", "429", ollama_error(429, "too many requests"), RETRIED),
    case("ollama", "500", ollama_error(500, "llama runner process has terminated"), RETRIED),
    case("ollama", "502", ollama_error(502, "cloud model unreachable"), RETRIED),
    case("ollama", "503", ollama_error(503, "server busy, loading model"), RETRIED),
    case("ollama", "400", ollama_error(400, "invalid options: num_predict"), BAD_REQUEST),
    case("ollama", "400-context", ollama_error(400, "the input exceeds the maximum context length"), CONTEXT),
    case("ollama", "404-not-pulled", ollama_error(404, 'model "qwen2.5:7b" not found, try pulling it first'), CONFIG),
]  # fmt: skip


@pytest.mark.parametrize("streamed", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize(("fake", "reply", "outcome"), ERROR_CASES, indirect=["fake"])
async def test_error_class(
    fake: FakeProvider,
    reply: Reply,
    outcome: Raises | None,
    streamed: bool,
    make_catalog: CatalogFactory,
) -> None:
    fake.push(reply)
    catalog = catalog_for(make_catalog, fake)
    if outcome is RETRIED:
        assert await ask(catalog, streamed=streamed) == (REPLY_TEXT, 2)
        return
    with pytest.raises(outcome.kind) as caught:
        await ask(catalog, streamed=streamed)
    error = caught.value
    assert type(error) is outcome.kind
    if outcome.reason is not None:
        assert isinstance(error, FatalError)
        assert error.reason == outcome.reason
    if outcome.stage is not None or outcome.clear_history is not None:
        assert isinstance(error, ContentRejected)
        assert outcome.stage is None or error.stage == outcome.stage
        assert outcome.clear_history is None or error.clear_history == outcome.clear_history
    assert error.provider == entry_for(fake)["provider"]
    assert len(fake.requests) == 1  # never retried


# -- bodies and gateways ------------------------------------------------------


async def test_malformed_body_is_retried(fake: FakeProvider, make_catalog: CatalogFactory) -> None:
    fake.push(Reply(body=MALFORMED_BODY, content_type="text/html"))
    result = await catalog_for(make_catalog, fake).complete(["m"], REQUEST, deadline_s=5)
    assert (result.text, result.attempts) == (REPLY_TEXT, 2)


async def test_malformed_stream_frame_before_any_text_is_retried(
    fake: FakeProvider, make_catalog: CatalogFactory
) -> None:
    name = entry_for(fake)["provider"]
    reply = fake.success(stream=True)
    reply.frames = [GARBAGE[str(name)], *(reply.frames or ())]
    fake.push(reply)
    catalog = catalog_for(make_catalog, fake)
    text, _, done = await collect(catalog.stream(["m"], REQUEST, deadline_s=5))
    assert text == REPLY_TEXT
    assert done.result is not None
    assert done.result.attempts == 2


@pytest.mark.parametrize("streamed", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize("status", [429, 500, 502])
async def test_plain_http_error_from_a_gateway_is_retried(
    fake: FakeProvider, make_catalog: CatalogFactory, status: int, streamed: bool
) -> None:
    fake.push(plain_error(status, headers={"retry-after": "0.02"}))
    catalog = catalog_for(make_catalog, fake)
    assert await ask(catalog, streamed=streamed) == (REPLY_TEXT, 2)


# -- connections reset (RST) mid-answer ---------------------------------------


async def test_connection_reset_mid_body_is_retried(
    fake: FakeProvider, make_catalog: CatalogFactory
) -> None:
    reply = fake.success(stream=False)
    reply.drop_after = 0
    fake.push(reply)
    result = await catalog_for(make_catalog, fake).complete(["m"], REQUEST, deadline_s=5)
    assert (result.text, result.attempts) == (REPLY_TEXT, 2)


async def test_connection_reset_before_any_text_is_retried(
    fake: FakeProvider, make_catalog: CatalogFactory
) -> None:
    reply = fake.success(stream=True)
    reply.drop_after = first_text_frame(reply)
    fake.push(reply)
    catalog = catalog_for(make_catalog, fake)
    text, _, done = await collect(catalog.stream(["m"], REQUEST, deadline_s=5))
    assert text == REPLY_TEXT
    assert done.result is not None
    assert done.result.attempts == 2


async def test_connection_reset_after_text_raises_to_the_caller(
    fake: FakeProvider, make_catalog: CatalogFactory
) -> None:
    reply = fake.success(stream=True)
    reply.drop_after = first_text_frame(reply) + 1
    fake.push(reply)
    catalog = catalog_for(make_catalog, fake)
    received: list[StreamEvent] = []
    with pytest.raises(RetryableError) as caught:
        await drain(catalog.stream(["m"], REQUEST, deadline_s=5), received)
    # The caller holds partial text, so the catalog must not silently start again.
    assert deltas(received) == [REPLY_PARTS[0]]
    assert caught.value.code == "connection"
    assert "ReadError" in caught.value.message  # a reset, not a clean end of body
    assert len(fake.requests) == 1


async def test_clean_close_before_the_last_frame(
    fake: FakeProvider, make_catalog: CatalogFactory
) -> None:
    """Before any text: retried. After text: raised to the caller as incomplete."""
    reply = fake.success(stream=True)
    frames = list(reply.frames or ())
    cut = first_text_frame(reply)
    fake.push(Reply(frames=frames[:cut], content_type=reply.content_type, headers=reply.headers))
    catalog = catalog_for(make_catalog, fake)
    text, _, done = await collect(catalog.stream(["m"], REQUEST, deadline_s=5))
    assert done.result is not None
    assert (text, done.result.attempts) == (REPLY_TEXT, 2)
    fake.push(Reply(frames=frames[: cut + 1], content_type=reply.content_type))
    received: list[StreamEvent] = []
    with pytest.raises(RetryableError) as caught:
        await drain(catalog.stream(["m"], REQUEST, deadline_s=5), received)
    assert deltas(received) == [REPLY_PARTS[0]]
    assert caught.value.code == "incomplete_stream"


# -- slow answers, stalls -----------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["complete", "stream"])
async def test_slow_answer_hits_the_deadline(
    fake: FakeProvider, make_catalog: CatalogFactory, streamed: bool
) -> None:
    reply = fake.success(stream=streamed)
    reply.delay_s = 3
    fake.push(reply, reply, reply)
    catalog = catalog_for(make_catalog, fake)
    started = time.monotonic()
    with pytest.raises(RetryableError) as caught:
        await ask(catalog, streamed=streamed, deadline_s=0.2)
    assert time.monotonic() - started < 1.0
    assert caught.value.code == "timeout"


async def test_stream_silent_after_the_headers_hits_the_first_byte_timeout_and_is_retried(
    fake: FakeProvider, make_catalog: CatalogFactory
) -> None:
    reply = fake.success(stream=True)
    reply.stall_after, reply.stall_s = 0, 3
    fake.push(reply)
    catalog = catalog_for(make_catalog, fake, first_byte_timeout_s=0.15)
    started = time.monotonic()
    text, _, done = await collect(catalog.stream(["m"], REQUEST, deadline_s=5))
    assert done.result is not None
    assert (text, done.result.attempts) == (REPLY_TEXT, 2)
    assert time.monotonic() - started < 1.5


async def test_stream_stalling_between_chunks_hits_the_idle_timeout(
    fake: FakeProvider, make_catalog: CatalogFactory
) -> None:
    reply = fake.success(stream=True)
    reply.stall_after, reply.stall_s = first_text_frame(reply) + 1, 3
    fake.push(reply)
    catalog = catalog_for(make_catalog, fake, idle_timeout_s=0.15)
    received: list[StreamEvent] = []
    started = time.monotonic()
    with pytest.raises(RetryableError) as caught:
        await drain(catalog.stream(["m"], REQUEST, deadline_s=5), received)
    assert time.monotonic() - started < 1.5  # long before the 5 s deadline
    assert caught.value.code == "idle_timeout"
    assert deltas(received) == [REPLY_PARTS[0]]


async def test_slow_but_steady_stream_is_not_cut_by_the_idle_timeout(
    fake: FakeProvider, make_catalog: CatalogFactory
) -> None:
    reply = fake.success(stream=True)
    reply.frame_delay_s = 0.03
    fake.push(reply)
    catalog = catalog_for(make_catalog, fake, idle_timeout_s=0.3, first_byte_timeout_s=0.3)
    text, _, done = await collect(catalog.stream(["m"], REQUEST, deadline_s=5))
    assert done.result is not None
    assert (text, done.result.attempts) == (REPLY_TEXT, 1)


# -- request ids --------------------------------------------------------------


async def test_stream_and_complete_take_the_request_id_from_the_same_place(
    fake: FakeProvider, make_catalog: CatalogFactory
) -> None:
    prefix = REQUEST_ID_PREFIX[str(entry_for(fake)["provider"])]
    catalog = catalog_for(make_catalog, fake)
    result = await catalog.complete(["m"], REQUEST, deadline_s=5)
    _, _, done = await collect(catalog.stream(["m"], REQUEST, deadline_s=5))
    assert done.result is not None
    assert result.provider_request_id is not None
    assert done.result.provider_request_id is not None
    assert result.provider_request_id.startswith(prefix)
    assert done.result.provider_request_id.startswith(prefix)
    if isinstance(fake, FakeSpark):
        assert done.result.provider_request_id == FakeSpark.SID


def test_every_provider_has_a_fake_and_cases() -> None:
    covered = {p.values[0] for p in ERROR_CASES}
    assert covered == set(PROVIDERS) == set(REQUEST_ID_PREFIX)
