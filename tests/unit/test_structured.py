"""Structured outputs: spec validation (400s), constrained decoding, the logits mask.

Decoding is checked with a "random decoder": random logits, the grammar's mask, pick the best
allowed token, accept it, repeat until the grammar terminates. Whatever the logits, the text
must then satisfy the constraint.
"""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch

pytest.importorskip("xgrammar")

from inferd.sampling_params import StructuredOutputsParams as P  # noqa: E402
from inferd.structured import (GrammarCompiler, GrammarManager, apply_bitmask,  # noqa: E402
                               build_spec, validate_structured_outputs)
from inferd.structured import spec as spec_mod  # noqa: E402

PAD = 64  # logits wider than the tokenizer, as with padded lm_heads


@pytest.fixture(scope="session")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="session")
def manager(tok):
    return GrammarManager(tok, len(tok) + PAD)


def random_decode(manager: GrammarManager, tok, params: P, seed: int, *, steps: int = 200,
                  prefer: tuple[str, ...] = (), prefer_after: int = 6) -> tuple[str, bool]:
    """Decode under the grammar from random logits; returns (text without stop token, done).

    `prefer` lists token texts that get a large bonus after `prefer_after` steps, so grammars
    with unbounded parts (free strings) still end within `steps`.
    """
    state = manager.new_state(params)
    gen = torch.Generator().manual_seed(seed)
    bitmask = manager.allocate_bitmask(1)
    # Byte-level BPE: ASCII punctuation tokens are spelled as themselves in the vocabulary.
    bonus_ids = [i for i in tok.convert_tokens_to_ids(list(prefer)) if i not in (None, tok.unk_token_id)]
    ids: list[int] = []
    for step in range(steps):
        if state.is_terminated():
            break
        logits = torch.randn(1, manager.vocab_size, generator=gen)
        if step >= prefer_after and bonus_ids:
            logits[0, bonus_ids] += 10.0
        state.fill_bitmask(bitmask, 0)
        apply_bitmask(logits, bitmask, [0])
        token = int(logits.argmax())
        assert torch.isfinite(logits[0, token]), "the mask allowed nothing"
        assert state.accept(token), f"grammar rejected its own allowed token {token}"
        ids.append(token)
    done = state.is_terminated()
    if done:
        assert ids[-1] == tok.eos_token_id
        ids = ids[:-1]
    return tok.decode(ids), done


# --- API-side validation: every bad spec is a ValueError naming the problem ------------------
@pytest.mark.parametrize("params, needle", [
    (P(json={"type": "foo"}), 'Invalid JSON schema: Unsupported type "foo"'),
    (P(json="{not json"), "Invalid JSON schema: not valid JSON"),
    (P(json="[1, 2]"), "Invalid JSON schema: must be a JSON object or boolean"),
    (P(json={"$ref": "#/defs/x"}), "Invalid JSON schema: Cannot find field"),
    (P(regex="(abc"), "Invalid regex: Regex parsing error at position 5"),
    (P(regex="a(?=b)"), "Invalid regex: Regex parsing error at position 4: Lookahead"),
    (P(regex=r"(a)\1"), "Backreference is not supported"),
    (P(grammar='root ::= foo'),
     'Invalid grammar: EBNF parser error at line 1, column 10: Rule "foo" is not defined'),
    (P(grammar='start ::= "a"'), 'The root rule with name "root" is not found'),
    (P(grammar='start: ("a"'), "Invalid grammar (read as Lark"),
    (P(grammar="   "), "grammar must not be empty"),
    (P(choice=[]), "choice must be a non-empty list"),
    (P(choice=["a", 1]), "Invalid choice: options must be strings"),
    (P(structural_tag='{"type": "structural_tag", "format": {"type": "nope"}}'),
     "Invalid structural tag: Format type not recognized: nope"),
    (P(structural_tag="{nope"), "Invalid structural tag: not valid JSON"),
    (P(structural_tag='{"structures": [{"begin": "<f>"}], "triggers": ["<f>"]}'),
     "Invalid structural tag: structures[0] needs"),
    (P(regex="a", choice=["a"]), "exactly one of"),
    (P(), "exactly one of"),
    (P(regex="a" * (spec_mod.MAX_REGEX_CHARS + 1)), "Invalid regex: 16385 characters exceeds the limit"),
    (P(choice=["x"] * (spec_mod.MAX_CHOICES + 1)), "Invalid choice: 1025 options exceeds the limit"),
    (P(json={"type": "string", "description": "x" * spec_mod.MAX_SCHEMA_CHARS}),
     "characters exceeds the limit of 131072"),
    (P(json={"type": "number", "default": float("nan")}), "Invalid JSON schema: not serialisable"),
])
def test_invalid_specs_are_value_errors(tok, params, needle):
    with pytest.raises(ValueError) as info:
        validate_structured_outputs(params, tok)
    msg = str(info.value)
    assert needle in msg
    assert "/project/cpp" not in msg and "Check failed" not in msg and "\n" not in msg
    assert type(info.value).__module__.startswith(("builtins", "inferd"))


