"""Request schemas → SamplingParams, bounds and cross-field rules, tool choice, SSE helpers.

Pure functions on the HTTP side: no engine or server (the e2e tests cover those paths over HTTP).
"""
from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import ValidationError

from inferd.entrypoints.openai.chat.schemas import ChatCompletionRequest
from inferd.entrypoints.openai.chat.tools import ForcedToolCalls, forced_constraint, tool_mode
from inferd.entrypoints.openai.common import ModelLimits, check_prompt_ids, completion_logprobs, \
    chat_logprobs, resolve_max_tokens, truncate_prompt, TokenText
from inferd.entrypoints.openai.completions.schemas import CompletionRequest
from inferd.entrypoints.openai.errors import BadRequest
from inferd.entrypoints.openai.state import ServerConfig
from inferd.entrypoints.openai.streaming import merge_async_iterators, prime, sse_event, sse_lines
from inferd.outputs import Logprob
from inferd.sampling_params import OutputKind

LIMITS = ModelLimits(max_model_len=100, vocab_size=1000, max_logprobs=20,
                     defaults={"temperature": 0.7, "top_k": 20}, report_cached_tokens=True)


class _Tok:
    """The two tokenizer calls the conversion makes, on a toy vocabulary (one token per char)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % 1000 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def completion_params(prompt_len: int = 10, **fields):
    req = CompletionRequest(prompt="x", **fields)
    req.check(LIMITS)
    return req.to_sampling_params(prompt_len, LIMITS, _Tok(), req.structured_params())


def chat_params(prompt_len: int = 10, **fields):
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)
    req.check(LIMITS)
    return req.to_sampling_params(prompt_len, LIMITS, _Tok(), req.structured_params())


# --- conversion ---------------------------------------------------------------------------------
def test_defaults_come_from_generation_config():
    p = completion_params()
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens) == (0.7, 20, 1.0, 16)
    assert p.output_kind == OutputKind.FINAL_ONLY
    p = completion_params(temperature=0.0, top_k=5, stream=True)
    assert p.temperature == 0.0 and p.top_k == 0  # greedy resets the truncation knobs
    assert p.output_kind == OutputKind.DELTA


def test_chat_max_tokens_defaults_to_the_rest_of_the_context():
    assert chat_params(prompt_len=30).max_tokens == 70
    assert chat_params(prompt_len=30, max_completion_tokens=5, max_tokens=9).max_tokens == 5
    capped = ModelLimits(100, 1000, 20, {"max_tokens": 8}, False)
    assert resolve_max_tokens(None, 30, capped) == 8


def test_logprobs_mapping():
    assert completion_params(logprobs=3).logprobs == 3
    assert completion_params(logprobs=2, echo=True).prompt_logprobs == 2
    assert chat_params(logprobs=True).logprobs == 0
    assert chat_params(logprobs=True, top_logprobs=4).logprobs == 4
    assert chat_params().logprobs is None


def test_sampling_extras_pass_through():
    p = completion_params(stop="###", stop_token_ids=[5], ignore_eos=True, min_tokens=2, seed=-1,
                          logit_bias={"7": 500.0, "8": -3}, bad_words=["ab"],
                          allowed_token_ids=[1, 2], skip_special_tokens=False)
    assert p.stop == ["###"] and p.stop_token_ids == [5] and p.ignore_eos and p.min_tokens == 2
    assert p.seed is None  # -1 means no seed
    assert p.logit_bias == {7: 100.0, 8: -3.0}  # clamped to ±100
    assert p.bad_words_token_ids == [[97, 98], [32, 97, 98]]
    assert p.allowed_token_ids == [1, 2] and not p.skip_special_tokens


def test_null_means_the_default_for_fields_that_have_no_none():
    """The openai SDK sends `n=None` as null; OpenAI's schema and vLLM accept it."""
    nulls = dict(n=None, echo=None, min_tokens=None, ignore_eos=None, use_beam_search=None,
                 skip_special_tokens=None, include_stop_str_in_output=None, temperature=None)
    p = completion_params(**nulls)
    assert (p.n, p.min_tokens, p.ignore_eos, p.skip_special_tokens) == (1, 0, False, True)
    assert p.temperature == 0.7  # None where None is a value: the generation-config default
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], n=None,
                                 echo=None, add_generation_prompt=None)
    assert (chat.n, chat.echo, chat.add_generation_prompt) == (1, False, True)
    with pytest.raises(ValidationError):  # a required field is still required
        ChatCompletionRequest(messages=None)


def test_unknown_fields_are_ignored_and_int64_seed_accepted():
    req = CompletionRequest(prompt="x", best_of=3, guided_json={}, seed=2**63 - 1)
    assert req.seed == 2**63 - 1
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="x", seed=2**63)


