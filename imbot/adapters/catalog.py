"""The model catalog: validated config → ready models, plus retry and fallback.

``build_catalog`` turns the ``models:`` mapping of the policy file into one
wrapped ``ChatModel`` per model id (provider → metrics → circuit breaker →
concurrency limit). ``ModelCatalog.complete`` walks a route's chain: it skips
open circuits, retries retryable errors with jittered backoff (core.retry) inside
the caller's deadline, falls back to the next model when one is exhausted or fails
for good, and raises ContentRejected at once. The catalog owns the repeats of a
model call: the error it raises after calling a provider is marked
``retries_spent``, so the stage boundary does not walk the chain again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx
from pydantic import ValidationError

from imbot.adapters import metrics
from imbot.adapters.anthropic import AnthropicChatModel
from imbot.adapters.base import (
    ChatModel,
    ChatRequest,
    CompletionResult,
    Done,
    StreamEvent,
    UnsupportedInput,
)
from imbot.adapters.dashscope import DashScopeChatModel
from imbot.adapters.demo import DemoChatModel
from imbot.adapters.ernie import ErnieChatModel
from imbot.adapters.http_model import HttpChatModel
from imbot.adapters.images import request_image_tokens
from imbot.adapters.ollama import OllamaChatModel
from imbot.adapters.openai import OpenAIChatModel
from imbot.adapters.resilience import (
    CircuitBreaker,
    CircuitBreakerModel,
    CircuitOpenError,
    ConcurrencyLimitedModel,
    InstrumentedModel,
)
from imbot.adapters.spark import SparkChatModel
from imbot.core.catalog import (
    AnthropicConfig,
    CatalogConfig,
    DashScopeConfig,
    DemoConfig,
    ErnieConfig,
    ModelConfig,
    OllamaConfig,
    OpenAIConfig,
    SparkConfig,
    _ModelEntry,
)
from imbot.core.errors import ConfigurationError, ContentRejected, ImbotError, RetryableError
from imbot.core.retry import Backoff, Deadline, retries_spent

log = logging.getLogger("imbot.adapters")


def new_client(max_keepalive: int = 64) -> httpx.AsyncClient:
    """The shared client of one provider: HTTP/1.1 keep-alive, no overall pool cap
    (the per-model semaphores bound concurrency), timeouts set per request."""
    return httpx.AsyncClient(
        limits=httpx.Limits(
            max_connections=None,
            max_keepalive_connections=max(max_keepalive, 8),
            keepalive_expiry=30.0,
        ),
        http2=False,
        follow_redirects=False,
    )


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    model_id: str
    config: _ModelEntry
    model: ChatModel  # fully wrapped
    breaker: CircuitBreaker


# Which class serves each provider's entries (the demo model needs no HTTP client).
_HTTP_MODELS: Mapping[type[_ModelEntry], type[HttpChatModel]] = {
    OpenAIConfig: OpenAIChatModel,
    AnthropicConfig: AnthropicChatModel,
    ErnieConfig: ErnieChatModel,
    DashScopeConfig: DashScopeChatModel,
    SparkConfig: SparkChatModel,
    OllamaConfig: OllamaChatModel,
}


def _provider_model(
    model_id: str, cfg: ModelConfig, client: httpx.AsyncClient | None, env: Mapping[str, str]
) -> ChatModel:
    if isinstance(cfg, DemoConfig):
        return DemoChatModel(model_id, cfg)
    if client is None:  # pragma: no cover - build_catalog gives every HTTP provider one
        raise ConfigurationError(f"model {model_id!r}: no HTTP client")
    return _HTTP_MODELS[type(cfg)].from_config(model_id, cfg, client, env)


def build_catalog(
    models: Mapping[str, ModelConfig | Mapping[str, Any]],
    *,
    env: Mapping[str, str] | None = None,
    seed: int | None = None,
) -> ModelCatalog:
    """Build every model of the ``models:`` section (a policy's, validated at load, or a
    raw mapping, validated here). Raises ConfigurationError."""
    try:
        config = CatalogConfig.model_validate({"models": dict(models)})
    except ValidationError as exc:
        raise ConfigurationError(f"invalid models configuration: {exc}") from None
    env = os.environ if env is None else env
    clients: dict[str, httpx.AsyncClient] = {}
    keepalive: dict[str, int] = {}
    for cfg in config.models.values():
        keepalive[cfg.provider] = keepalive.get(cfg.provider, 0) + cfg.max_concurrency
    groups: dict[str, asyncio.Semaphore] = {}
    group_limits: dict[str, int] = {}
    for cfg in config.models.values():
        if cfg.concurrency_group:
            limit = group_limits.get(cfg.concurrency_group, cfg.max_concurrency)
            group_limits[cfg.concurrency_group] = min(limit, cfg.max_concurrency)
    entries: dict[str, CatalogEntry] = {}
    for model_id, cfg in config.models.items():
        client = None
        if not isinstance(cfg, DemoConfig):
            client = clients.get(cfg.provider)
            if client is None:
                client = clients[cfg.provider] = new_client(keepalive[cfg.provider])
        if cfg.model == "":
            cfg = cfg.model_copy(update={"model": model_id})
        inner = _provider_model(model_id, cfg, client, env)
        limiter: asyncio.Semaphore | None = None
        if cfg.concurrency_group:
            limiter = groups.get(cfg.concurrency_group)
            if limiter is None:
                limiter = groups[cfg.concurrency_group] = asyncio.Semaphore(
                    group_limits[cfg.concurrency_group]
                )
        entries[model_id] = catalog_entry(model_id, cfg, inner, cfg.provider, limiter=limiter)
    return ModelCatalog(entries, list(clients.values()), seed=seed)


def catalog_entry(
    model_id: str,
    config: _ModelEntry,
    model: ChatModel,
    provider: str,
    *,
    limiter: asyncio.Semaphore | None = None,
) -> CatalogEntry:
    """One model with the catalog's wrappers (metrics → circuit breaker → concurrency
    limit, ``config.max_concurrency`` unless a shared ``limiter`` is given)."""
    breaker = CircuitBreaker(
        model_id,
        failure_threshold=config.circuit.failure_threshold,
        cooldown_s=config.circuit.cooldown_s,
    )
    wrapped: ChatModel = ConcurrencyLimitedModel(
        CircuitBreakerModel(InstrumentedModel(model, provider), breaker),
        limiter or asyncio.Semaphore(config.max_concurrency),
    )
    return CatalogEntry(model_id, config, wrapped, breaker)


class ModelCatalog:
    def __init__(
        self,
        entries: Mapping[str, CatalogEntry],
        clients: Sequence[httpx.AsyncClient] = (),
        *,
        seed: int | None = None,
    ) -> None:
        self._entries = dict(entries)
        self._clients = list(clients)
        self._rng = random.Random(seed)

    @property
    def model_ids(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def entry(self, model_id: str) -> CatalogEntry:
        try:
            return self._entries[model_id]
        except KeyError:
            raise ConfigurationError(f"unknown model {model_id!r}") from None

    def model(self, model_id: str) -> ChatModel:
        """One model with its wrappers (no retry, no fallback)."""
        return self.entry(model_id).model

    @property
    def vision_models(self) -> tuple[str, ...]:
        """The models declared to take images (``vision: true``), in catalog order."""
        return tuple(model_id for model_id, e in self._entries.items() if e.config.vision)

    def image_tokens(self, model_id: str, request: ChatRequest) -> int:
        """Input tokens the request's images would cost on this model (an estimate for the
        cost reservation; see ``adapters.images``). Add the text's own estimate."""
        return request_image_tokens(self.entry(model_id).config, request)

    def _delay(self, entry: CatalogEntry, attempt: int, error: RetryableError) -> float | None:
        """How long to wait before the next attempt on this model; None: move on."""
        retry = entry.config.retry
        if attempt + 1 >= retry.max_attempts or isinstance(error, CircuitOpenError):
            return None
        if error.retry_after is not None and error.retry_after > retry.max_retry_after_s:
            return None
        backoff = Backoff(retry.base_delay_s, retry.max_delay_s, rng=self._rng)
        return backoff.delay(attempt + 1, error.retry_after)

    async def complete(
        self, chain: Sequence[str], request: ChatRequest, *, deadline_s: float
    ) -> CompletionResult:
        async def call(entry: CatalogEntry, timeout_s: float) -> CompletionResult:
            try:
                async with asyncio.timeout(timeout_s):
                    return await entry.model.complete(request)
            except TimeoutError:
                raise RetryableError(
                    f"model {entry.model_id} did not answer in time", code="timeout"
                ) from None

        won = await self._walk(chain, request, Deadline.after(deadline_s), call)
        if won.attempts > 1:
            return won.value.model_copy(update={"attempts": won.attempts})
        return won.value

    async def stream(
        self, chain: Sequence[str], request: ChatRequest, *, deadline_s: float
    ) -> AsyncIterator[StreamEvent]:
        """Stream one reply. Retry and fallback happen only before the first event;
        after it, an error is raised to the caller (who holds partial text)."""
        deadline = Deadline.after(deadline_s)

        async def call(entry: CatalogEntry, timeout_s: float) -> _Opened:
            return await _first_event(entry, request, timeout_s)

        won = await self._walk(chain, request, deadline, call)
        opened, attempts = won.value, won.attempts
        async with aclosing(opened.events) as events:
            yield _with_attempts(opened.first, attempts)
            while True:
                try:
                    async with asyncio.timeout_at(_loop_time(deadline.at)):
                        event = await anext(events)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise RetryableError(
                        f"model {won.model_id} stream passed the deadline", code="timeout"
                    ) from None
                yield _with_attempts(event, attempts)

    async def _walk(
        self,
        chain: Sequence[str],
        request: ChatRequest,
        deadline: Deadline,
        call: Callable[[CatalogEntry, float], Awaitable[T]],
    ) -> _Won[T]:
        """The one chain walk of ``complete`` and ``stream``: skip the models that cannot
        take the call (open circuit, images without vision), give each attempt
        ``min(timeout_s, time left)``, retry retryable errors on the same model with
        backoff, fall back on the rest, raise ContentRejected at once."""
        last: ImbotError | None = None
        attempts = 0
        for position, model_id in enumerate(chain):
            entry = self.entry(model_id)
            skipped = _skipped(entry, request)
            if skipped is not None:
                last = skipped
                metrics.FALLBACKS.labels(model_id).inc()
                continue
            for attempt in range(entry.config.retry.max_attempts):
                remaining = deadline.remaining()
                if remaining <= 0:
                    raise _deadline_error(last, model_id, attempts)
                attempts += 1
                try:
                    value = await call(entry, min(remaining, entry.config.timeout_s))
                except ContentRejected:
                    raise
                except ImbotError as exc:
                    last = exc
                else:
                    return _Won(value, attempts, model_id)
                _log_failure(model_id, attempt, last)
                if not isinstance(last, RetryableError):
                    break  # fatal or configuration for this model: fall back
                delay = self._delay(entry, attempt, last)
                if delay is None or not deadline.allows(delay):
                    break
                metrics.MODEL_RETRIES.labels(model_id).inc()
                await asyncio.sleep(delay)
            if position + 1 < len(chain):
                metrics.FALLBACKS.labels(model_id).inc()
        raise _exhausted(last, attempts)

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()
        self._clients.clear()


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Won(Generic[T]):
    """What a chain walk ends with: the call's value, attempts made, the model that gave it."""

    value: T
    attempts: int
    model_id: str


