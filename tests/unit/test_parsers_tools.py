"""Tool-call parsers, non-streaming, on the formats of reference §3.2 (and their failure modes)."""
from __future__ import annotations

import json
import re

import pytest

from inferd.entrypoints.parsers import UnknownParserError, get_tool_parser, tool_parser_names
from inferd.entrypoints.parsers.tools.common import Scan, scan_balanced


def extract(parser: str, text: str):
    result = get_tool_parser(parser)().extract(text)
    assert result.tools_called == bool(result.tool_calls)
    calls = [(c.name, json.loads(c.arguments)) for c in result.tool_calls]
    return calls, result.content


def test_registry_lists_valid_names_on_unknown():
    assert {"hermes", "llama3_json", "mistral", "pythonic"} <= set(tool_parser_names())
    with pytest.raises(KeyError) as err:
        get_tool_parser("hermes2")
    assert isinstance(err.value, UnknownParserError)
    assert "hermes, llama3_json" in str(err.value)


# --- hermes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, calls, content", [
    ("Just text.", [], "Just text."),
    ("", [], None),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     [("get_weather", {"city": "Paris"})], None),
    ('Checking.\n<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
     '<tool_call>{"name": "b", "arguments": {}}</tool_call>\n',
     [("a", {"x": 1}), ("b", {})], "Checking.\n"),
    ('<tool_call>{"name": "a", "arguments": {}}</tool_call>\nDone.', [("a", {})], "\nDone."),
    ('<tool_call>{"name": "a"}</tool_call>', [("a", {})], None),  # no arguments: {}
    ('<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>', [("a", {"x": 1})], None),
    # Unclosed at the end of the output, but complete JSON: still a call.
    ('<tool_call>{"name": "a", "arguments": {"x": "東京"}}', [("a", {"x": "東京"})], None),
])
def test_hermes(text, calls, content):
    assert extract("hermes", text) == (calls, content)


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris",}}\n</tool_call>',  # trailing comma
    "<tool_call>{'name': 'a', 'arguments': {}}</tool_call>",                               # not JSON
    '<tool_call>{"arguments": {}}</tool_call>',                                            # no name
    '<tool_call>{"name": "a", "arguments": [1, 2]}</tool_call>',                           # not an object
    '<tool_call>{"name": "a", "arguments": {"x": NaN}}</tool_call>',                       # not strict JSON
    '<tool_call>{"name": "search", "arguments": {"q": "cut off',                            # truncated
])
def test_hermes_malformed_degrades_to_content(text):
    assert extract("hermes", text) == ([], text)


def test_hermes_malformed_block_keeps_the_valid_ones():
    bad = '<tool_call>{"name": oops}</tool_call>'
    calls, content = extract("hermes", bad + '<tool_call>{"name": "ok", "arguments": {}}</tool_call>')
    assert calls == [("ok", {})] and content == bad


def test_arguments_keep_unicode_unescaped():
    result = get_tool_parser("hermes")().extract(
        '<tool_call>{"name": "t", "arguments": {"city": "São Paulo 🌧"}}</tool_call>')
    assert result.tool_calls[0].arguments == '{"city": "São Paulo 🌧"}'


def test_ids_are_unique_and_shaped():
    result = get_tool_parser("hermes")().extract('<tool_call>{"name": "a"}</tool_call>' * 5)
    ids = [c.id for c in result.tool_calls]
    assert len(set(ids)) == 5 and all(re.fullmatch(r"chatcmpl-tool-[0-9a-f]{32}", i) for i in ids)
    assert all(c.type == "function" for c in result.tool_calls)


# --- llama3_json ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, calls, content", [
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
     [("get_weather", {"city": "Paris"})], None),
    ('  {"name": "f", "arguments": {"x": [1, {"y": null}]}}', [("f", {"x": [1, {"y": None}]})], None),
    ('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"k": "v"}}',
     [("a", {}), ("b", {"k": "v"})], None),
    ('Let me check.<|python_tag|>{"name": "a", "parameters": {}}', [("a", {})], "Let me check."),
    ('{"name": "a", "parameters": {}}\n\nCalled it.', [("a", {})], "\n\nCalled it."),
    # A bare `{` only opens a call at the start: JSON quoted in prose stays prose.
    ('Use {"name": "a", "parameters": {}} like this.', [], 'Use {"name": "a", "parameters": {}} like this.'),
    ('{"answer": 42}', [], '{"answer": 42}'),  # JSON that is not a call
    ("<|python_tag|>{'name': 'a'}", [], "<|python_tag|>{'name': 'a'}"),
    ('{"name": "a", "parameters": {"x": 1', [], '{"name": "a", "parameters": {"x": 1'),
    # After a bad object the rest is content, even a valid call.
    ('{"name": "a", "parameters": {}}; {"oops": 1}; {"name": "b"}', [("a", {})],
     '; {"oops": 1}; {"name": "b"}'),
])
def test_llama3_json(text, calls, content):
    assert extract("llama3_json", text) == (calls, content)


