"""Structured outputs that start after reasoning (`StructuredOutputsParams.start_after`, set by
the server when a reasoning parser is active): the grammar leaves tokens alone until the marker
has been generated, then constrains the rest. A logit_bias stands in for a model that thinks:
it makes the tiny random model write the marker token first, every time."""
from __future__ import annotations

import pytest

from inferd import LLM, SamplingParams
from inferd.sampling_params import StructuredOutputsParams


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="64MiB")


@pytest.fixture(scope="module")
def marker(llm) -> int:
    return llm.get_tokenizer().encode(" hello", add_special_tokens=False)[0]


def run(llm: LLM, marker: int, start_after: list[int] | None, max_tokens: int = 24):
    so = StructuredOutputsParams(choice=["yes", "no"], start_after=start_after)
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, logit_bias={marker: 100.0},
                        structured_outputs=so)
    return llm.generate([{"prompt_token_ids": [1, 2, 3, 4, 5]}], sp)[0].outputs[0]


def answer(llm: LLM, ids: list[int]) -> str:
    return llm.get_tokenizer().decode(ids, skip_special_tokens=True)


def test_grammar_from_the_first_token_overrides_the_bias(llm, marker):
    out = run(llm, marker, None)
    assert marker not in out.token_ids
    assert out.text in ("yes", "no") and out.finish_reason == "stop"


@pytest.mark.parametrize("length", [1, 2])
def test_grammar_engages_after_the_marker(llm, marker, length):
    out = run(llm, marker, [marker] * length)
    # free until the marker (the bias wins), constrained after it (the bias loses)
    assert out.token_ids[:length] == [marker] * length
    assert marker not in out.token_ids[length:]
    assert answer(llm, out.token_ids[length:]) in ("yes", "no")
    assert out.finish_reason == "stop"


def test_marker_never_generated_leaves_output_unconstrained(llm, marker):
    other = marker + 1
    out = run(llm, marker, [other], max_tokens=8)
    assert out.token_ids == [marker] * 8 and out.finish_reason == "length"
