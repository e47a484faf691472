"""`--tool-call-parser pythonic`: a Python list of calls with keyword arguments (Llama 3.2, ToolACE).

    [get_weather(city='San Francisco', unit="celsius"), get_time(tz='PST', offsets=[-8, -7])]

* The list must open the output (after whitespace); anything else is plain content. Text after
  the closing `]` is content.
* It is read with `ast.parse` and a whitelist of literal nodes (strings, numbers, True/False/None,
  lists, tuples, dicts with string keys, a sign on a number). Nothing is ever evaluated: a name,
  attribute, call or operator in an argument makes the list plain content (vLLM once evaluated
  these, which was a remote code execution).
"""
from __future__ import annotations

import ast
import math
from collections.abc import Hashable
from enum import Enum
from typing import Any

from inferd.entrypoints.parsers.tools.base import ParsedCall, Segment, ToolParser, register_tool_parser
from inferd.entrypoints.parsers.tools.common import Scan, dump_arguments, scan_balanced, skip_whitespace


class State(Enum):
    START = "start"  # only whitespace so far: a `[` opens the call list
    TEXT = "text"    # everything from here on is content


class _NotLiteral(Exception):
    pass


def literal_value(node: ast.AST) -> Any:
    """The JSON-compatible value of a literal node; _NotLiteral for anything else."""
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, (str, bool, int)):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
        raise _NotLiteral  # bytes, complex, Ellipsis, inf: no JSON form
    if isinstance(node, (ast.List, ast.Tuple)):
        return [literal_value(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        result: dict[str, Any] = {}
        for key, value in zip(node.keys, node.values):
            if key is None:  # {**other}
                raise _NotLiteral
            name = literal_value(key)
            if not isinstance(name, str):
                raise _NotLiteral
            result[name] = literal_value(value)
        return result
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = literal_value(node.operand)
        if isinstance(operand, bool) or not isinstance(operand, (int, float)):
            raise _NotLiteral
        return -operand if isinstance(node.op, ast.USub) else operand
    raise _NotLiteral


def parse_call_list(source: str) -> tuple[ParsedCall, ...] | None:
    """`[f(a=1), g()]` -> calls; None unless it is a non-empty list of keyword-only calls."""
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        try:
            arguments = {kw.arg: literal_value(kw.value) for kw in node.keywords if kw.arg is not None}
        except (_NotLiteral, RecursionError):
            return None
        if len(arguments) != len(node.keywords):  # a **kwargs entry
            return None
        calls.append(ParsedCall(node.func.id, dump_arguments(arguments)))
    return tuple(calls)


@register_tool_parser("pythonic")
class PythonicToolParser(ToolParser):
    initial_state = State.START

    def next_segment(self, text: str, state: Hashable, final: bool) -> Segment | None:
        if state is State.TEXT:
            return Segment(len(text), State.TEXT)
        space = skip_whitespace(text, 0)
        if space:
            return Segment(space, State.START)
        if not text.startswith("["):
            return Segment(len(text), State.TEXT)
        scan, end = scan_balanced(text, 0, python=True)
        if scan is Scan.INCOMPLETE:
            return Segment(len(text), State.TEXT) if final else None
        calls = parse_call_list(text[:end]) if scan is Scan.BALANCED else None
        return Segment(end, State.TEXT, calls or ())
