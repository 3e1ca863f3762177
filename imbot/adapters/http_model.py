"""The common shape of a provider that speaks HTTP.

A provider module supplies pure functions (build the body, parse the reply, map
an error, decode stream lines) and declares its endpoint and auth as class
attributes; ``HttpChatModel`` does the I/O around them:
one POST on the shared keep-alive client, timing, cost, transport errors, and
assembling a stream into a final ``CompletionResult``.

Streams get two timers of their own besides the caller's deadline: a first-byte
timeout (request sent → first line of the body) and an idle timeout (the longest
silence between two lines), so a provider that stalls mid-reply is noticed long
before the overall deadline.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import httpx
import orjson

from imbot.adapters.base import (
    ChatRequest,
    CompletionResult,
    Delta,
    Done,
    StreamEvent,
    Usage,
    refuse_images,
)
from imbot.adapters.provider_errors import redact
from imbot.adapters.sse import SseEvent, SseParser
from imbot.core.catalog import _ModelEntry
from imbot.core.envelope import FinishReason
from imbot.core.errors import ConfigurationError, ImbotError, RetryableError


@dataclass(slots=True)
class Parsed:
    """What a provider's response parser extracts from one reply."""

    text: str
    finish_reason: FinishReason
    raw_finish_reason: str | None
    usage: Usage | None
    model: str | None = None
    request_id: str | None = None
    safety: dict[str, object] = field(default_factory=dict)


@dataclass(slots=True)
class Prepared:
    url: str
    headers: dict[str, str]
    body: bytes


class AuthExpired(Exception):
    """Raised by a parser when the provider says our access token is stale (ERNIE 110/111)."""

    def __init__(self, error: ImbotError) -> None:
        super().__init__(str(error))
        self.error = error


class StreamDecoder(ABC):
    """Turns the lines of one streamed response into events.

    The default framing is SSE: ``handle`` gets one parsed event and returns the
    events it means; a ``Done`` ends the stream. The decoder keeps what the final
    result needs (request id, model, safety flags)."""

    request_id: str | None = None
    model: str | None = None

    def __init__(self) -> None:
        self.safety: dict[str, object] = {}
        self._sse = SseParser()

    def feed(self, line: str) -> Iterable[StreamEvent]:
        event = self._sse.feed(line)
        return () if event is None else self.handle(event)

    @abstractmethod
    def handle(self, event: SseEvent) -> Iterable[StreamEvent]: ...

    def end(self) -> Iterable[StreamEvent]:
        """The body ended without a ``Done``: finish a last unterminated frame, or fail."""
        event = self._sse.flush()
        if event is not None:
            events = list(self.handle(event))
            if any(isinstance(e, Done) for e in events):
                return events
        raise RetryableError("stream ended before the provider finished", code="incomplete_stream")


def secret_from_env(
    env: Mapping[str, str], var: str | None, model_id: str, *, required: bool
) -> str | None:
    """The value of the environment variable an entry names for a secret (None when the
    entry names none); a named but unset variable is a ConfigurationError when required."""
    if not var:
        return None
    value = env.get(var)
    if not value and required:
        raise ConfigurationError(
            f"model {model_id!r} needs the environment variable {var} (its API key)"
        )
    return value or None


