"""`--tool-call-parser hermes`: Hermes/Qwen2.5/QwQ/Qwen3 calls, one JSON object per tag pair.

    Let me check.<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
    <tool_call>
    {"name": "get_time", "arguments": {"tz": "CET"}}
    </tool_call>

* Text outside the tags is content (whitespace-only text next to a call is dropped).
* An unclosed `<tool_call>` at the end of the output (the model stopped without `</tool_call>`)
  still counts if its JSON is complete and valid.
* A block whose JSON is malformed, or not `{"name", "arguments"}`, stays in the content verbatim,
  tags included; the other blocks are still calls.
"""
from __future__ import annotations

from collections.abc import Hashable

from inferd.entrypoints.parsers.tools.base import (
    Segment,
    ToolParser,
    content_until_marker,
    register_tool_parser,
)
from inferd.entrypoints.parsers.tools.common import call_from_object, load_json

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"


@register_tool_parser("hermes")
class HermesToolParser(ToolParser):
    def next_segment(self, text: str, state: Hashable, final: bool) -> Segment | None:
        start = text.find(TOOL_CALL_START)
        if start < 0:
            return content_until_marker(text, (TOOL_CALL_START,), state, final)
        if start > 0:
            return Segment(start, state)
        close = text.find(TOOL_CALL_END, len(TOOL_CALL_START))
        if close >= 0:
            body, end = text[len(TOOL_CALL_START):close], close + len(TOOL_CALL_END)
        elif final:
            body, end = text[len(TOOL_CALL_START):], len(text)
        else:
            return None
        # One object per block (a list here is not the hermes format).
        call = call_from_object(load_json(body))
        return Segment(end, state, (call,) if call else ())