@pytest.mark.parametrize("schema, needle", [
    ({"type": "object", "properties": {"a": {"not": {"const": 3}}}}, "'not' at #/properties/a"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "'uniqueItems' at #"),
    ({"type": "array", "contains": {"const": 7}}, "'contains' at #"),
    ({"if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}, "'if' at #"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "'dependentRequired' at #"),
    ({"$defs": {"x": {"type": "object", "dependencies": {"a": ["b"]}}}, "$ref": "#/$defs/x"},
     "'dependencies' at #/$defs/x"),
    ({"anyOf": [{"type": "integer"}, {"$ref": "https://example.com/s.json"}]},
     "is not a local reference"),
    ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, "allOf at # is supported only with one member"),
    ({"allOf": [{"properties": {"a": {"type": "integer"}}}, {"properties": {"a": {"type": "string"}}}]},
     "give property 'a' different schemas"),
])
def test_unenforceable_schema_keywords_are_refused(tok, schema, needle):
    """xgrammar compiles these but would not enforce them: the client gets a 400, not JSON the
    schema forbids."""
    with pytest.raises(ValueError, match="Invalid JSON schema") as info:
        validate_structured_outputs(P(json=schema), tok)
    assert needle in str(info.value)


def test_keyword_names_used_as_property_names_are_not_refused(tok):
    schema = {"type": "object", "properties": {"not": {"type": "string"}, "if": {"type": "integer"},
                                               "contains": {"type": "boolean"}},
              "required": ["not"], "uniqueItems": False}
    validate_structured_outputs(P(json=schema), tok)


def test_all_of_object_members_merge_into_one_enforced_object(tok):
    from xgrammar.testing import _is_grammar_accept_string as accepts

    schema = {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                        {"properties": {"b": {"type": "string"}}, "required": ["b"]}],
              "description": "both"}
    spec = build_spec(P(json=schema))
    merged = json.loads(spec.source)
    assert "allOf" not in merged and merged["required"] == ["a", "b"]
    assert list(merged["properties"]) == ["a", "b"] and "allOf" in schema  # caller's copy kept
    grammar = GrammarCompiler(tok).compile(spec).grammar
    assert accepts(grammar, '{"a": 1, "b": "x"}')
    assert not accepts(grammar, '{"a": 1}')  # before the merge xgrammar accepted this


def test_deeply_nested_schema_rejected_before_compiling(tok):
    schema: dict = {"type": "integer"}
    for _ in range(150):
        schema = {"type": "array", "items": schema}
    with pytest.raises(ValueError, match=r"Invalid JSON schema: nested \d+ levels deep, the limit is 128"):
        validate_structured_outputs(P(json=schema), tok)
    with pytest.raises(ValueError, match="Invalid JSON schema: nested deeper than"):
        validate_structured_outputs(P(json="[" * 5000 + "]" * 5000), tok)


@pytest.mark.parametrize("params", [
    P(json={"type": "object", "properties": {"a": {"type": "integer"}}}),
    P(json='{"type": "array", "items": {"type": "string"}}', disable_any_whitespace=True),
    P(json=True),
    P(json_object=True),
    P(regex=r"\d{3}-[A-Z]+"),
    P(regex=" "),
    P(choice=['a "quoted" one', "back\\slash", "new\nline\ttab\x00", "naïve ✓", ""]),
    P(grammar='root ::= "a" | "b" rest\nrest ::= [0-9]+'),
    P(grammar='start: "a" | "b" NUM\nNUM: /[0-9]+/'),
    P(structural_tag=json.dumps({"type": "structural_tag",
                                 "format": {"type": "const_string", "value": "hi"}})),
    P(structural_tag=json.dumps({"type": "structural_tag", "triggers": ["<f="],  # vLLM's legacy form
                                 "structures": [{"begin": "<f=get>", "end": "</f>",
                                                 "schema": {"type": "object"}}]})),
    P(json={"type": "object"}, whitespace_pattern=r"[ ]?"),  # accepted and ignored, as vLLM+xgrammar
])
def test_valid_specs_pass(tok, params):
    validate_structured_outputs(params, tok)


def test_disable_additional_properties_rewrites_only_object_schemas():
    schema = {"type": "object", "properties": {
        "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},
        "open": {"type": "object", "properties": {}, "additionalProperties": True}}}
    spec = build_spec(P(json=schema, disable_additional_properties=True))
    out = json.loads(spec.source)
    assert out["additionalProperties"] is False
    inner = out["properties"]["properties"]
    assert inner["additionalProperties"] is False and "additionalProperties" not in inner["properties"]
    assert out["properties"]["open"]["additionalProperties"] is True  # explicit choice kept
    assert "additionalProperties" not in schema  # the caller's dict is not modified