class HttpChatModel(ABC):
    """One provider's model over HTTP. A provider is declared, not constructed: its class
    says where the call goes (``path`` under the entry's ``base_url``), how the API key
    travels (``auth_header`` + ``auth_prefix``; None: not in a header), which headers a
    stream adds, and supplies the pure hooks (``build_body``, ``parse``, ``map_error``,
    ``decoder``). The one constructor builds the URL and headers from that."""

    provider: ClassVar[str]
    path: ClassVar[str] = ""
    auth_header: ClassVar[str | None] = "authorization"
    auth_prefix: ClassVar[str] = "Bearer "
    # False: the key is optional (a local server, or one behind an auth proxy).
    api_key_required: ClassVar[bool] = True
    stream_headers: ClassVar[Mapping[str, str]] = {}
    # Response headers carrying the provider's request id, preferred to the body's id
    # (that is the id the provider's support asks for).
    request_id_headers: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        name: str,
        config: _ModelEntry,
        client: httpx.AsyncClient,
        *,
        api_key: str | None = None,
        secrets: Iterable[str] = (),
    ) -> None:
        self.name = name
        self.config = config
        self.model = config.model or name
        self.client = client
        self.api_key = api_key
        self._secrets = tuple(s for s in (api_key, *secrets) if s)
        self._timeout = httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s)
        self._first_byte_s = config.stream_first_byte_s
        self._idle_s = config.stream_idle_s
        # httpx's own read timeout is only a backstop behind the two stream timers.
        self._stream_timeout = httpx.Timeout(
            config.timeout_s,
            connect=config.connect_timeout_s,
            read=max(self._first_byte_s, self._idle_s) + 1.0,
        )
        self._price = config.price
        self.url = f"{config.base_url}{self.endpoint()}"
        headers = {"content-type": "application/json", **self.fixed_headers(), **config.headers}
        if api_key and self.auth_header:
            headers[self.auth_header] = f"{self.auth_prefix}{api_key}"
        self.headers = headers
        self._stream_headers = {**headers, **self.stream_headers}

    @classmethod
    def from_config(
        cls, name: str, config: _ModelEntry, client: httpx.AsyncClient, env: Mapping[str, str]
    ) -> Self:
        """The model of a catalog entry, its API key read from the environment."""
        key = secret_from_env(env, config.api_key_env, name, required=cls.api_key_required)
        return cls(name, config, client, api_key=key)

    # -- provider hooks ---------------------------------------------------------

    def endpoint(self) -> str:
        """The path under ``base_url`` (``path`` unless the entry decides it)."""
        return self.path

    def fixed_headers(self) -> dict[str, str]:
        """Headers every call of this provider sends besides auth (entry headers win)."""
        return {}

    @abstractmethod
    def build_body(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]: ...

    async def prepare(self, request: ChatRequest, *, stream: bool) -> Prepared:
        headers = self._stream_headers if stream else self.headers
        return Prepared(self.url, headers, self.json_body(self.build_body(request, stream=stream)))

    @abstractmethod
    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> Parsed:
        """A 2xx body to a result; raises core.errors (or AuthExpired) for errors under 200."""

    @abstractmethod
    def map_error(self, status: int, headers: Mapping[str, str], body: bytes) -> ImbotError: ...

    @abstractmethod
    def decoder(self, headers: Mapping[str, str]) -> StreamDecoder: ...

    async def refresh_auth(self) -> None:  # noqa: B027 - optional hook
        """Renew credentials after ``AuthExpired`` (only ERNIE needs this)."""

    def stream_error_body(self, headers: Mapping[str, str]) -> bool:
        """True when a 2xx answer to a stream request is a plain error body, not a stream."""
        return False

    def request_id_of(self, headers: Mapping[str, str], body_id: str | None) -> str | None:
        """The request id to report: a ``request_id_headers`` header, else the body's."""
        for name in self.request_id_headers:
            value = headers.get(name)
            if value:
                return value
        return body_id

    # -- I/O --------------------------------------------------------------------

    async def complete(self, request: ChatRequest) -> CompletionResult:
        refuse_images(request, model_id=self.name, vision=self.config.vision)
        start = time.perf_counter()
        for auth_attempt in (0, 1):
            prepared = await self.prepare(request, stream=False)
            try:
                response = await self.client.post(
                    prepared.url,
                    content=prepared.body,
                    headers=prepared.headers,
                    timeout=self._timeout,
                )
            except httpx.TransportError as exc:
                raise self._transport_error(exc) from None
            status, headers, body = response.status_code, response.headers, response.content
            try:
                if status >= 300:
                    raise self._tag(self.map_error(status, headers, body))
                parsed = self.parse(status, headers, body)
            except AuthExpired as expired:
                if auth_attempt:
                    raise self._tag(expired.error) from None
                await self.refresh_auth()
                continue
            except ImbotError as exc:
                raise self._tag(self._with_request_id(exc, headers, None)) from None
            parsed.request_id = self.request_id_of(headers, parsed.request_id)
            return self.result(parsed, start)
        raise AssertionError("unreachable")  # pragma: no cover

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        refuse_images(request, model_id=self.name, vision=self.config.vision)
        start = time.perf_counter()
        for auth_attempt in (0, 1):
            prepared = await self.prepare(request, stream=True)
            response, first_byte_at = await self._open_stream(prepared)
            headers = response.headers
            decoder: StreamDecoder | None = None
            try:
                await self._refuse_error_answer(response)
                decoder = self.decoder(headers)
                parts: list[str] = []
                usage: Usage | None = None
                first_token_ms: float | None = None
                done: Done | None = None
                async with aclosing(self._events(response, decoder, first_byte_at)) as events:
                    async for event in events:
                        if isinstance(event, Done):
                            done = event
                            break
                        if isinstance(event, Delta):
                            if first_token_ms is None:
                                first_token_ms = (time.perf_counter() - start) * 1000
                            parts.append(event.text)
                        else:
                            usage = event.usage
                        yield event
                if done is None:  # pragma: no cover - decoders raise instead
                    raise RetryableError("stream ended without a final frame")
                parsed = Parsed(
                    text="".join(parts),
                    finish_reason=done.finish_reason,
                    raw_finish_reason=done.raw_finish_reason,
                    usage=usage,
                    model=decoder.model,
                    request_id=self.request_id_of(headers, decoder.request_id),
                    safety=decoder.safety,
                )
                result = self.result(parsed, start, first_token_ms=first_token_ms)
                yield Done(done.finish_reason, done.raw_finish_reason, result)
                return
            except AuthExpired as expired:
                if auth_attempt:
                    raise self._tag(expired.error) from None
                await self.refresh_auth()
                continue
            except ImbotError as exc:
                body_id = decoder.request_id if decoder is not None else None
                raise self._tag(self._with_request_id(exc, headers, body_id)) from None
            except httpx.TransportError as exc:
                raise self._transport_error(exc, mid_stream=True) from None
            finally:
                await response.aclose()

    async def _open_stream(self, prepared: Prepared) -> tuple[httpx.Response, float]:
        """Send the request; the response (headers read) and when the first byte is due.
        The first-byte timer covers the wait for the headers too."""
        built = self.client.build_request(
            "POST",
            prepared.url,
            content=prepared.body,
            headers=prepared.headers,
            timeout=self._stream_timeout,
        )
        first_byte_at = asyncio.get_running_loop().time() + self._first_byte_s
        try:
            async with asyncio.timeout_at(first_byte_at):
                return await self.client.send(built, stream=True), first_byte_at
        except TimeoutError:
            raise self._tag(self._first_byte_error()) from None
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from None

    async def _refuse_error_answer(self, response: httpx.Response) -> None:
        """Raise the error an answer carries instead of a stream (an error status, or a
        2xx plain error body for providers that send those)."""
        status, headers = response.status_code, response.headers
        if status < 300 and not self.stream_error_body(headers):
            return
        body = await response.aread()
        if status >= 300:
            raise self.map_error(status, headers, body)
        self.parse(status, headers, body)  # raises the error it carries
        raise RetryableError("provider answered a stream request without a stream")

    async def _events(
        self, response: httpx.Response, decoder: StreamDecoder, first_byte_at: float
    ) -> AsyncGenerator[StreamEvent, None]:
        """The decoder's events, line by line, until a ``Done``; at the end of the body
        whatever ``decoder.end()`` makes of it. Only the wait for the next line is timed
        (first byte, then idle), never a yield: a timer must not fire while the consumer
        holds an event."""
        loop = asyncio.get_running_loop()
        lines = response.aiter_lines()
        timer_at = first_byte_at
        started = False
        while True:
            try:
                async with asyncio.timeout_at(timer_at):
                    line = await anext(lines)
            except StopAsyncIteration:
                break
            except TimeoutError:
                if not started:
                    raise self._first_byte_error() from None
                raise RetryableError(
                    f"{self.name} sent nothing for {self._idle_s:g} s mid-stream",
                    code="idle_timeout",
                ) from None
            started = True
            timer_at = loop.time() + self._idle_s
            for event in decoder.feed(line):
                yield event
                if isinstance(event, Done):
                    return
        for event in decoder.end():
            yield event
            if isinstance(event, Done):
                return

    def _first_byte_error(self) -> RetryableError:
        return RetryableError(
            f"{self.name} sent no stream data within {self._first_byte_s:g} s",
            code="first_byte_timeout",
        )

    def _with_request_id(
        self, error: ImbotError, headers: Mapping[str, str], body_id: str | None
    ) -> ImbotError:
        """Errors raised from a body (stream frames carry no headers) get the response's id."""
        if error.request_id is None:
            error.request_id = self.request_id_of(headers, body_id)
        return error

    # -- shared pieces ----------------------------------------------------------

    def result(
        self, parsed: Parsed, start: float, *, first_token_ms: float | None = None
    ) -> CompletionResult:
        usage = parsed.usage
        cost: float | None = None
        currency: str | None = None
        if usage is not None:
            cost = self._price.cost(usage.input_tokens, usage.output_tokens)
            currency = self._price.currency
        return CompletionResult(
            text=parsed.text,
            finish_reason=parsed.finish_reason,
            raw_finish_reason=parsed.raw_finish_reason,
            usage=usage,
            provider=self.provider,
            model=parsed.model or self.model,
            provider_request_id=parsed.request_id,
            latency_ms=(time.perf_counter() - start) * 1000,
            first_token_ms=first_token_ms,
            cost=cost,
            currency=currency,
            model_id=self.name,
            safety=parsed.safety,
        )

    def json_body(self, payload: object) -> bytes:
        return orjson.dumps(payload)

    def _tag(self, error: ImbotError) -> ImbotError:
        """Fill in the provider and scrub secrets from what the error carries."""
        if error.provider is None:
            error.provider = self.provider
        error.message = redact(error.message, self._secrets)
        error.args = (error.message,)
        if error.raw:
            error.raw = redact(error.raw, self._secrets)
        return error

    def _transport_error(
        self, exc: httpx.TransportError, *, mid_stream: bool = False
    ) -> ImbotError:
        where = "mid-stream" if mid_stream else "calling"
        if isinstance(exc, httpx.TimeoutException):
            code = "timeout"
        elif isinstance(exc, httpx.UnsupportedProtocol):
            return self._tag(
                ConfigurationError(f"bad URL for {self.name}: {type(exc).__name__}", code="url")
            )
        else:
            code = "connection"
        detail = redact(str(exc), self._secrets)
        return self._tag(
            RetryableError(f"{type(exc).__name__} {where} {self.name}: {detail}", code=code)
        )

    async def aclose(self) -> None:  # noqa: B027 - nothing of its own to close
        """The client is shared; the catalog closes it."""
