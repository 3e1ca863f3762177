"""The model catalog schema: one entry per model id, discriminated by ``provider``.

``core.settings.Policy.models`` is validated with it when the policy is loaded, so a
``models:`` block a model worker would refuse is refused by every service at start-up
(the gateway and route workers used to accept it), and prices are read from one typed
place. ``imbot.adapters`` builds the models from it. Prices and secrets' *names* live in
the YAML; secret values come only from the environment.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# A stream silent for this long between chunks is taken as stuck (unless configured).
DEFAULT_IDLE_TIMEOUT_S = 30.0


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Price(_Frozen):
    """List price per one million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    currency: Literal["CNY", "USD"]

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input + output_tokens * self.output) / 1_000_000


class CircuitConfig(_Frozen):
    # Consecutive failed calls (retryable, configuration, quota) that open the circuit.
    failure_threshold: int = Field(default=5, ge=1)
    # How long an open circuit skips the model before one probe call is let through.
    cooldown_s: float = Field(default=30.0, gt=0)


class RetryConfig(_Frozen):
    # Attempts on this model before falling back to the next in the chain.
    max_attempts: int = Field(default=3, ge=1)
    base_delay_s: float = Field(default=0.5, ge=0)
    max_delay_s: float = Field(default=8.0, ge=0)
    # A server's Retry-After above this is not waited for: fall back instead.
    max_retry_after_s: float = Field(default=60.0, ge=0)