def test_specs_are_canonical_cache_keys():
    as_dict = build_spec(P(json={"type": "object", "properties": {"b": {}, "a": {}}}))
    as_text = build_spec(P(json='{ "type": "object", "properties": {"b": {}, "a": {}} }'))
    reordered = build_spec(P(json={"type": "object", "properties": {"a": {}, "b": {}}}))
    assert as_dict == as_text and hash(as_dict) == hash(as_text)
    assert as_dict != reordered  # property order is part of the grammar
    assert build_spec(P(json={}, disable_any_whitespace=True)) != build_spec(P(json={}))


# --- engine side: constrained random decoding --------------------------------------------------
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "enum": ["alice", "bob"]},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
    "required": ["name", "age", "ok", "tags"]}


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_decoding_matches_schema(manager, tok, seed):
    text, done = random_decode(manager, tok, P(json=PERSON, disable_any_whitespace=True), seed)
    assert done, text
    doc = json.loads(text)
    assert list(doc) == ["name", "age", "ok", "tags"]
    assert doc["name"] in ("alice", "bob")
    assert isinstance(doc["age"], int) and 0 <= doc["age"] <= 120
    assert isinstance(doc["ok"], bool)
    assert len(doc["tags"]) <= 3 and all(isinstance(t, bool) for t in doc["tags"])


@pytest.mark.parametrize("seed", range(3))
def test_json_object_decoding_parses(manager, tok, seed):
    text, done = random_decode(manager, tok, P(json_object=True, disable_any_whitespace=True), seed,
                               prefer=('"', "}", "]", '"}', '"]', ":"))
    assert done, text
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("seed", range(4))
def test_regex_decoding_fully_matches(manager, tok, seed):
    pattern = r"[a-z]{3}-\d{2,4}(\.[A-Z])?"
    text, done = random_decode(manager, tok, P(regex=pattern), seed)
    assert done and re.fullmatch(pattern, text), text


def test_choice_decoding_yields_one_choice(manager, tok):
    choices = ["yes", "no", "yes sir", 'say "hi"\\', "naïve ✓"]
    seen = set()
    for seed in range(8):
        text, done = random_decode(manager, tok, P(choice=choices), seed)
        assert done and text in choices, text
        seen.add(text)
    assert len(seen) > 1  # the mask allows every choice, not just the first


@pytest.mark.parametrize("grammar", [
    'root ::= greet " " name "!"\ngreet ::= "hello" | "hi"\nname ::= [a-z]{1,5}',
    'start: GREET " " NAME "!"\nGREET: "hello" | "hi"\nNAME: /[a-z]{1,5}/',  # Lark, as vLLM accepts
])
@pytest.mark.parametrize("seed", range(2))
def test_grammar_decoding_matches(manager, tok, grammar, seed):
    text, done = random_decode(manager, tok, P(grammar=grammar), seed)
    assert done and re.fullmatch(r"(hello|hi) [a-z]{1,5}!", text), text


# --- GrammarState: accept / reject / terminate -------------------------------------------------
def test_real_tokens_accepted_then_eos_terminates(manager, tok):
    state = manager.new_state(P(json=PERSON))  # any whitespace allowed
    doc = '{\n  "name": "bob",\n  "age": 42, "ok": true, "tags": [false, true]\n}'
    for t in tok.encode(doc, add_special_tokens=False):
        assert state.accept(t)
        assert not state.is_terminated()
    assert state.accept(tok.eos_token_id)
    assert state.is_terminated()


def test_rejected_tokens_return_false_and_leave_state_usable(manager, tok):
    state = manager.new_state(P(regex="abc"))
    x = tok.encode("x", add_special_tokens=False)[0]
    assert state.accept(x) is False
    assert state.accept(-1) is False
    assert state.accept(manager.vocab_size + 5) is False
    assert state.accept(len(tok) + 1) is False  # a padded id, past the tokenizer's vocabulary
    assert state.accept(tok.eos_token_id) is False  # not complete yet
    for t in tok.encode("abc", add_special_tokens=False):
        assert state.accept(t)
    assert state.accept(tok.eos_token_id) and state.is_terminated()
    assert state.accept(x) is False  # nothing after the end
    assert state.error is None


def test_fill_after_termination_allows_only_stop_tokens(manager, tok):
    state = manager.new_state(P(choice=["ok"]))
    for t in tok.encode("ok", add_special_tokens=False) + [tok.eos_token_id]:
        assert state.accept(t)
    bitmask = manager.allocate_bitmask(2)
    state.fill_bitmask(bitmask, 1)
    logits = torch.zeros(2, manager.vocab_size)
    apply_bitmask(logits, bitmask, [1])
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [tok.eos_token_id]