# --- bounds -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, param", [
    ({"temperature": 2.5}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"stop": [""]}, "stop"), ({"stop": ["x"] * 65}, "stop"), ({"stop": ["x" * 2000]}, "stop"),
    ({"logit_bias": {"1000": 1}}, "logit_bias"), ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"), ({"stop_token_ids": [1000]}, "stop_token_ids"),
    ({"allowed_token_ids": [5000]}, "allowed_token_ids"), ({"min_tokens": 20}, "min_tokens"),
    ({"logprobs": 21}, "logprobs"), ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"), ({"max_tokens": 95}, "input_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"cache_salt": ""}, "cache_salt"), ({"suffix": "x"}, "suffix"), ({"priority": 1}, "priority"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
])
def test_completion_bounds(fields, param):
    with pytest.raises(BadRequest) as info:
        completion_params(**fields)
    assert info.value.param == param and info.value.status == 400


def test_context_length_message():
    with pytest.raises(BadRequest) as info:
        resolve_max_tokens(50, 60, LIMITS)
    assert info.value.message.startswith("This model's maximum context length is 100 tokens. "
                                         "However, you requested 50 output tokens and your prompt "
                                         "contains 60 input tokens, for a total of 110 tokens.")
    with pytest.raises(BadRequest):
        resolve_max_tokens(None, 100, LIMITS)  # nothing left to generate


@pytest.mark.parametrize("fields", [
    {"n": 0}, {"n": 129}, {"seed": -(2**63) - 1}, {"prompt": None}, {"truncate_prompt_tokens": -2},
    {"stop": 5}, {"logit_bias": {"1": "x"}},
])
def test_completion_schema_rejects(fields):
    with pytest.raises(ValidationError):
        CompletionRequest(**{"prompt": "x", **fields})


def test_prompt_shapes_and_checks():
    assert CompletionRequest(prompt="a").prompt_list() == ["a"]
    assert CompletionRequest(prompt=[1, 2]).prompt_list() == [[1, 2]]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompt_list() == [[1], [2, 3]]
    assert CompletionRequest(prompt=["a", "b"]).prompt_list() == ["a", "b"]
    for empty in ("", [], [[]], ["a", ""]):
        with pytest.raises(BadRequest, match="Either prompt or prompt_embeds"):
            CompletionRequest(prompt=empty).check(LIMITS)
    with pytest.raises(BadRequest, match="Token id 1000 is out of vocabulary"):
        check_prompt_ids([1, 1000], LIMITS)
    with pytest.raises(BadRequest, match="out of vocabulary"):
        check_prompt_ids([-1], LIMITS)
    assert truncate_prompt([1, 2, 3], 2, LIMITS) == [2, 3]
    with pytest.raises(BadRequest):
        truncate_prompt([1], 101, LIMITS)


def test_chat_logprob_rules():
    with pytest.raises(BadRequest, match="`logprobs` must be set to true"):
        chat_params(top_logprobs=2)
    with pytest.raises(BadRequest):
        chat_params(logprobs=True, top_logprobs=21)
    assert chat_params(logprobs=False, top_logprobs=0).logprobs is None
    with pytest.raises(BadRequest):
        chat_params(reasoning_effort="extreme")
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[])


# --- tools --------------------------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "a", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "b"}}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)


def test_tool_modes_and_errors():
    plain = ServerConfig()
    auto = ServerConfig(enable_auto_tool_choice=True, tool_call_parser="hermes")
    assert tool_mode(chat(), plain) == "none"
    assert tool_mode(chat(tools=TOOLS, tool_choice="none"), plain) == "none"
    assert tool_mode(chat(tools=TOOLS), auto) == "auto"
    assert tool_mode(chat(tools=TOOLS, tool_choice="required"), auto) == "required"
    named = {"type": "function", "function": {"name": "b"}}
    assert tool_mode(chat(tools=TOOLS, tool_choice=named), plain) == "named"
    cases = [(chat(tools=TOOLS), plain, '"auto" tool choice requires --enable-auto-tool-choice'),
             (chat(tools=TOOLS, tool_choice="required"), plain, "requires --tool-call-parser"),
             (chat(tool_choice="auto"), auto, "tools must be set"),
             (chat(tools=[]), auto, "must not be an empty array"),
             (chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "zz"}}), auto,
              "has not been passed")]
    for req, config, message in cases:
        with pytest.raises(BadRequest, match=message):
            tool_mode(req, config)


def test_forced_constraints():
    named = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "a"}})
    assert forced_constraint(named, "named").json == TOOLS[0]["function"]["parameters"]
    req = chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    schema = forced_constraint(req, "required").json
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    names = [alt["properties"]["name"]["enum"] for alt in schema["items"]["anyOf"]]
    assert names == [["a"], ["b"]]
    assert forced_constraint(chat(), "none") is None


def _feed_all(mode, text, cuts, name=None):
    forced = ForcedToolCalls(mode, name)
    deltas, pos = [], 0
    for cut in cuts + [len(text)]:
        deltas += forced.feed(text[pos:cut])
        pos = cut
    return forced, deltas


