"""`SamplingMetadata`: the per-step batch tensors the sampler reads.

The model runner builds one per step from per-request host lists. Everything that needs
Python-level per-request logic (bad-word prefix matching, min_tokens counting, logit-bias
dicts) happens here, on the host, and is shipped to the device as small index tensors, so
the sampler itself is pure tensor work with no host-device syncs.

A field is None when no row in the batch needs that step: the sampler skips it entirely,
which is what keeps an all-greedy batch down to one argmax.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inferd.sampling_params import SamplingParams

# Index pairs (rows [N] int64, token ids [N] int64) addressing single logits.
TokenIndex = tuple[torch.Tensor, torch.Tensor]


@dataclass
class SamplingMetadata:
    vocab_size: int
    all_greedy: bool  # every row is greedy: no temperature / truncation / noise at all
    all_random: bool  # no row is greedy: no argmax merge needed
    # [B] bool, True on greedy rows; None when all_greedy or all_random.
    greedy_mask: torch.Tensor | None = None
    # [B] float32; greedy rows hold 1.0 so the division is a no-op there. None if all_greedy.
    temperature: torch.Tensor | None = None
    min_p: torch.Tensor | None = None  # [B] float32, 0.0 = off; None if no row uses it
    top_k: torch.Tensor | None = None  # [B] int64 in [1, V], V = off; None if no row uses it
    max_top_k: int = 0  # largest k below V, on the host: the topk-only path needs no sync
    top_p: torch.Tensor | None = None  # [B] float32, 1.0 = off; None if no row uses it
    # Row index -> that request's own generator (seeded, non-greedy rows only).
    generators: dict[int, torch.Generator] = field(default_factory=dict)

    # Penalties: None unless some row has a non-neutral value.
    repetition_penalties: torch.Tensor | None = None  # [B] float32, 1.0 = off
    frequency_penalties: torch.Tensor | None = None  # [B] float32, 0.0 = off
    presence_penalties: torch.Tensor | None = None  # [B] float32, 0.0 = off
    # Token ids padded with `vocab_size` (a scratch column dropped after counting).
    prompt_token_ids: torch.Tensor | None = None  # [B, Lp]; only for repetition penalty
    output_token_ids: torch.Tensor | None = None  # [B, Lo]

    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # rows, ids, values
    allowed_ids_mask: torch.Tensor | None = None  # [B, V] bool from `allowed_token_ids`
    bad_words_banned: TokenIndex | None = None  # last tokens of bad words whose prefix matched
    min_tokens_banned: TokenIndex | None = None  # stop/EOS ids of rows still under min_tokens

    # Largest `logprobs` in the batch (-1 maps to V); None when no row asked for logprobs.
    max_num_logprobs: int | None = None

    # Set by the engine for structured output after `build` ([B, V] bool, True = allowed).
    allowed_token_mask: torch.Tensor | None = None

    @property
    def any_penalties(self) -> bool:
        return (self.repetition_penalties is not None or self.frequency_penalties is not None
                or self.presence_penalties is not None)

    @classmethod
    def build(cls, params: list[SamplingParams], prompt_token_ids: list[list[int]],
              output_token_ids: list[list[int]], generators: list[torch.Generator | None],
              eos_token_ids: list[tuple[int, ...]], vocab_size: int,
              device: torch.device) -> "SamplingMetadata":
        """Gather the batch's parameters into tensors on `device` (row i = params[i])."""
        n = len(params)
        if not (len(prompt_token_ids) == len(output_token_ids) == len(generators)
                == len(eos_token_ids) == n):
            raise ValueError(f"SamplingMetadata.build: per-row lists differ in length "
                             f"(params={n}, prompts={len(prompt_token_ids)}, "
                             f"outputs={len(output_token_ids)}, generators={len(generators)}, "
                             f"eos={len(eos_token_ids)})")
        device = torch.device(device)
        greedy = [p.greedy for p in params]
        meta = cls(vocab_size=vocab_size, all_greedy=all(greedy), all_random=not any(greedy))
        if not meta.all_greedy:
            _fill_random(meta, params, greedy, generators, vocab_size, device)
        _fill_penalties(meta, params, prompt_token_ids, output_token_ids, vocab_size, device)
        _fill_masks(meta, params, output_token_ids, eos_token_ids, vocab_size, device)
        asked = [p.logprobs for p in params if p.logprobs is not None]
        if asked:
            meta.max_num_logprobs = vocab_size if -1 in asked else min(max(asked), vocab_size)
        return meta