def test_invalid_spec_in_engine_raises_value_error(manager):
    with pytest.raises(ValueError, match="Invalid regex"):
        manager.new_state(P(regex="(unclosed"))


def test_compiled_grammars_are_cached(manager):
    spec = build_spec(P(regex=r"cache-me-[0-9]+"))
    first = manager.compiler.compile(spec)
    assert manager.compiler.compile(spec) is first
    manager.new_state(P(regex=r"cache-me-[0-9]+"))
    assert manager.compiler.compile(spec) is first


def test_slow_compile_times_out_then_lands_in_cache(tok):
    compiler = GrammarCompiler(tok, compile_timeout_s=0.001, max_threads=1)
    spec = build_spec(P(regex="[a-z]{300}"))  # ~0.3 s to compile here
    with pytest.raises(ValueError, match=r"Invalid regex: compiling it took longer than 0.001 s"):
        compiler.compile(spec)
    deadline = time.monotonic() + 60
    while compiler.cache_size() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert compiler.compile(spec) is not None  # the background compile's result was kept
    compiler.shutdown()


# --- apply_bitmask ----------------------------------------------------------------------------
def test_apply_bitmask_masks_listed_rows_only(manager, tok):
    vocab = manager.vocab_size
    logits = torch.randn(3, vocab)
    before = logits.clone()
    bitmask = manager.allocate_bitmask(3)
    manager.new_state(P(choice=["yes", "no"])).fill_bitmask(bitmask, 1)
    bitmask[0].zero_()  # row 0 has a mask that must NOT be applied (not listed)
    apply_bitmask(logits, bitmask, torch.tensor([1]))
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    kept = torch.isfinite(logits[1])
    bits = np.unpackbits(bitmask[1].numpy().view(np.uint8), bitorder="little")  # independent unpack
    expected = torch.from_numpy(bits[:vocab]).bool()
    assert torch.equal(kept, expected)
    assert torch.equal(logits[1][kept], before[1][kept])
    allowed = {tok.decode([t]) for t in kept.nonzero().flatten().tolist()}
    assert {"yes", "no"} <= allowed and len(allowed) < 20
    assert not kept[len(tok):].any()  # padded ids are never allowed
    apply_bitmask(logits, bitmask, [])  # no rows: no-op
    assert torch.equal(logits[0], before[0])


@pytest.fixture(params=["native", "torch"])
def bitmask_impl(request, monkeypatch):
    """Run a test with xgrammar's CPU kernel and with the device-agnostic tensor version."""
    if request.param == "torch":
        monkeypatch.setattr("inferd.structured.manager.xgr", None)
    return request.param


def test_apply_bitmask_implementations_agree(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1000, generator=gen)
    bitmask = torch.randint(-2**31, 2**31 - 1, (5, 32), dtype=torch.int32, generator=gen)
    native, tensor_ops = logits.clone(), logits.clone()
    apply_bitmask(native, bitmask, [0, 3, 4])
    monkeypatch.setattr("inferd.structured.manager.xgr", None)
    apply_bitmask(tensor_ops, bitmask, [0, 3, 4])
    assert torch.equal(native, tensor_ops)
    assert torch.equal(native[[1, 2]], logits[[1, 2]])
    assert torch.isinf(native[[0, 3, 4]]).any()


def test_apply_bitmask_bit31_and_narrow_mask(bitmask_impl):
    logits = torch.zeros(1, 70)
    bitmask = torch.zeros(1, 2, dtype=torch.int32)  # covers 64 of 70 columns
    bitmask[0, 0] = -(2**31)  # only bit 31 -> token 31
    bitmask[0, 1] = 1  # token 32
    apply_bitmask(logits, bitmask, [0])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [31, 32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_apply_bitmask_other_dtypes(bitmask_impl, dtype):
    logits = torch.zeros(2, 40, dtype=dtype)
    bitmask = torch.full((2, 2), -1, dtype=torch.int32)
    bitmask[1, 1] = 0
    apply_bitmask(logits, bitmask, [1])
    assert torch.isinf(logits[1, 32:]).all() and torch.isfinite(logits[1, :32]).all()
    assert torch.isfinite(logits[0]).all()


def test_apply_bitmask_rejects_out_of_range_rows():
    with pytest.raises(IndexError):
        apply_bitmask(torch.zeros(2, 32), torch.zeros(2, 1, dtype=torch.int32), [2])


def test_missing_xgrammar_is_a_clear_value_error(tok, monkeypatch):
    monkeypatch.setattr("inferd.structured.compiler.xgr", None)
    with pytest.raises(ValueError, match="xgrammar package is not installed"):
        validate_structured_outputs(P(regex="a"), tok)
