"""Reasoning parsers on the cases of reference §3.3 (non-streaming and streaming by hand)."""
from __future__ import annotations

import pytest

from inferd.entrypoints.parsers import UnknownParserError, get_reasoning_parser, reasoning_parser_names
from inferd.entrypoints.parsers.reasoning import ReasoningSplit
from inferd.entrypoints.parsers.reasoning.qwen3 import PromptThinkState, prompt_think_state
from inferd.entrypoints.parsers.types import DeltaMessage


def make(name: str, **kwargs):
    return get_reasoning_parser(name)(**kwargs)


def test_registry_lists_valid_names_on_unknown():
    assert {"deepseek_r1", "qwen3"} <= set(reasoning_parser_names())
    with pytest.raises(KeyError) as err:
        get_reasoning_parser("deepseek_r2")
    assert isinstance(err.value, UnknownParserError)
    assert "deepseek_r1" in str(err.value) and "qwen3" in str(err.value)


@pytest.mark.parametrize("text, expected", [
    ("<think>Let me think.</think>The answer is 4.", ("Let me think.", "The answer is 4.")),
    # The template put <think> in the prompt: the output has only the closing tag.
    ("Let me think.</think>The answer is 4.", ("Let me think.", "The answer is 4.")),
    ("\n<think>\nhmm\n</think>\n\nFour.", ("\nhmm\n", "\n\nFour.")),
    ("<think>Only thinking.</think>", ("Only thinking.", None)),  # empty content -> None
    ("<think></think>Just the answer.", (None, "Just the answer.")),
    # </think> never appears (also: cut off by max_tokens): all reasoning, content None.
    ("<think>Still thinking about", ("Still thinking about", None)),
    ("No tags at all.", ("No tags at all.", None)),
    ("<think>a</think>b</think>c", ("a", "b</think>c")),  # only the first </think> splits
    ("Before <think>mid</think>after", ("Before <think>mid", "after")),  # only a leading <think> is stripped
    ("", (None, None)),
])
def test_deepseek_r1_extract(text, expected):
    assert make("deepseek_r1").extract(text) == ReasoningSplit(*expected)


@pytest.mark.parametrize("kwargs, text, expected", [
    ({}, "<think>Let me think.</think>The answer is 4.", ("Let me think.", "The answer is 4.")),
    ({}, "Let me think.</think>The answer is 4.", ("Let me think.", "The answer is 4.")),
    # No </think>: without enable_thinking=false and without a prompt, assume truncated thinking.
    ({}, "<think>Still thinking about", ("Still thinking about", None)),
    ({}, "Plain words", ("Plain words", None)),
    # enable_thinking=false: everything is content, tags and all.
    ({"chat_template_kwargs": {"enable_thinking": False}}, "Hello there.", (None, "Hello there.")),
    ({"chat_template_kwargs": {"enable_thinking": False}}, "<think>x</think>y", (None, "<think>x</think>y")),
    ({"chat_template_kwargs": {"enable_thinking": True}}, "<think>x</think>y", ("x", "y")),
    # A bare <tool_call> with no </think> anywhere ends reasoning implicitly.
    ({}, '<think>Need weather.\n<tool_call>\n{"name": "f"}\n</tool_call>',
     ("Need weather.\n", '<tool_call>\n{"name": "f"}\n</tool_call>')),
    # ... but not when a </think> follows it: then it was part of the reasoning.
    ({}, "<think>a <tool_call> b</think>c", ("a <tool_call> b", "c")),
])
def test_qwen3_extract(kwargs, text, expected):
    assert make("qwen3", **kwargs).extract(text) == ReasoningSplit(*expected)


PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("prompt, state", [
    (None, PromptThinkState.UNKNOWN),
    (PROMPT, PromptThinkState.NONE),
    (PROMPT + "<think>\n", PromptThinkState.OPEN),
    (PROMPT + "<think>\n\n</think>\n\n", PromptThinkState.CLOSED),
    # An earlier turn's complete block says nothing about this turn.
    ("<think>old</think>answer<|im_end|>\n" + PROMPT, PromptThinkState.NONE),
    # continue_final_message: an assistant prefill that opened reasoning and is mid-thought
    (PROMPT + "<think>\nLet me add", PromptThinkState.OPEN),
    ("<think>old</think>answer<|im_end|>\n" + PROMPT + "<think>\nso", PromptThinkState.OPEN),
])
def test_qwen3_prompt_state(prompt, state):
    assert prompt_think_state(prompt) is state


