"""`ChatOutputParser`: reasoning first, tool calls from the content part only (reference §3.3)."""
from __future__ import annotations

import json

import pytest

from inferd.entrypoints.parsers import ChatOutputParser, UnknownParserError

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>'


def make(reasoning, tool, *, tools_enabled=True, kwargs=None, prompt_text=None) -> ChatOutputParser:
    return ChatOutputParser(reasoning, tool, chat_template_kwargs=kwargs, tools_enabled=tools_enabled,
                            prompt_text=prompt_text)


def test_reasoning_then_tool_call_from_content():
    parsed = make("deepseek_r1", "hermes").parse_full(
        "<think>\nI need the weather tool.\n</think>\n\n" + CALL)
    assert parsed.reasoning == "\nI need the weather tool.\n"
    assert parsed.content is None  # only whitespace beside the call
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("get_weather", {"city": "Tokyo"})]
    assert parsed.tools_called


def test_tool_call_inside_reasoning_is_not_a_call():
    parsed = make("deepseek_r1", "hermes").parse_full(f"<think>Maybe {CALL}? No.</think>It is sunny.")
    assert parsed.tool_calls == [] and parsed.content == "It is sunny."
    assert CALL in parsed.reasoning


def test_truncated_reasoning_has_no_content_and_no_calls():
    parsed = make("deepseek_r1", "hermes").parse_full("<think>I should call get_weather, then")
    assert (parsed.reasoning, parsed.content, parsed.tool_calls) == ("I should call get_weather, then", None, [])


def test_qwen3_implicit_reasoning_end_feeds_the_tool_parser():
    parsed = make("qwen3", "hermes").parse_full("<think>Weather first.\n" + CALL)
    assert parsed.reasoning == "Weather first.\n"
    assert [c.name for c in parsed.tool_calls] == ["get_weather"]


def test_qwen3_thinking_disabled_parses_calls_from_everything():
    parsed = make("qwen3", "hermes", kwargs={"enable_thinking": False}).parse_full("Sure. " + CALL)
    assert parsed.reasoning is None and parsed.content == "Sure. " and len(parsed.tool_calls) == 1


def test_tools_not_enabled_means_no_tool_parsing():
    parsed = make(None, "hermes", tools_enabled=False).parse_full(CALL)
    assert parsed.content == CALL and parsed.tool_calls == []


def test_no_parsers_is_plain_content():
    parser = make(None, None)
    assert parser.parse_full("").content is None
    assert parser.parse_full("hi").content == "hi"
    assert parser.feed("hi").content == "hi" and parser.finish().is_empty


def test_streaming_emits_call_with_id_type_name_and_arguments():
    parser = make("deepseek_r1", "hermes")
    deltas = [parser.feed(piece) for piece in ["<think>tool", "</think>\n\n", CALL[:20], CALL[20:]]]
    deltas.append(parser.finish())
    assert deltas[0].reasoning == "tool" and deltas[1].is_empty and deltas[2].is_empty
    (call,) = deltas[3].tool_calls
    assert (call.index, call.type, call.name) == (0, "function", "get_weather")
    assert call.id.startswith("chatcmpl-tool-") and json.loads(call.arguments) == {"city": "Tokyo"}
    assert parser.tools_called and deltas[4].is_empty


def test_streaming_holds_back_a_possible_tag_then_releases_it():
    parser = make(None, "hermes")
    assert parser.feed("a <tool").content == "a "
    assert parser.feed("box> b").content == "<toolbox> b"


def test_unknown_parser_names_raise_listing_valid_ones():
    with pytest.raises(UnknownParserError, match="deepseek_r1"):
        make("nope", None)
    with pytest.raises(UnknownParserError, match="hermes"):
        make(None, "nope")
