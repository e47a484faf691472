"""`--tool-call-parser mistral`: Mistral's `[TOOL_CALLS]` format, old and new.

    [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {...}]   (tokenizer < v11)
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]f[ARGS]{}             (v11 and later)

* Text before and between the calls is content (whitespace-only text next to a call dropped).
* `[ARGS]` may be missing in the new form (some HF tokenizers drop it): the name runs up to `{`.
* A list entry or argument object that is malformed or cut off leaves that `[TOOL_CALLS]` block in
  the content verbatim. A list is all or nothing: one bad entry keeps the whole list as content.
* Ids are 9 alphanumeric characters: Mistral chat templates reject any other id when the call is
  sent back in the next request's history.
"""
from __future__ import annotations

import re
import secrets
import string
from collections.abc import Hashable

from inferd.entrypoints.parsers.markers import is_proper_prefix
from inferd.entrypoints.parsers.tools.base import (
    ParsedCall,
    Segment,
    ToolParser,
    content_until_marker,
    register_tool_parser,
)
from inferd.entrypoints.parsers.tools.common import (
    Scan,
    arguments_object,
    calls_from_json_text,
    dump_arguments,
    load_json,
    scan_balanced,
    skip_whitespace,
)

BOT = "[TOOL_CALLS]"
ARGS = "[ARGS]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_ID_ALPHABET = string.ascii_letters + string.digits


@register_tool_parser("mistral")
class MistralToolParser(ToolParser):
    def make_tool_call_id(self) -> str:
        return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))

    def next_segment(self, text: str, state: Hashable, final: bool) -> Segment | None:
        bot = text.find(BOT)
        if bot < 0:
            return content_until_marker(text, (BOT,), state, final)
        if bot > 0:
            return Segment(bot, state)
        start = skip_whitespace(text, len(BOT))
        if start == len(text):
            return Segment(len(text), state) if final else None
        if text[start] in "[{":  # old form: a JSON list of calls (or a single call object)
            return self._json_calls(text, start, state, final)
        return self._named_call(text, start, state, final)

    def _json_calls(self, text: str, start: int, state: Hashable, final: bool) -> Segment | None:
        scan, end = scan_balanced(text, start)
        if scan is Scan.INCOMPLETE:
            return Segment(len(text), state) if final else None
        calls = calls_from_json_text(text[start:end]) if scan is Scan.BALANCED else None
        return Segment(end, state, calls or ())

    def _named_call(self, text: str, start: int, state: Hashable, final: bool) -> Segment | None:
        name = _NAME.match(text, start)
        if name is None:  # `[TOOL_CALLS]` followed by prose: the tag is just text
            return Segment(start, state)
        pos = name.end()
        if pos < len(text) and text.startswith(ARGS, pos):
            pos += len(ARGS)
        elif is_proper_prefix(text[pos:], ARGS):  # includes "": the name may still grow
            return Segment(len(text), state) if final else None
        pos = skip_whitespace(text, pos)
        if pos == len(text):
            return Segment(len(text), state) if final else None
        if text[pos] != "{":
            return Segment(pos, state)
        scan, end = scan_balanced(text, pos)
        if scan is Scan.INCOMPLETE:
            return Segment(len(text), state) if final else None
        arguments = arguments_object(load_json(text[pos:end])) if scan is Scan.BALANCED else None
        if arguments is None:
            return Segment(end, state)
        return Segment(end, state, (ParsedCall(name.group(), dump_arguments(arguments)),))
