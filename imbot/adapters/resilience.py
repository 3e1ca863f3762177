"""Cross-cutting behaviour as wrappers around a ``ChatModel``.

``InstrumentedModel`` records metrics, ``CircuitBreakerModel`` stops calling a
failing model for a cool-down, ``ConcurrencyLimitedModel`` bounds calls in
flight. The catalog stacks them per model and adds retry (with core.retry's
backoff) and fallback on top.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from imbot.adapters import metrics
from imbot.adapters.base import ChatModel, ChatRequest, CompletionResult, Done, StreamEvent
from imbot.core.errors import (
    ConfigurationError,
    ContentRejected,
    FatalError,
    ImbotError,
    RetryableError,
)

CircuitState = Literal["closed", "open", "half_open"]
_STATE_VALUE = {"closed": 0, "open": 1, "half_open": 2}


class CircuitOpenError(RetryableError):
    """The model is skipped: its circuit is open."""


def counts_as_failure(error: BaseException) -> bool:
    """Does this error say the model is unhealthy (as opposed to a bad request)?"""
    if isinstance(error, CircuitOpenError | ContentRejected):
        return False
    if isinstance(error, RetryableError | ConfigurationError):
        return True
    if isinstance(error, FatalError):
        return error.reason in ("quota_exhausted", "billing", "not_found")
    # Timeouts, cancellations by the deadline and our own bugs count too.
    return not isinstance(error, ImbotError)


class CircuitBreaker:
    """Consecutive-failure breaker: closed → open (cool-down) → half-open (one probe)."""

    def __init__(
        self,
        model_id: str,
        *,
        failure_threshold: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model_id = model_id
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._state: CircuitState = "closed"
        self._opened_at = 0.0
        self._probing = False
        self._gauge = metrics.CIRCUIT_STATE.labels(model_id)
        self._gauge.set(0)

    @property
    def state(self) -> CircuitState:
        if self._state == "open" and self._clock() - self._opened_at >= self.cooldown_s:
            self._set("half_open")
        return self._state

    def retry_in(self) -> float:
        """Seconds until an open circuit lets a probe through."""
        if self.state != "open":
            return 0.0
        return max(0.0, self.cooldown_s - (self._clock() - self._opened_at))

    def available(self) -> bool:
        state = self.state
        return state == "closed" or (state == "half_open" and not self._probing)

    def acquire(self) -> None:
        """Admit one call, or raise CircuitOpenError."""
        state = self.state
        if state == "closed":
            return
        if state == "half_open" and not self._probing:
            self._probing = True
            return
        raise CircuitOpenError(
            f"circuit open for {self.model_id}",
            retry_after=self.retry_in() or None,
            code="circuit_open",
        )

    def record_success(self) -> None:
        self._failures = 0
        self._probing = False
        if self._state != "closed":
            self._set("closed")

    def record_failure(self) -> None:
        self._probing = False
        self._failures += 1
        if self._state == "half_open" or self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
            self._set("open")

    def release(self) -> None:
        """A call ended saying nothing about health (e.g. a bad request)."""
        self._probing = False

    def _set(self, state: CircuitState) -> None:
        self._state = state
        self._gauge.set(_STATE_VALUE[state])


class WrapperModel:
    """Delegates to ``wrapped``; subclasses override what they add."""

    def __init__(self, wrapped: ChatModel) -> None:
        self.wrapped = wrapped
        self.name = wrapped.name

    async def complete(self, request: ChatRequest) -> CompletionResult:
        return await self.wrapped.complete(request)

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        return self.wrapped.stream(request)


class CircuitBreakerModel(WrapperModel):
    def __init__(self, wrapped: ChatModel, breaker: CircuitBreaker) -> None:
        super().__init__(wrapped)
        self.breaker = breaker

    def _record(self, error: BaseException | None) -> None:
        if error is None:
            self.breaker.record_success()
        elif counts_as_failure(error):
            self.breaker.record_failure()
        elif isinstance(error, ContentRejected):
            self.breaker.record_success()  # the provider answered
        else:
            self.breaker.release()

    async def complete(self, request: ChatRequest) -> CompletionResult:
        self.breaker.acquire()
        try:
            result = await self.wrapped.complete(request)
        except BaseException as exc:
            self._record(exc)
            raise
        self._record(None)
        return result

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        self.breaker.acquire()
        outcome: BaseException | None = asyncio.CancelledError()
        try:
            async for event in self.wrapped.stream(request):
                if isinstance(event, Done):
                    outcome = None
                yield event
        except BaseException as exc:
            outcome = exc
            raise
        finally:
            # A consumer that stops early (aclose) before Done leaves the outcome unknown.
            if isinstance(outcome, GeneratorExit):
                self.breaker.release()
            else:
                self._record(outcome)


class ConcurrencyLimitedModel(WrapperModel):
    def __init__(self, wrapped: ChatModel, limiter: asyncio.Semaphore) -> None:
        super().__init__(wrapped)
        self.limiter = limiter

    async def complete(self, request: ChatRequest) -> CompletionResult:
        async with self.limiter:
            return await self.wrapped.complete(request)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        async with self.limiter:
            async for event in self.wrapped.stream(request):
                yield event


class InstrumentedModel(WrapperModel):
    """Counts calls, tokens, cost, errors and latency per model id."""

    def __init__(self, wrapped: ChatModel, provider: str) -> None:
        super().__init__(wrapped)
        self.provider = provider
        self._ok = metrics.CALLS.labels(self.name, provider, "ok")
        # The failures the model-error alert counts exist at zero from the start: a series
        # first seen at 1 has no earlier sample, and rate() would miss that first failure.
        for kind in ("RetryableError", "FatalError", "TimeoutError", "ContentRejected"):
            metrics.CALLS.labels(self.name, provider, kind)
        self._latency = metrics.MODEL_SECONDS.labels(self.name)
        self._tokens_in = metrics.TOKENS.labels(self.name, "input")
        self._tokens_out = metrics.TOKENS.labels(self.name, "output")
        self._cost: dict[str, Any] = {}

    def _success(self, result: CompletionResult) -> None:
        self._ok.inc()
        self._latency.observe(result.latency_ms / 1000)
        if result.usage is not None:
            self._tokens_in.inc(result.usage.input_tokens)
            self._tokens_out.inc(result.usage.output_tokens)
        if result.cost and result.currency:
            counter = self._cost.get(result.currency)
            if counter is None:
                counter = self._cost[result.currency] = metrics.COST.labels(
                    self.name, result.currency
                )
            counter.inc(result.cost)

    def _failure(self, error: BaseException) -> None:
        kind = type(error).__name__ if isinstance(error, ImbotError) else "TimeoutError"
        if isinstance(error, asyncio.CancelledError):
            kind = "Cancelled"
        reason: str
        if isinstance(error, FatalError):
            reason = error.reason
        elif isinstance(error, ContentRejected):
            reason = error.stage
        elif isinstance(error, ImbotError):
            reason = error.code or ""
        else:
            reason = ""
        metrics.CALLS.labels(self.name, self.provider, kind).inc()
        metrics.ERRORS.labels(self.name, self.provider, kind, reason).inc()

    async def complete(self, request: ChatRequest) -> CompletionResult:
        try:
            result = await self.wrapped.complete(request)
        except (ImbotError, TimeoutError, asyncio.CancelledError) as exc:
            self._failure(exc)
            raise
        self._success(result)
        return result

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        try:
            async for event in self.wrapped.stream(request):
                if isinstance(event, Done) and event.result is not None:
                    self._success(event.result)
                yield event
        except (ImbotError, TimeoutError, asyncio.CancelledError) as exc:
            self._failure(exc)
            raise
