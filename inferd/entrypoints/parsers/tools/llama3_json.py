"""`--tool-call-parser llama3_json` (also `llama4_json`): Llama 3.1+ JSON tool calls.

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "f", "parameters": {}}

* A call section opens with `<|python_tag|>` anywhere in the output, or with a bare `{` at the very
  start of the output (after whitespace). A `{` later in prose is not a call: answers quoting
  JSON or code would otherwise turn into tool calls.
* It holds JSON objects `{"name", "parameters"|"arguments"}` separated by `;`.
* An object that is malformed, not a call, or cut off ends the section: it and everything after
  it are content, verbatim (so an answer that is plain JSON, `{"answer": 42}`, stays content).
"""
from __future__ import annotations

from collections.abc import Hashable
from enum import Enum

from inferd.entrypoints.parsers.markers import is_proper_prefix
from inferd.entrypoints.parsers.tools.base import (
    Segment,
    ToolParser,
    content_until_marker,
    register_tool_parser,
)
from inferd.entrypoints.parsers.tools.common import Scan, calls_from_json_text, scan_balanced, skip_whitespace

PYTHON_TAG = "<|python_tag|>"
SEPARATOR = ";"


class State(Enum):
    START = "start"            # nothing but whitespace so far: a bare `{` opens a call
    TEXT = "text"              # in prose: only <|python_tag|> opens a call
    AFTER_CALL = "after_call"  # just after a call: `;` continues the section


@register_tool_parser("llama3_json", "llama4_json")
class Llama3JsonToolParser(ToolParser):
    initial_state = State.START

    def next_segment(self, text: str, state: Hashable, final: bool) -> Segment | None:
        if state is State.START:
            return self._at_start(text, final)
        if state is State.AFTER_CALL:
            return self._after_call(text, final)
        return self._in_text(text, final)

    def _at_start(self, text: str, final: bool) -> Segment | None:
        space = skip_whitespace(text, 0)
        if space:
            return Segment(space, State.START)
        if text.startswith("{"):
            return self._call_object(text, 0, final)
        if not final and is_proper_prefix(text, PYTHON_TAG):
            return None
        return self._in_text(text, final)

    def _in_text(self, text: str, final: bool) -> Segment | None:
        tag = text.find(PYTHON_TAG)
        if tag < 0:
            return content_until_marker(text, (PYTHON_TAG,), State.TEXT, final)
        if tag > 0:
            return Segment(tag, State.TEXT)
        body = skip_whitespace(text, len(PYTHON_TAG))
        if body == len(text):
            return Segment(len(text), State.TEXT) if final else None
        if text[body] != "{":  # a tag that opens no object is just text
            return Segment(len(PYTHON_TAG), State.TEXT)
        return self._call_object(text, body, final)

    def _after_call(self, text: str, final: bool) -> Segment | None:
        sep = skip_whitespace(text, 0)
        if sep == len(text):
            return Segment(len(text), State.TEXT) if final else None
        if text[sep] != SEPARATOR:
            return self._in_text(text, final)
        body = skip_whitespace(text, sep + 1)
        if body == len(text):
            return Segment(len(text), State.TEXT) if final else None
        if text[body] != "{":
            return Segment(body, State.TEXT)
        return self._call_object(text, body, final)

    def _call_object(self, text: str, start: int, final: bool) -> Segment | None:
        """The object at `start`, with whatever led up to it (tag, separator) in the segment."""
        scan, end = scan_balanced(text, start)
        if scan is Scan.INCOMPLETE:
            return Segment(len(text), State.TEXT) if final else None
        calls = calls_from_json_text(text[start:end]) if scan is Scan.BALANCED else None
        if calls is None:
            return Segment(end, State.TEXT)
        return Segment(end, State.AFTER_CALL, calls)
