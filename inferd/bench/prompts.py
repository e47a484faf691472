"""Prompts of an exact token length, a different one for every request.

Each request gets its own random prompt so that no server gains from its prefix cache, which would
make TTFT look better than a real workload's. Two ways:
- token ids (`prompt: [ids]`, which /v1/completions accepts on inferd and vLLM): exact by
  construction;
- random words, fitted to the length with a token counter: the server's /tokenize (inferd, vLLM),
  llama-cpp-python's /extras/tokenize, a local tokenizer, or, with none, one token per word.
"""
from __future__ import annotations

import asyncio
import random
from typing import Awaitable, Callable

import httpx

TokenCounter = Callable[[str], Awaitable[int]]

# Common short English words: in the usual BPE vocabularies " word" is one token, which keeps the
# length fit tight and makes the no-tokenizer fallback (one token per word) a fair estimate.
WORDS = (
    "the of and to in is it you that he was for on are with as his they be at one have this "
    "from or had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than first "
    "water been call who oil now find long down day did get come made may part over new sound "
    "take only little work know place year live me back give most very after thing our just "
    "name good sentence man think say great where help through much before line right too mean "
    "old any same tell boy follow came want show also around form three small set put end does "
    "another well large must big even such because turn here why ask went men read need land "
    "different home us move try kind hand picture again change off play spell air away animal "
    "house point page letter mother answer found study"
).split()
PAD_WORDS = (".", " a", " I", ",", " the", " of")  # each usually adds exactly one token
MAX_FIT_STEPS = 24  # tokenizer calls per prompt: ~9 for the bisection, the rest for padding


def token_id_prompts(num: int, length: int, rng: random.Random, id_range: tuple[int, int]
                     ) -> list[list[int]]:
    """`num` prompts of `length` ids drawn from [lo, hi): a range clear of the special tokens that
    sit at the bottom of most vocabularies and within the smallest vocabularies in use (32k)."""
    lo, hi = id_range
    return [[rng.randrange(lo, hi) for _ in range(length)] for _ in range(num)]


async def word_prompts(num: int, length: int, rng: random.Random, count: TokenCounter | None,
                       concurrency: int = 8) -> tuple[list[str], list[int]]:
    """`num` random-word prompts fitted to `length` tokens, and the length each really has (which
    can miss by a token when no padding lands exactly; -1 when there is no counter to ask)."""
    word_lists = [[rng.choice(WORDS) for _ in range(2 * length + 8)] for _ in range(num)]
    if count is None:
        return [" ".join(words[:length]) for words in word_lists], [-1] * num
    gate = asyncio.Semaphore(concurrency)

    async def fit_one(words: list[str]) -> tuple[str, int]:
        async with gate:
            return await fit_words(words, length, count)

    fitted = await asyncio.gather(*(fit_one(w) for w in word_lists))
    return [text for text, _ in fitted], [n for _, n in fitted]


async def fit_words(words: list[str], length: int, count: TokenCounter) -> tuple[str, int]:
    """The longest prefix of `words` with at most `length` tokens (by bisection: the count grows
    with the prefix), then padded one token at a time up to `length`. Bounded by MAX_FIT_STEPS."""
    lo, hi = 0, len(words)  # invariant: prefix lo fits (or lo == 0); prefix hi+1 does not
    steps = 0
    while lo < hi and steps < MAX_FIT_STEPS:
        mid = (lo + hi + 1) // 2
        steps += 1
        if await count(" ".join(words[:mid])) <= length:
            lo = mid
        else:
            hi = mid - 1
    text = " ".join(words[:lo])
    n = await count(text) if text else 0
    pads = iter(PAD_WORDS * 4)
    while n < length and steps < MAX_FIT_STEPS:
        pad = next(pads, None)
        if pad is None:
            break
        steps += 1
        candidate = text + pad
        m = await count(candidate)
        if m <= length:  # a pad that overshoots is skipped; the next may add exactly one
            text, n = candidate, m
    return text, n


async def server_token_counter(client: httpx.AsyncClient, model: str, chat: bool
                               ) -> tuple[TokenCounter, str] | None:
    """A counter backed by the server's tokenize endpoint and what it counts, or None when the
    server has no endpoint we know.

    For completions the count includes the special tokens the completion gets (BOS): /tokenize adds
    them by default, as /v1/completions does. For chat it counts the whole templated prompt when
    the server tokenizes messages (inferd, vLLM), so `usage.prompt_tokens` equals --input-len on
    both endpoints; otherwise only the message text.
    """
    def message(text: str) -> dict:
        return {"model": model, "messages": [{"role": "user", "content": text}]}

    shapes = [("/tokenize", lambda text: {"model": model, "prompt": text}, "the text"),
              ("/extras/tokenize", lambda text: {"model": model, "input": text}, "the text")]
    if chat:
        shapes.insert(0, ("/tokenize", message, "the templated chat prompt"))
    for path, body, what in shapes:
        try:
            resp = await client.post(path, json=body("hello world"))
        except httpx.HTTPError:
            continue
        if resp.status_code == 200 and _count_of(resp.json()) is not None:
            return _make_counter(client, path, body), f"{what}, counted by the server's {path}"
    return None


def _make_counter(client: httpx.AsyncClient, path: str,
                  body: Callable[[str], dict]) -> TokenCounter:
    async def count(text: str) -> int:
        resp = await client.post(path, json=body(text))
        resp.raise_for_status()
        n = _count_of(resp.json())
        if n is None:
            raise ValueError(f"{path} answered without a token count: {resp.text[:200]}")
        return n
    return count


def _count_of(obj: object) -> int | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("count"), int):
        return obj["count"]
    if isinstance(obj.get("tokens"), list):
        return len(obj["tokens"])
    return None


def local_token_counter(path: str, chat: bool) -> tuple[TokenCounter, str]:
    """A counter from a local tokenizer (a HF directory, or a .gguf file's embedded one), for
    servers with no tokenize endpoint. Local files only: the benchmark talks to no other host."""
    from pathlib import Path

    from transformers import AutoTokenizer
    p = Path(path)
    if p.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    else:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    templated = chat and getattr(tok, "chat_template", None) is not None

    async def count(text: str) -> int:
        if templated:
            # Render to text, then count without adding special tokens a second time.
            rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                               add_generation_prompt=True)
            return len(tok(rendered, add_special_tokens=False)["input_ids"])
        return len(tok(text)["input_ids"])
    what = "the templated chat prompt" if templated else "the text"
    return count, f"{what}, counted by {path}"