@dataclass(frozen=True, slots=True)
class _Opened:
    """A stream whose first event arrived (the point after which nothing falls back)."""

    events: AsyncGenerator[StreamEvent, None]
    first: StreamEvent


async def _first_event(entry: CatalogEntry, request: ChatRequest, timeout_s: float) -> _Opened:
    """Open the model's stream and wait for its first event; on any failure the stream is
    closed before the error goes to the walk."""
    events = _closable(entry.model.stream(request))
    try:
        async with asyncio.timeout(timeout_s):
            first = await anext(events)
    except TimeoutError:
        await events.aclose()
        raise RetryableError(
            f"model {entry.model_id} sent nothing in time", code="timeout"
        ) from None
    except StopAsyncIteration:
        await events.aclose()
        raise RetryableError(f"model {entry.model_id} sent an empty stream") from None
    except BaseException:
        await events.aclose()
        raise
    return _Opened(events, first)


def _closable(events: AsyncIterator[StreamEvent]) -> AsyncGenerator[StreamEvent, None]:
    """Providers return async generators; the protocol only promises an iterator."""
    if isinstance(events, AsyncGenerator):
        return events
    return _as_generator(events)


async def _as_generator(events: AsyncIterator[StreamEvent]) -> AsyncGenerator[StreamEvent, None]:
    async for event in events:
        yield event


