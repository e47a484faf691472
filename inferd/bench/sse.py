"""A small incremental parser for server-sent events, as OpenAI-compatible servers frame them.

Written by hand rather than taken from a client library so that the benchmark sees exactly when
each event's bytes arrived, and so that it parses every peer the same way. Network reads split
the stream anywhere (inside a line, between `\\r` and `\\n`), so the parser keeps a buffer and only
emits an event once its terminating blank line has arrived.
"""
from __future__ import annotations

DONE = "[DONE]"


class SSEParser:
    """Feed text as it arrives; get back the `data` payload of each complete event.

    Follows the SSE rules that matter here: lines end in `\\n`, `\\r\\n` or `\\r`; a blank line ends
    an event; `:` starts a comment; several `data:` lines in one event are joined with `\\n`; one
    space after the colon is dropped. Fields other than `data` (`event`, `id`, `retry`) are ignored.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._data: list[str] = []

    def feed(self, text: str) -> list[str]:
        """Consume `text`; return the payloads of the events it completed, in order."""
        self._buffer += text
        events: list[str] = []
        while True:
            line, rest = _split_line(self._buffer)
            if line is None:
                break
            self._buffer = rest
            payload = self._take_line(line)
            if payload is not None:
                events.append(payload)
        return events

    def close(self) -> list[str]:
        """End of stream: a final event without its blank line still counts (servers that close
        the connection right after the last `data:` line)."""
        events: list[str] = []
        if self._buffer:
            line, self._buffer = self._buffer.rstrip("\r"), ""
            payload = self._take_line(line)
            if payload is not None:
                events.append(payload)
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events

    def _take_line(self, line: str) -> str | None:
        if line == "":
            if not self._data:
                return None  # blank lines between events, or an event with no data
            payload, self._data = "\n".join(self._data), []
            return payload
        if line.startswith(":"):
            return None  # comment / keep-alive
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None


def _split_line(buffer: str) -> tuple[str | None, str]:
    """The first complete line of `buffer` and the rest, or (None, buffer) when none is complete.

    A `\\r` at the very end is not yet a line end: the `\\n` of a `\\r\\n` may be in the next read.
    """
    # str.find runs in C: the client shares the CPU with the server it measures, so keep it cheap.
    nl, cr = buffer.find("\n"), buffer.find("\r")
    if cr == -1 or (nl != -1 and nl < cr):
        return (None, buffer) if nl == -1 else (buffer[:nl], buffer[nl + 1:])
    if cr + 1 == len(buffer):
        return None, buffer
    skip = 2 if buffer[cr + 1] == "\n" else 1
    return buffer[:cr], buffer[cr + skip:]