def _to_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host list -> device tensor; pinned + non_blocking on CUDA so the copy doesn't stall the host."""
    t = torch.tensor(data, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _fill_random(meta: SamplingMetadata, params: list[SamplingParams], greedy: list[bool],
                 generators: list[torch.Generator | None], vocab_size: int,
                 device: torch.device) -> None:
    f32 = torch.float32
    if not meta.all_random:
        meta.greedy_mask = _to_device(greedy, torch.bool, device)
    meta.temperature = _to_device([1.0 if g else p.temperature for p, g in zip(params, greedy)],
                                  f32, device)
    if any(p.min_p > 0.0 for p in params):
        meta.min_p = _to_device([p.min_p for p in params], f32, device)
    # SamplingParams already resets top_k/top_p/min_p on greedy rows.
    top_k = [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params]
    if any(k < vocab_size for k in top_k):
        meta.top_k = _to_device(top_k, torch.int64, device)
        meta.max_top_k = max(k for k in top_k if k < vocab_size)
    if any(p.top_p < 1.0 for p in params):
        meta.top_p = _to_device([p.top_p for p in params], f32, device)
    # A greedy row never draws noise, so its generator must not advance either.
    meta.generators = {i: g for i, g in enumerate(generators) if g is not None and not greedy[i]}


def _pad(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max((len(r) for r in rows), default=0))
    return _to_device([r + [pad] * (width - len(r)) for r in rows], torch.int64, device)


def _fill_penalties(meta: SamplingMetadata, params: list[SamplingParams],
                    prompt_token_ids: list[list[int]], output_token_ids: list[list[int]],
                    vocab_size: int, device: torch.device) -> None:
    f32 = torch.float32
    rep = [p.repetition_penalty for p in params]
    freq = [p.frequency_penalty for p in params]
    pres = [p.presence_penalty for p in params]
    if any(r != 1.0 for r in rep):
        meta.repetition_penalties = _to_device(rep, f32, device)
        meta.prompt_token_ids = _pad(prompt_token_ids, vocab_size, device)
    if any(f != 0.0 for f in freq):
        meta.frequency_penalties = _to_device(freq, f32, device)
    if any(p != 0.0 for p in pres):
        meta.presence_penalties = _to_device(pres, f32, device)
    if meta.any_penalties:
        meta.output_token_ids = _pad(output_token_ids, vocab_size, device)


def _index(rows: list[int], ids: list[int], device: torch.device) -> TokenIndex | None:
    if not rows:
        return None
    return _to_device(rows, torch.int64, device), _to_device(ids, torch.int64, device)


def _fill_masks(meta: SamplingMetadata, params: list[SamplingParams],
                output_token_ids: list[list[int]], eos_token_ids: list[tuple[int, ...]],
                vocab_size: int, device: torch.device) -> None:
    """allowed_token_ids, logit_bias, bad_words and min_tokens, as sparse indices.

    Ids outside the vocabulary are dropped here: an out-of-range index on CUDA is a
    device-side assert that kills the whole engine, not just this request.
    """
    allowed_rows: list[int] = []
    allowed_ids: list[int] = []
    bias_rows: list[int] = []
    bias_ids: list[int] = []
    bias_vals: list[float] = []
    bad_rows: list[int] = []
    bad_ids: list[int] = []
    min_rows: list[int] = []
    min_ids: list[int] = []
    for i, p in enumerate(params):
        if p.allowed_token_ids is not None:
            ids = [t for t in p.allowed_token_ids if t < vocab_size]
            allowed_rows += [i] * len(ids)
            allowed_ids += ids
        if p.logit_bias:
            for tok, val in p.logit_bias.items():
                if tok < vocab_size:
                    bias_rows.append(i)
                    bias_ids.append(tok)
                    bias_vals.append(val)
        if p.bad_words_token_ids:
            ids = _banned_bad_word_ids(p.bad_words_token_ids, output_token_ids[i], vocab_size)
            bad_rows += [i] * len(ids)
            bad_ids += ids
        if len(output_token_ids[i]) < p.min_tokens:
            # vLLM bans every stop token during min_tokens; EOS is only a stop token
            # when ignore_eos is off.
            stops = set(p.stop_token_ids)
            if not p.ignore_eos:
                stops.update(eos_token_ids[i])
            ids = sorted(t for t in stops if t < vocab_size)
            min_rows += [i] * len(ids)
            min_ids += ids
    if allowed_rows:
        # Rows without allowed_token_ids keep every token.
        restricted = [p.allowed_token_ids is not None for p in params]
        mask = ~_to_device(restricted, torch.bool, device).unsqueeze(1).repeat(1, vocab_size)
        rows, ids = _index(allowed_rows, allowed_ids, device)
        meta.allowed_ids_mask = mask.index_put_((rows, ids), mask.new_ones(()))
    if bias_rows:
        rows, ids = _index(bias_rows, bias_ids, device)
        meta.logit_bias = (rows, ids, _to_device(bias_vals, torch.float32, device))
    meta.bad_words_banned = _index(bad_rows, bad_ids, device)
    meta.min_tokens_banned = _index(min_rows, min_ids, device)


def _banned_bad_word_ids(bad_words: list[list[int]], output: list[int], vocab_size: int) -> list[int]:
    """Last tokens of the bad words whose preceding tokens end the output so far."""
    banned = []
    for word in bad_words:
        if not word or word[-1] >= vocab_size:
            continue
        prefix = word[:-1]
        if len(prefix) > len(output):
            continue
        if not prefix or output[len(output) - len(prefix):] == prefix:
            banned.append(word[-1])
    return banned