class _ModelEntry(_Frozen):
    model: str = ""  # defaults to the catalog key
    base_url: str = ""
    api_key_env: str | None = None
    price: Price
    max_concurrency: int = Field(default=16, ge=1)
    # Entries naming the same group share one concurrency limit (one provider quota).
    concurrency_group: str | None = None
    # One attempt of a non-streamed call; for a stream, the time until its first event.
    timeout_s: float = Field(default=60.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # Streams only: from sending the request to the first line of the body (a provider
    # that accepts the call and then says nothing). Defaults to timeout_s.
    first_byte_timeout_s: float | None = Field(default=None, gt=0)
    # Streams only: the longest silence allowed between two lines of the body once it
    # has started. Defaults to timeout_s, at most 30 s.
    idle_timeout_s: float | None = Field(default=None, gt=0)
    circuit: CircuitConfig = CircuitConfig()
    retry: RetryConfig = RetryConfig()
    # Extra non-secret request headers (e.g. an OpenAI-Project id).
    headers: dict[str, str] = Field(default_factory=dict)
    # The model takes images (the route stage sends image messages only to these). Off by
    # default: an image sent to a text model is refused before any call, never paid for.
    vision: bool = False
    # Input tokens to reserve per image; None: the provider's documented estimate
    # (adapters.images). Set it for a model whose image tiling differs.
    image_tokens: int | None = Field(default=None, ge=1)

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @model_validator(mode="after")
    def _first_byte_within_attempt(self) -> _ModelEntry:
        # The catalog gives a stream attempt timeout_s to produce its first event.
        if self.first_byte_timeout_s is not None and self.first_byte_timeout_s > self.timeout_s:
            raise ValueError("first_byte_timeout_s cannot be longer than timeout_s")
        return self

    @property
    def stream_first_byte_s(self) -> float:
        return self.first_byte_timeout_s or self.timeout_s

    @property
    def stream_idle_s(self) -> float:
        return self.idle_timeout_s or min(self.timeout_s, DEFAULT_IDLE_TIMEOUT_S)


class OpenAIConfig(_ModelEntry):
    """OpenAI chat completions and every compatible server (vLLM, Qianfan v2,
    DashScope compatible mode, Ollama /v1, …), chosen by ``base_url``."""

    provider: Literal["openai"]
    base_url: str = "https://api.openai.com/v1"
    # Reasoning models reject max_tokens; Qianfan v2 and older servers want max_tokens.
    max_tokens_field: Literal["max_completion_tokens", "max_tokens"] = "max_completion_tokens"
    # Where the hashed end-user id goes; None sends nothing.
    user_field: Literal["safety_identifier", "user"] | None = "safety_identifier"
    # Ask for the usage chunk when streaming (stream_options.include_usage).
    stream_usage: bool = True
    # image_url.detail: "low" is a fixed 85 tokens per image, "high"/"auto" tile the image.
    image_detail: Literal["auto", "low", "high"] = "auto"


class AnthropicConfig(_ModelEntry):
    provider: Literal["anthropic"]
    base_url: str = "https://api.anthropic.com/v1"
    api_key_env: str | None = "ANTHROPIC_API_KEY"
    anthropic_version: str = "2023-06-01"
    # Anthropic requires max_tokens; used when the request has no limit.
    default_max_tokens: int = Field(default=1024, ge=1)


class ErnieConfig(_ModelEntry):
    """Baidu ERNIE v1 (wenxinworkshop) with OAuth access-token exchange."""

    provider: Literal["ernie"]
    base_url: str = "https://aip.baidubce.com/rpc/2.0/ai_custom/v1/wenxinworkshop/chat"
    token_url: str = "https://aip.baidubce.com/oauth/2.0/token"
    # The path segment after /chat/ (e.g. completions_pro); defaults to ``model``.
    endpoint: str | None = None
    api_key_env: str | None = "QIANFAN_AK"
    secret_key_env: str = "QIANFAN_SK"
    # The v1 chat endpoints take no image input (reference §15).
    vision: Literal[False] = False


class DashScopeConfig(_ModelEntry):
    """Alibaba Tongyi via the DashScope native API."""

    provider: Literal["dashscope"]
    base_url: str = "https://dashscope.aliyuncs.com/api/v1"
    api_key_env: str | None = "DASHSCOPE_API_KEY"
    path: str = "/services/aigc/text-generation/generation"
    # Vision models (qwen-vl-*, ``vision: true``) answer only on the multimodal endpoint,
    # where every message's content is a list of {"text"}/{"image"} parts.
    multimodal_path: str = "/services/aigc/multimodal-generation/generation"
    # Streamed frames carry only the new fragment (true) or the whole text so far (false).
    incremental_output: bool = True
    workspace: str | None = None


class SparkConfig(_ModelEntry):
    """iFlytek Spark HTTP API (OpenAI-like, with Spark's own codes)."""

    provider: Literal["spark"]
    base_url: str = "https://spark-api-open.xf-yun.com/v1"
    # The APIPassword, or "APIKey:APISecret" for older consoles; sent as a Bearer token.
    api_key_env: str | None = "SPARK_API_PASSWORD"
    # Spark's image understanding is a separate WebSocket service, not this endpoint.
    vision: Literal[False] = False


class OllamaConfig(_ModelEntry):
    """Local models through Ollama's native /api/chat."""

    provider: Literal["ollama"]
    base_url: str = "http://localhost:11434"
    # The first call after start loads the model: allow for it.
    timeout_s: float = Field(default=120.0, gt=0)
    keep_alive: str | None = None
    num_ctx: int | None = None


class DemoConfig(_ModelEntry):
    """Canned replies labelled as coming from the demo model. Not an LLM.

    ``latency_ms`` is one fixed delay per call. For a benchmark or a load test the model
    can instead behave like a remote one: ``first_token_ms`` until its first token, then
    ``tokens_per_s``, for a reply ``output_tokens`` long (its canned text padded with
    labelled filler). Each is a uniform range ``[low, high]`` (or one number), drawn per
    request (docs/models.md, "The demo model").
    """

    provider: Literal["demo"]
    price: Price = Price(input=0, output=0, currency="CNY")
    latency_ms: float = Field(default=0.0, ge=0)
    first_token_ms: tuple[float, float] | None = None
    tokens_per_s: tuple[float, float] | None = None
    output_tokens: tuple[int, int] | None = None

    @field_validator("first_token_ms", "tokens_per_s", "output_tokens", mode="before")
    @classmethod
    def _one_number_is_a_range(cls, value: object) -> object:
        return (value, value) if isinstance(value, int | float) else value

    @field_validator("first_token_ms", "tokens_per_s", "output_tokens")
    @classmethod
    def _ordered_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 <= value[0] <= value[1]:
            raise ValueError("a range is [low, high] with 0 <= low <= high")
        return value

    @model_validator(mode="after")
    def _one_kind_of_latency(self) -> DemoConfig:
        if self.tokens_per_s is not None and self.tokens_per_s[0] <= 0:
            raise ValueError("tokens_per_s must be above 0")
        if self.latency_ms and (self.first_token_ms is not None or self.tokens_per_s is not None):
            raise ValueError("latency_ms or first_token_ms/tokens_per_s, not both")
        return self

    @property
    def shaped(self) -> bool:
        """Whether a knob of the realistic latency or length is set."""
        return (
            self.first_token_ms is not None
            or self.tokens_per_s is not None
            or self.output_tokens is not None
        )


ModelConfig = Annotated[
    OpenAIConfig
    | AnthropicConfig
    | ErnieConfig
    | DashScopeConfig
    | SparkConfig
    | OllamaConfig
    | DemoConfig,
    Field(discriminator="provider"),
]


class CatalogConfig(_Frozen):
    models: dict[str, ModelConfig]
