"""Server-Sent Events framing, as the providers send it: ``data:`` with or without the
space, ``event:``/``id:`` lines, ``:`` comments (DashScope's ``:HTTP_STATUS/NNN``), and a
bare JSON line inside a stream (ERNIE's errors). Pure: no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SseEvent:
    data: str = ""
    event: str | None = None
    id: str | None = None
    comments: list[str] = field(default_factory=list)
    # A line that is not SSE at all (ERNIE sends bare JSON errors inside a stream).
    bare: bool = False


class SseParser:
    """Line-by-line SSE parser, tolerant of ``data:`` with or without the space."""

    __slots__ = ("_comments", "_data", "_event", "_id")

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._comments: list[str] = []

    def feed(self, line: str) -> SseEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith("data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(" ") else value)
            return None
        if line[0] == ":":
            self._comments.append(line[1:])
            return None
        if line[0] in "{[":
            return SseEvent(data=line, bare=True)
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        return None

    def flush(self) -> SseEvent | None:
        """The last event when the stream closed without a blank line after it."""
        return self._dispatch()

    def _dispatch(self) -> SseEvent | None:
        if not self._data and self._event is None:
            self._comments.clear()
            return None
        event = SseEvent(
            data="\n".join(self._data), event=self._event, id=self._id, comments=self._comments
        )
        self._data = []
        self._event = None
        self._comments = []
        return event
