"""Pieces the tool-call formats share: finding where a JSON (or Python-literal) value ends in text
that may still be arriving, and turning a decoded call into a validated `ParsedCall`.
"""
from __future__ import annotations

import json
import re
from enum import Enum
from typing import Any

from inferd.entrypoints.parsers.tools.base import ParsedCall


class Scan(Enum):
    BALANCED = "balanced"      # the value closed; `end` is just past its closing bracket
    INCOMPLETE = "incomplete"  # the text ended first; more text may close it
    MISMATCH = "mismatch"      # a closing bracket that does not match; `end` is just past it


_CLOSERS = {"}": "{", "]": "[", ")": "("}
# Outside strings only brackets and quotes matter; jumping between them with a regex keeps the
# scan in C for the long stretches of ordinary characters.
_STRUCTURE_JSON = re.compile(r'[\[\]{}"]')
_STRUCTURE_PYTHON = re.compile(r"""[\[\](){}"']""")
# The rest of a string after its opening quote, escapes included (possessive: no backtracking).
_STRING_TAIL = {
    '"': re.compile(r'[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL),
    "'": re.compile(r"[^'\\]*+(?:\\.[^'\\]*+)*+'", re.DOTALL),
}


def scan_balanced(text: str, start: int, *, python: bool = False) -> tuple[Scan, int]:
    """Find the end of the bracketed value that opens at `text[start]` (`{` or `[`).

    Strings are skipped, so brackets inside them do not count. `python=True` also tracks
    parentheses and single-quoted strings (pythonic tool calls).
    """
    structure = _STRUCTURE_PYTHON if python else _STRUCTURE_JSON
    stack: list[str] = []
    pos = start
    while True:
        match = structure.search(text, pos)
        if match is None:
            return Scan.INCOMPLETE, len(text)
        char, pos = match.group(), match.end()
        if char in _STRING_TAIL:
            tail = _STRING_TAIL[char].match(text, pos)
            if tail is None:
                return Scan.INCOMPLETE, len(text)
            pos = tail.end()
        elif char in _CLOSERS:
            if not stack or stack[-1] != _CLOSERS[char]:
                return Scan.MISMATCH, pos
            stack.pop()
            if not stack:
                return Scan.BALANCED, pos
        else:
            stack.append(char)


def skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def dump_arguments(arguments: dict[str, Any]) -> str:
    # ensure_ascii=False: clients get "東京", not "\u6771\u4eac" (as vLLM sends them).
    return json.dumps(arguments, ensure_ascii=False)


def arguments_object(value: Any) -> dict[str, Any] | None:
    """Arguments as a dict: an object, or a string holding one (some models double-encode)."""
    if isinstance(value, str):
        value = load_json(value)
    return value if isinstance(value, dict) else None


def call_from_object(obj: Any) -> ParsedCall | None:
    """`{"name": str, "arguments"|"parameters": {...}}` -> ParsedCall; None if it is not one.

    Missing arguments mean a call without arguments (`{}`).
    """
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    raw = obj["arguments"] if "arguments" in obj else obj.get("parameters", {})
    arguments = arguments_object(raw)
    if arguments is None:
        return None
    return ParsedCall(name.strip(), dump_arguments(arguments))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def load_json(text: str) -> Any | None:
    """Decode strict JSON (NaN/Infinity rejected: clients could not parse them back), or None."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return None


def calls_from_json_text(text: str) -> tuple[ParsedCall, ...] | None:
    """One call object, or a non-empty list of them; None unless every entry is a valid call."""
    value = load_json(text)
    entries = value if isinstance(value, list) else [value]
    if not entries:
        return None
    calls = tuple(call_from_object(entry) for entry in entries)
    if any(call is None for call in calls):
        return None
    return calls  # type: ignore[return-value]
