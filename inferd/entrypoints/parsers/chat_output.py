"""What the chat endpoint uses per choice: the reasoning parser, then the tool parser on the content.

    output text --reasoning parser--> reasoning
                                  \\-> content --tool parser--> content, tool calls

With a reasoning parser active, tool calls are parsed from the content part only (reference
§3.2/§3.3): a call the model drafts while thinking is not a call. Without one the whole output
is content. The tool parser runs only when the request enables auto tool choice
(`tools_enabled`) and the server names a `--tool-call-parser`.

Streaming (`feed` per detokenised delta, then `finish` once) and non-streaming (`parse_full`)
give the same reasoning, content and calls; only the random call ids differ.
"""
from __future__ import annotations

from typing import Any

from inferd.entrypoints.parsers.reasoning import ReasoningParser, get_reasoning_parser
from inferd.entrypoints.parsers.tools import ToolParser, get_tool_parser
from inferd.entrypoints.parsers.types import DeltaMessage, ParsedMessage, none_if_empty


class ChatOutputParser:
    def __init__(self, reasoning_parser: str | None, tool_parser: str | None, *,
                 chat_template_kwargs: dict[str, Any] | None, tools_enabled: bool,
                 prompt_text: str | None = None):
        # Names are resolved here so that an unknown one fails at construction, listing the
        # valid names; the server should call `get_*_parser` at startup to fail even earlier.
        self._reasoning: ReasoningParser | None = None
        if reasoning_parser:
            cls = get_reasoning_parser(reasoning_parser)
            self._reasoning = cls(chat_template_kwargs=chat_template_kwargs, prompt_text=prompt_text)
        self._tools: ToolParser | None = None
        if tools_enabled and tool_parser:
            self._tools = get_tool_parser(tool_parser)()

    @property
    def tools_called(self) -> bool:
        """Whether the stream has produced a tool call (finish_reason `tool_calls`)."""
        return self._tools is not None and self._tools.tools_called

    def feed(self, delta_text: str) -> DeltaMessage:
        if self._reasoning is None:
            split = DeltaMessage(content=none_if_empty(delta_text))
        else:
            split = self._reasoning.feed(delta_text)
        return self._route_content(split, final=False)

    def finish(self) -> DeltaMessage:
        split = self._reasoning.finish() if self._reasoning is not None else DeltaMessage()
        return self._route_content(split, final=True)

    def _route_content(self, split: DeltaMessage, final: bool) -> DeltaMessage:
        if self._tools is None:
            return split
        out = DeltaMessage(reasoning=split.reasoning)
        if split.content:
            out.merge(self._tools.feed(split.content))
        if final:
            out.merge(self._tools.finish())
        return out

    def parse_full(self, text: str) -> ParsedMessage:
        if self._reasoning is None:
            reasoning, content = None, none_if_empty(text)
        else:
            reasoning, content = self._reasoning.extract(text)
        if self._tools is None or content is None:
            return ParsedMessage(reasoning, content)
        extracted = self._tools.extract(content)
        return ParsedMessage(reasoning, extracted.content, extracted.tool_calls)