@pytest.mark.parametrize("cuts", [[], [1, 2, 3, 10, 11, 30], list(range(1, 80))])
def test_required_calls_stream_equals_whole(cuts):
    text = '[{"name": "a", "parameters": {"x": 1}}, {"name":"b","parameters":{"s":"}]\\""}}]'
    forced, deltas = _feed_all("required", text, cuts)
    assert [(c.name, json.loads(c.arguments)) for c in forced.calls] == \
        [("a", {"x": 1}), ("b", {"s": '}]"'})]
    assert [(d.index, d.name, d.arguments) for d in deltas] == \
        [(i, c.name, c.arguments) for i, c in enumerate(forced.calls)]
    assert len({c.id for c in forced.calls}) == 2
    assert forced.calls[0].id.startswith("chatcmpl-tool-")


def test_required_truncated_output_has_no_half_call():
    forced, _ = _feed_all("required", '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "par',
                          [5])
    assert [c.name for c in forced.calls] == ["a"]


def test_named_streams_argument_fragments():
    forced, deltas = _feed_all("named", '{"x": 12}', [2, 5], name="a")
    assert deltas[0].name == "a" and deltas[0].id == forced.calls[0].id
    assert "".join(d.arguments for d in deltas) == forced.calls[0].arguments == '{"x": 12}'
    assert all(d.id is None for d in deltas[1:])


# --- logprobs shapes ----------------------------------------------------------------------------
def test_logprob_shapes():
    pos = {5: Logprob(-0.5, 2, "b"), 4: Logprob(-0.1, 1, "a"), 6: Logprob(float("-inf"), 3, "c")}
    text = TokenText(_Tok(), as_ids=False)
    out, end = completion_logprobs([9, 5], [None, pos], text, offset=3)
    assert out["token_logprobs"] == [None, -0.5] and out["tokens"] == ["\t", "b"]
    assert out["text_offset"] == [3, 4] and end == 5
    assert out["top_logprobs"] == [None, {"b": -0.5, "a": -0.1, "c": -9999.0}]
    content = chat_logprobs([5], [pos], 2, text)
    assert content[0]["token"] == "b" and content[0]["bytes"] == [98]
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["a", "b"]  # by rank
    assert chat_logprobs([5], [pos], 0, TokenText(_Tok(), as_ids=True))[0] == \
        {"token": "token_id:5", "logprob": -0.5, "bytes": list(b"token_id:5"), "top_logprobs": []}


# --- SSE and merging ----------------------------------------------------------------------------
def test_sse_framing_and_in_band_errors():
    async def events():
        yield {"a": "é"}
        raise BadRequest("boom", param="x")

    async def collect():
        return [line async for line in sse_lines(events(), "req-1")]

    lines = asyncio.run(collect())
    assert lines[0] == sse_event({"a": "é"}) == 'data: {"a":"é"}\n\n'
    assert json.loads(lines[1][len("data: "):]) == \
        {"error": {"message": "boom", "type": "BadRequestError", "param": "x", "code": 400}}
    assert lines[2] == "data: [DONE]\n\n"


def test_merge_cancels_every_source_when_the_consumer_stops():
    closed = []

    async def source(name, n):
        try:
            for i in range(n):
                await asyncio.sleep(0.001)
                yield f"{name}{i}"
            await asyncio.sleep(10)
        finally:
            closed.append(name)

    async def run():
        merged = merge_async_iterators([source("a", 2), source("b", 3)])
        got = []
        async for i, item in merged:
            got.append((i, item))
            if len(got) == 5:
                break
        await merged.aclose()
        return got

    got = asyncio.run(run())
    assert sorted(got) == [(0, "a0"), (0, "a1"), (1, "b0"), (1, "b1"), (1, "b2")]
    assert sorted(closed) == ["a", "b"]


def test_prime_raises_before_the_stream_and_keeps_the_first_item():
    async def failing():
        raise BadRequest("refused")
        yield  # pragma: no cover

    async def fine():
        for i in range(3):
            yield i

    async def run():
        with pytest.raises(BadRequest):
            await prime(failing())
        return [x async for x in await prime(fine())]

    assert asyncio.run(run()) == [0, 1, 2]


@pytest.mark.parametrize("make, fields, param, message", [
    (chat_params, {"max_tokens": 0}, "max_tokens", "max_tokens must be at least 1, got 0."),
    (chat_params, {"max_tokens": -1}, "max_tokens", "max_tokens must be at least 1, got -1."),
    (chat_params, {"max_completion_tokens": 0, "max_tokens": 5}, "max_completion_tokens",
     "max_completion_tokens must be at least 1, got 0."),
    (completion_params, {"max_tokens": 0}, "max_tokens", "max_tokens must be at least 1, got 0."),
    (completion_params, {"max_tokens": -1}, "max_tokens", "max_tokens must be at least 1, got -1."),
    (completion_params, {"max_tokens": -1, "echo": True}, "max_tokens",
     "max_tokens must be at least 0, got -1."),
])
def test_output_budget_bounds_name_the_field_sent(make, fields, param, message):
    with pytest.raises(BadRequest) as info:
        make(**fields)
    assert info.value.param == param and str(info.value) == message
