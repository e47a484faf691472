"""The tool-call parser interface, its registry (`--tool-call-parser NAME`), and the one driver
that runs every parser both whole and streamed.

How a parser is written: it states its format as one function, `next_segment(text, state,
final)`, that looks at the start of the not-yet-parsed text and decides what comes first:

* a run of content (`Segment(n, state)`: the first n characters are plain text), or
* one or more complete, valid tool calls (`Segment(n, state, calls)`), or
* None: "cannot tell yet" (a tag or a JSON value is still open). Only allowed when `final` is
  False; with `final` True (the whole output is here) it must decide.

A call block that turns out malformed (bad JSON, missing name, truncated by max_tokens) is
returned as content: the raw text degrades to content instead of failing the request.

The driver below cuts the text with that function in two ways: `extract` with `final=True`
from the start (non-streamed responses), and `feed`/`finish` as deltas arrive (SSE). Streaming
equals non-streaming for every cut of the text provided `next_segment` returns None whenever
more text could still change its decision; tests/unit/test_parsers.py checks exactly that,
feeding outputs one character, one token and random chunks at a time.

Why calls are emitted whole, once their block is closed and valid, rather than argument fragment
by fragment: a fragment cannot be taken back. If a streamed call later proves malformed, the
stream would already disagree with the non-streamed answer (which degrades it to content), the
mismatch STYLE.md warns about in peers that stream partial JSON. Content is still streamed
character by character, held back only while it could be the start of a tool-call tag.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from inferd.entrypoints.parsers.markers import partial_marker_len
from inferd.entrypoints.parsers.types import (
    DeltaMessage,
    DeltaToolCall,
    ExtractedToolCalls,
    ToolCall,
    UnknownParserError,
    make_tool_call_id,
    none_if_empty,
)


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # serialised JSON object


@dataclass(frozen=True)
class Segment:
    length: int                  # characters consumed from the front of the text
    next_state: Hashable         # the parser's state after them
    calls: tuple[ParsedCall, ...] = ()  # empty: the characters are content


def content_until_marker(text: str, markers: tuple[str, ...], state: Hashable,
                         final: bool) -> Segment | None:
    """Content up to where a marker might begin at the end of `text` (no marker occurs in it)."""
    keep = 0 if final else partial_marker_len(text, markers)
    size = len(text) - keep
    return Segment(size, state) if size > 0 else None


class _ContentRuns:
    """Content between tool calls. A run of content that is only whitespace, next to a tool call
    (the newlines models put between and after calls), is dropped; anything else is kept
    verbatim. Whitespace is held until the run shows non-space text or a call ends it."""

    def __init__(self) -> None:
        self._pending = ""       # whitespace-only start of the current run
        self._run_has_text = False

    def text(self, piece: str) -> str:
        if not piece or self._run_has_text:
            return piece
        if piece.isspace():
            self._pending += piece
            return ""
        out, self._pending, self._run_has_text = self._pending + piece, "", True
        return out

    def call(self) -> None:
        self._pending, self._run_has_text = "", False

    def end(self, tools_called: bool) -> str:
        out, self._pending = ("" if tools_called else self._pending), ""
        return out


class ToolParser(ABC):
    name: str = ""
    initial_state: Hashable = None

    def __init__(self) -> None:
        # Streaming state; `extract` keeps its own, so one object may do both.
        self._buf = ""
        self._state = self.initial_state
        self._runs = _ContentRuns()
        self._num_calls = 0

    @abstractmethod
    def next_segment(self, text: str, state: Hashable, final: bool) -> Segment | None:
        """Decide what `text` (non-empty) starts with; see the module docstring."""

    def make_tool_call_id(self) -> str:
        return make_tool_call_id()

    @property
    def tools_called(self) -> bool:
        """Whether the stream has emitted a tool call so far."""
        return self._num_calls > 0

    # -- both drivers --------------------------------------------------------------------------
    def _cut(self, text: str, state: Hashable,
             final: bool) -> tuple[list[tuple[str, Segment]], int, Hashable]:
        """Cut decided segments off the front of `text`: (pieces, characters used, new state)."""
        pieces: list[tuple[str, Segment]] = []
        pos = 0
        while pos < len(text):
            seg = self.next_segment(text[pos:], state, final)
            if seg is None:
                if final:
                    raise RuntimeError(f"{type(self).__name__} left text undecided at the end")
                break
            if seg.length <= 0 and seg.next_state == state:
                raise RuntimeError(f"{type(self).__name__} made no progress at {text[pos:pos + 20]!r}")
            pieces.append((text[pos:pos + seg.length], seg))
            pos += seg.length
            state = seg.next_state
        return pieces, pos, state

    # -- non-streaming -------------------------------------------------------------------------
    def extract(self, text: str) -> ExtractedToolCalls:
        runs = _ContentRuns()
        content: list[str] = []
        calls: list[ToolCall] = []
        pieces, _, _ = self._cut(text, self.initial_state, final=True)
        for piece, seg in pieces:
            if seg.calls:
                runs.call()
                calls.extend(ToolCall(self.make_tool_call_id(), c.name, c.arguments) for c in seg.calls)
            else:
                content.append(runs.text(piece))
        content.append(runs.end(tools_called=bool(calls)))
        return ExtractedToolCalls(bool(calls), calls, none_if_empty("".join(content)))

    # -- streaming -----------------------------------------------------------------------------
    def feed(self, delta_text: str) -> DeltaMessage:
        self._buf += delta_text
        return self._drain(final=False)

    def finish(self) -> DeltaMessage:
        out = self._drain(final=True)
        out.add_content(self._runs.end(self.tools_called))
        return out

    def _drain(self, final: bool) -> DeltaMessage:
        out = DeltaMessage()
        pieces, used, self._state = self._cut(self._buf, self._state, final)
        self._buf = self._buf[used:]
        for piece, seg in pieces:
            if not seg.calls:
                out.add_content(self._runs.text(piece))
                continue
            self._runs.call()
            for call in seg.calls:
                out.tool_calls.append(DeltaToolCall(
                    index=self._num_calls, id=self.make_tool_call_id(), type="function",
                    name=call.name, arguments=call.arguments))
                self._num_calls += 1
        return out


_REGISTRY: dict[str, type[ToolParser]] = {}


def register_tool_parser(*names: str) -> Callable[[type[ToolParser]], type[ToolParser]]:
    def register(cls: type[ToolParser]) -> type[ToolParser]:
        for name in names:
            if name in _REGISTRY:
                raise ValueError(f"tool parser {name!r} registered twice")
            _REGISTRY[name] = cls
        cls.name = names[0]
        return cls
    return register


def tool_parser_names() -> list[str]:
    return sorted(_REGISTRY)


def get_tool_parser(name: str) -> type[ToolParser]:
    """The class for `--tool-call-parser NAME`; an unknown name raises, listing the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownParserError("tool call parser", name, tool_parser_names()) from None