def _loop_time(monotonic_deadline: float) -> float:
    """asyncio.timeout_at wants the loop's clock; ours is time.monotonic (the same on CPython)."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())


def _with_attempts(event: StreamEvent, attempts: int) -> StreamEvent:
    if attempts > 1 and isinstance(event, Done) and event.result is not None:
        return Done(
            event.finish_reason,
            event.raw_finish_reason,
            event.result.model_copy(update={"attempts": attempts}),
        )
    return event


def _skipped(entry: CatalogEntry, request: ChatRequest) -> ImbotError | None:
    """Why the walk passes this model by without calling it, if it does: an open
    circuit, or images for a model without vision (no call, nothing paid)."""
    if request.images and not entry.config.vision:
        return UnsupportedInput(f"model {entry.model_id} does not take images (vision is off)")
    if not entry.breaker.available():
        return _circuit_open(entry)
    return None


def _circuit_open(entry: CatalogEntry) -> RetryableError:
    return CircuitOpenError(
        f"circuit open for {entry.model_id}",
        retry_after=entry.breaker.retry_in() or None,
        code="circuit_open",
    )


def _deadline_error(last: ImbotError | None, model_id: str, attempts: int) -> ImbotError:
    if last is not None:
        return _exhausted(last, attempts)
    return RetryableError(f"deadline passed before calling {model_id}", code="deadline")


def _exhausted(last: ImbotError | None, attempts: int) -> ImbotError:
    """The error that ends a chain walk. After at least one attempt it is marked
    ``retries_spent``: the catalog made this call's repeats, nobody repeats them.
    With none (every circuit open, an empty chain) it is left for the caller."""
    if last is None:
        return ConfigurationError("empty model chain")
    if attempts > 0:
        retries_spent(last, attempts)
    return last


def _log_failure(model_id: str, attempt: int, error: ImbotError) -> None:
    log.warning(
        "model call failed",
        extra={
            "model": model_id,
            "attempt": attempt + 1,
            "kind": error.kind,
            "provider": error.provider,
            "status": error.status,
            "code": error.code,
            "request_id": error.request_id,
        },
    )