# --- mistral --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, calls, content", [
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', [("get_weather", {"city": "Paris"})], None),
    ('[TOOL_CALLS]a[ARGS]{"x": 1}[TOOL_CALLS]b[ARGS]{}', [("a", {"x": 1}), ("b", {})], None),
    ('[TOOL_CALLS]a{"x": 1}', [("a", {"x": 1})], None),  # [ARGS] dropped by some HF tokenizers
    ('[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]',
     [("a", {"x": 1}), ("b", {})], None),
    ('Sure, checking.[TOOL_CALLS]a[ARGS]{}', [("a", {})], "Sure, checking."),
    ("No calls here.", [], "No calls here."),
    ('[TOOL_CALLS] [{"name": "a", "arguments": {}},]', [], '[TOOL_CALLS] [{"name": "a", "arguments": {}},]'),
    ('[TOOL_CALLS]a[ARGS]{"x": "cut', [], '[TOOL_CALLS]a[ARGS]{"x": "cut'),
    ("[TOOL_CALLS] is a token I print.", [], "[TOOL_CALLS] is a token I print."),
])
def test_mistral(text, calls, content):
    assert extract("mistral", text) == (calls, content)


def test_mistral_ids_are_nine_alphanumerics():
    result = get_tool_parser("mistral")().extract("[TOOL_CALLS]a[ARGS]{}[TOOL_CALLS]b[ARGS]{}")
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", c.id) for c in result.tool_calls)


# --- pythonic -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, calls, content", [
    ("[get_weather(city='SF')]", [("get_weather", {"city": "SF"})], None),
    ("[get_weather(city='SF'), f(x=1)]", [("get_weather", {"city": "SF"}), ("f", {"x": 1})], None),
    ("[f(a=-1, b=+2.5, c=True, d=None, e=[1, (2, 3)], g={'k': \"v\"})]",
     [("f", {"a": -1, "b": 2.5, "c": True, "d": None, "e": [1, [2, 3]], "g": {"k": "v"}})], None),
    ("[f()]", [("f", {})], None),
    ("\n[f(s='a ] b ) c')] done", [("f", {"s": "a ] b ) c"})], " done"),
    ("Sure: [f(x=1)]", [], "Sure: [f(x=1)]"),  # the list must open the output
    ("[1, 2, 3] are numbers.", [], "[1, 2, 3] are numbers."),
    ("[f(1)]", [], "[f(1)]"),  # positional arguments have no name
])
def test_pythonic(text, calls, content):
    assert extract("pythonic", text) == (calls, content)


@pytest.mark.parametrize("text", [
    "[f(x=__import__('os').system('echo pwned'))]",  # a call in an argument: never evaluated
    "[f(x=open)]",                                   # a name
    "[f(x=1 + 2)]",                                  # an operator
    "[f(x={1, 2})]",                                 # a set has no JSON form
    "[f(x=b'raw')]",                                 # bytes neither
    "[f(x=1e999)]",                                  # infinity neither
    "[f(**kwargs)]",
    "[os.system(cmd='ls')]",                         # only plain function names
    "[f(x=1]",                                       # brackets do not match
    "[f(x=1), g(",                                   # cut off
])
def test_pythonic_rejects_anything_but_literals(text):
    assert extract("pythonic", text) == ([], text)


# --- the shared scanner ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, python, expected", [
    ('{"a": "}"} tail', False, (Scan.BALANCED, 10)),
    ('{"a": "\\"}"}', False, (Scan.BALANCED, 12)),
    ('{"a": [1, 2}', False, (Scan.MISMATCH, 12)),
    ('{"a": "unterminated', False, (Scan.INCOMPLETE, 19)),
    ('{"a": "ends in \\', False, (Scan.INCOMPLETE, 16)),
    ("[f(s=')]')]", True, (Scan.BALANCED, 11)),
])
def test_scan_balanced(text, python, expected):
    assert scan_balanced(text, 0, python=python) == expected
