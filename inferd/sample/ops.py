"""Batched logits operations used by the sampler.

Every function works on a whole [B, V] batch with tensor ops only: no Python loop over rows
(except drawing noise from per-request generators, which torch cannot batch) and no
host-device sync (no `.item()`, no boolean-mask indexing with data-dependent shapes), so
the same code runs unchanged on CUDA. Functions named `apply_*` modify `logits` in place
and return it, to avoid a [B, V] copy per step.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def apply_allowed_mask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Keep only tokens where `allowed` [B, V'] is True. A mask narrower than the logits
    (tokenizer vocab smaller than the padded model vocab) disallows the extra columns."""
    v = allowed.shape[1]
    logits[:, :v].masked_fill_(~allowed, NEG_INF)
    if v < logits.shape[1]:
        logits[:, v:] = NEG_INF
    return logits


def apply_logit_bias(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor,
                     values: torch.Tensor) -> torch.Tensor:
    # (row, id) pairs are unique (they come from a dict per row), so accumulate == add.
    return logits.index_put_((rows, ids), values, accumulate=True)


def apply_token_bans(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    # new_full is a device fill, not a host->device copy of a Python scalar.
    return logits.index_put_((rows, ids), logits.new_full((), NEG_INF))


def token_counts(padded_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, L] ids padded with `vocab_size` -> [B, V] int32 occurrence counts."""
    counts = torch.zeros(padded_ids.shape[0], vocab_size + 1, dtype=torch.int32,
                         device=padded_ids.device)
    counts.scatter_add_(1, padded_ids, torch.ones_like(padded_ids, dtype=torch.int32))
    return counts[:, :vocab_size]


def token_presence(padded_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, L] ids padded with `vocab_size` -> [B, V] bool, True where the id occurs."""
    mask = torch.zeros(padded_ids.shape[0], vocab_size + 1, dtype=torch.bool,
                       device=padded_ids.device)
    mask.scatter_(1, padded_ids, True)
    return mask[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, vocab_size: int,
                    output_ids: torch.Tensor,
                    prompt_ids: torch.Tensor | None,
                    repetition: torch.Tensor | None,
                    frequency: torch.Tensor | None,
                    presence: torch.Tensor | None) -> torch.Tensor:
    """Repetition penalty (HF/vLLM: over prompt + output tokens, positive logits divided,
    negative multiplied), then frequency and presence penalties (OpenAI: over output tokens,
    logit -= frequency * count + presence * (count > 0))."""
    counts = token_counts(output_ids, vocab_size)
    seen_out = counts > 0
    lg = logits[:, :vocab_size]  # a padded model vocab has no ids beyond the tokenizer's
    if repetition is not None:
        seen = seen_out if prompt_ids is None else seen_out | token_presence(prompt_ids, vocab_size)
        rep = repetition.unsqueeze(1)
        scaled = torch.where(lg > 0, lg / rep, lg * rep)
        lg.copy_(torch.where(seen, scaled, lg))
    if frequency is not None:
        lg.sub_(frequency.unsqueeze(1) * counts)
    if presence is not None:
        lg.sub_(presence.unsqueeze(1) * seen_out)
    return logits


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    return logits.div_(temperature.unsqueeze(1))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's probability."""
    probs = logits.softmax(dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill_(probs < threshold, NEG_INF)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, max_top_k: int,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """`top_k` [B] holds V on rows without top-k; `max_top_k` is the largest k below V.
    Top-k keeps tokens whose logit is >= the row's k-th largest (ties stay in);
    top-p then keeps the smallest prefix of the sorted distribution whose mass reaches p
    (the first token always stays). One topk or one sort per call, never both."""
    if top_p is None:
        if top_k is None:
            return logits
        # Top-k alone: a partial topk of the batch's largest used k is cheaper than a sort.
        top_vals = logits.topk(max_top_k, dim=-1).values
        kth = top_vals.gather(1, (top_k - 1).clamp(max=max_top_k - 1).unsqueeze(1))
        off = (top_k >= logits.shape[1]).unsqueeze(1)  # rows without top-k keep everything
        return logits.masked_fill_((logits < kth) & ~off, NEG_INF)
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, NEG_INF)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of all strictly higher-ranked tokens
    p = top_p.unsqueeze(1)
    # The top token always stays, also for a p so small that float32 holds it as 0. p == 1.0
    # (off) never drops: rounding can push the cumulative sum to 1 before the tail.
    drop = (mass_before >= p) & (p < 1.0)
    drop[:, 0] = False
    sorted_logits.masked_fill_(drop, NEG_INF)
    return logits.scatter_(1, sorted_idx, sorted_logits)


def _exponential_(t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Fill `t` with Exp(1) draws. CUDA has a fused kernel; on CPU `exponential_` is scalar
    code about 4x slower than -log(1 - U), which has the same distribution."""
    if t.is_cuda:
        return t.exponential_(generator=generator)
    return t.uniform_(generator=generator).neg_().add_(1.0).log_().neg_()


def random_sample(logits: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Sample one token per row from softmax(logits) with the exponential race:
    argmax(p_i / E_i), E_i ~ Exp(1) i.i.d., picks token i with probability p_i.
    Rows listed in `generators` draw their noise from their own generator only, so a
    seeded request's tokens don't depend on what else is in the batch."""
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        _exponential_(noise, None)
    for row, gen in generators.items():
        _exponential_(noise[row], gen)
    # A zero draw would make 0/0 = NaN on a masked token, and argmax picks NaN.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return argmax(probs.div_(noise))


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax of [B, V]. torch's CPU argmax reduces each row on one thread without
    vectorising (4 ms for 64 x 49152); inferd's kernel does it in ~0.1 ms, same semantics."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 \
            and x.is_contiguous() and x.shape[1] > 0:
        from inferd.kernels import cpu as kernels
        lib = kernels.load()
        if lib is not None:
            return kernels.argmax(lib, x)
    return x.argmax(dim=-1)


def gather_logprobs(logprobs: torch.Tensor, sampled: torch.Tensor, num_logprobs: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> token ids [B, k+1] (column 0 = sampled, then top-k), their logprobs [B, k+1], and the
    sampled token's rank [B] (1 = most likely; tokens tied with it count as ranked above)."""
    sampled = sampled.unsqueeze(1)
    sampled_lp = logprobs.gather(1, sampled)
    ranks = (logprobs >= sampled_lp).sum(dim=-1)
    if num_logprobs <= 0:
        return sampled, sampled_lp, ranks
    top_lp, top_ids = logprobs.topk(num_logprobs, dim=-1)
    return torch.cat([sampled, top_ids], dim=1), torch.cat([sampled_lp, top_lp], dim=1), ranks


def compute_topk_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logprobs of given tokens (prompt logprobs: the actual next prompt token per position)
    under raw `logits` [N, V]; same layout as `gather_logprobs`."""
    return gather_logprobs(logits.float().log_softmax(dim=-1), token_ids, num_logprobs)
