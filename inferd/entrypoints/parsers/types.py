"""The typed hand-offs of the output parsers: what a parser returns to the chat endpoint.

A leaf module: the reasoning parsers, the tool parsers, `chat_output.py` and the chat service all
import these, and these import nothing of inferd.

Streaming contract: every `feed`/`finish` returns one `DeltaMessage`; an empty one
(`is_empty`) means "nothing to send yet" and the endpoint skips it. Empty strings never appear
in a delta or a parsed message: they are normalised to None, so "no content" has one spelling.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field


def make_tool_call_id() -> str:
    """vLLM's id shape for tool calls (`chatcmpl-tool-<32 hex>`); unique per call, never reused."""
    return f"chatcmpl-tool-{secrets.token_hex(16)}"


def none_if_empty(text: str | None) -> str | None:
    return text if text else None


@dataclass(frozen=True)
class ToolCall:
    """One complete call, as `message.tool_calls[i]` of a non-streamed response."""

    id: str
    name: str
    arguments: str  # a JSON object, serialised (OpenAI sends arguments as a string)
    type: str = "function"


@dataclass
class DeltaToolCall:
    """One entry of `delta.tool_calls`. The first delta of a call carries index, id, type and
    name; later deltas of the same index carry only argument fragments."""

    index: int
    id: str | None = None
    type: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass
class DeltaMessage:
    """What one streamed chunk adds to one choice."""

    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return self.reasoning is None and self.content is None and not self.tool_calls

    def add_reasoning(self, text: str) -> None:
        if text:
            self.reasoning = (self.reasoning or "") + text

    def add_content(self, text: str) -> None:
        if text:
            self.content = (self.content or "") + text

    def merge(self, other: DeltaMessage) -> None:
        """Append `other` after this delta (both came from the same feed/finish call)."""
        self.add_reasoning(other.reasoning or "")
        self.add_content(other.content or "")
        self.tool_calls.extend(other.tool_calls)


@dataclass
class ExtractedToolCalls:
    """A tool parser's non-streaming result over a whole (content) text."""

    tools_called: bool
    tool_calls: list[ToolCall]
    content: str | None


@dataclass
class ParsedMessage:
    """The non-streamed assistant message: `message.reasoning`, `.content`, `.tool_calls`."""

    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)

    @property
    def tools_called(self) -> bool:
        return bool(self.tool_calls)


class UnknownParserError(KeyError):
    """An unknown `--reasoning-parser` / `--tool-call-parser` name. A KeyError as in vLLM, with a
    readable message (KeyError's own str() would quote it)."""

    def __init__(self, kind: str, name: str, valid: list[str]):
        self.message = f"Unknown {kind} {name!r}; valid names: {', '.join(sorted(valid))}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message