@pytest.mark.parametrize("prompt, text, expected", [
    (PROMPT, "Hello!", (None, "Hello!")),  # the model did not open <think>: content
    (PROMPT, "<think>hm</think>Hello!", ("hm", "Hello!")),
    (PROMPT, "<think>cut off while", ("cut off while", None)),
    (PROMPT + "<think>\n", "hm</think>Hello!", ("hm", "Hello!")),
    (PROMPT + "<think>\n", "cut off while", ("cut off while", None)),
    (PROMPT + "<think>\n\n</think>\n\n", "Hello!", (None, "Hello!")),  # thinking disabled in the prompt
])
def test_qwen3_uses_prompt(prompt, text, expected):
    assert make("qwen3", prompt_text=prompt).extract(text) == ReasoningSplit(*expected)


def feed_all(parser, deltas):
    return [parser.feed(d) for d in deltas] + [parser.finish()]


def test_deepseek_r1_streaming_tag_only_deltas_produce_nothing():
    parser = make("deepseek_r1")
    out = feed_all(parser, ["<think>", "Let me", " think.", "</think>", "Four", "."])
    assert out[0].is_empty and out[3].is_empty
    assert [d.reasoning for d in out] == [None, "Let me", " think.", None, None, None, None]
    assert [d.content for d in out] == [None, None, None, None, "Four", ".", None]
    assert parser.reasoning_ended


def test_deepseek_r1_streaming_splits_a_delta_at_end_tag():
    parser = make("deepseek_r1")
    first = parser.feed("thinking</think>answer")
    assert (first.reasoning, first.content) == ("thinking", "answer")


def test_streaming_holds_back_a_split_tag():
    parser = make("deepseek_r1")
    assert parser.feed("abc</thi") == DeltaMessage(reasoning="abc")
    assert parser.feed("nk>xyz") == DeltaMessage(content="xyz")


def test_deepseek_r1_streaming_truncated_flushes_held_text_as_reasoning():
    parser = make("deepseek_r1")
    out = feed_all(parser, ["<think>cut", " off </th"])
    assert "".join(d.reasoning or "" for d in out) == "cut off </th"
    assert all(d.content is None for d in out)
    assert not parser.reasoning_ended


def test_qwen3_streaming_holds_implicit_end_until_known():
    parser = make("qwen3")
    assert parser.feed("<think>Need weather.\n<tool_call>") == DeltaMessage(reasoning="Need weather.\n")
    assert parser.feed('{"name": "f"}').is_empty  # a </think> may still come
    assert parser.finish() == DeltaMessage(content='<tool_call>{"name": "f"}')


def test_qwen3_streaming_thinking_disabled_is_all_content():
    parser = make("qwen3", chat_template_kwargs={"enable_thinking": False})
    assert parser.reasoning_ended
    assert parser.feed("<think>") == DeltaMessage(content="<think>")


@pytest.mark.parametrize("name, kwargs, marker", [
    ("deepseek_r1", {}, "</think>"),  # R1 always thinks first (a missing </think>: all reasoning)
    ("deepseek_r1", {"prompt_text": "<|Assistant|><think>\n"}, "</think>"),
    ("qwen3", {"prompt_text": "<|im_start|>assistant\n<think>\n"}, "</think>"),
    ("qwen3", {}, "</think>"),  # unknown prompt: assume the template opened <think>
    # thinking off, or closed by the template: the answer starts at the first token
    ("qwen3", {"chat_template_kwargs": {"enable_thinking": False}}, None),
    ("qwen3", {"prompt_text": "<|im_start|>assistant\n<think>\n\n</think>\n\n"}, None),
    # the model would have to open <think> itself: a grammar from the start rules that out
    ("qwen3", {"prompt_text": "<|im_start|>assistant\n"}, None),
])
def test_grammar_start_marker(name, kwargs, marker):
    """Where a structured output's grammar starts: after the reasoning, wherever there is one."""
    assert make(name, **kwargs).grammar_start_marker() == marker
