"""Attention on any device with torch's scaled_dot_product_attention over a paged KV cache.

Per step: write the new K/V into the cache, then
- decodes (the first `meta.num_decodes` sequences, one query each) run as ONE padded SDPA call
  over K/V gathered through the block tables, masked by each sequence's length;
- prefill chunks loop per sequence (few per step), causal with the mask offset by the context
  already in the cache; a first chunk with nothing cached attends to its fresh K/V directly.
Logit soft-capping (tanh) has no SDPA equivalent, so that path computes scores by hand.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from inferd.attention.backends.common import gather_blocks, write_kv_cache
from inferd.attention.metadata import AttentionMetadata


def _mask(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool,
          sliding_window: int | None) -> torch.Tensor | None:
    """Bool mask [.., Lq, L] (True = attend) from absolute query / key positions.

    The window follows HF: a query at p sees keys in (p - window, p], `window` positions in all.
    """
    q = q_pos.unsqueeze(-1)
    k = k_pos.unsqueeze(-2)
    if causal:
        keep = k <= q
        if sliding_window is not None:
            keep = keep & (k > q - sliding_window)
        return keep
    if sliding_window is not None:
        return (k - q).abs() < sliding_window
    return None


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            scale: float, soft_cap: float | None, is_causal: bool = False) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, Hkv, L, D], mask broadcastable to [B, 1, Lq, L] -> [B, H, Lq, D]."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if soft_cap is None:
        if q.is_cuda and mask is not None and num_heads != num_kv_heads:
            # CUDA's memory-efficient kernel takes a mask but not GQA; left to enable_gqa, SDPA
            # would fall back to its math kernel and materialise fp32 scores [H, Lq, L].
            groups = num_heads // num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            num_kv_heads = num_heads
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              scale=scale, enable_gqa=num_heads != num_kv_heads)
    # Manual path: group query heads by their KV head so K/V are never repeated in memory.
    b, _, lq, d = q.shape
    groups = num_heads // num_kv_heads
    qg = q.reshape(b, num_kv_heads, groups, lq, d).float()
    # [B, Hkv, G, Lq, L]
    scores = torch.matmul(qg, k.float().unsqueeze(2).transpose(-1, -2)) * scale
    scores = torch.tanh(scores / soft_cap) * soft_cap
    if is_causal:
        mask = _mask(torch.arange(lq, device=q.device), torch.arange(k.shape[2], device=q.device),
                     True, None)
    if mask is not None:
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))  # [B, 1, 1, Lq, L]
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v.float().unsqueeze(2))  # [B, Hkv, G, Lq, D]
    return out.reshape(b, num_heads, lq, d).to(q.dtype)


def _packed_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """q, k, v as one [T, 3, H, D] view when they are consecutive slices of one fused
    projection's output (same shape, rows 3 * H * D apart); else None."""
    if not (q.shape == k.shape == v.shape and q.stride() == k.stride() == v.stride()
            and q.dtype == k.dtype == v.dtype):
        return None
    t, h, d = q.shape
    step = h * d * q.element_size()
    if (q.stride() != (3 * h * d, d, 1) or k.data_ptr() - q.data_ptr() != step
            or v.data_ptr() - k.data_ptr() != step):
        return None
    return torch.as_strided(q, (t, 3, h, d), (3 * h * d, h * d, d, 1))


class TorchSDPABackend:
    name = "torch_sdpa"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor | None, meta: AttentionMetadata, *, scale: float,
                sliding_window: int | None = None,
                logits_soft_cap: float | None = None) -> torch.Tensor:
        out = torch.empty_like(q)
        if kv_cache is None:
            # Encoders and cache-less runs: each sequence attends within its own new tokens.
            if not meta.causal and sliding_window is None and logits_soft_cap is None \
                    and meta.num_seqs > 1:
                return self._padded_bidirectional(q, k, v, meta, scale)
            for i in range(meta.num_seqs):
                self._prefill(i, q, k, v, None, meta, out, scale, sliding_window, logits_soft_cap)
            return out
        self._write_kv(kv_cache, k, v, meta)
        if meta.num_decodes:
            out[: meta.num_decodes] = self._decodes(q, kv_cache, meta, scale, sliding_window,
                                                     logits_soft_cap)
        if meta.num_decodes < meta.num_seqs and self._prefills(
                q, kv_cache, meta, out, scale, sliding_window, logits_soft_cap):
            return out
        for i, run in self._prefill_runs(meta, batch=sliding_window is None):
            if run > 1:
                self._prefill_run(i, run, q, k, v, meta, out, scale, logits_soft_cap)
            else:
                self._prefill(i, q, k, v, kv_cache, meta, out, scale, sliding_window,
                              logits_soft_cap)
        return out

    def _prefills(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                  out: torch.Tensor, scale: float, sliding_window: int | None,
                  soft_cap: float | None) -> bool:
        """All prefill rows of the step at once, into `out`, where a backend has a kernel for
        them; False leaves them to SDPA below."""
        return False

    @staticmethod
    def _prefill_runs(meta: AttentionMetadata, batch: bool) -> list[tuple[int, int]]:
        """(first sequence, count) of the step's prefills: with `batch`, consecutive fresh
        prefills (nothing cached) of one length form a run that one batched causal SDPA call
        serves (a burst of equal prompts, as benchmarks send, is 16-64 calls per layer
        otherwise, and batching spreads B x H over the threads). The same in every layer, so
        derived once per step."""
        key = ("prefill_runs", batch)
        cached = meta.scratch.get(key)
        if cached is not None:
            return cached
        qsl, runs = meta.query_start_loc, []
        i = meta.num_decodes
        while i < meta.num_seqs:
            j = i + 1
            if batch and meta.causal and meta.context_len(i) == 0:
                length = qsl[i + 1] - qsl[i]
                while (j < meta.num_seqs and meta.context_len(j) == 0
                       and qsl[j + 1] - qsl[j] == length):
                    j += 1
            runs.append((i, j - i))
            i = j
        meta.scratch[key] = runs
        return runs

    @staticmethod
    def _prefill_run(i: int, run: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     meta: AttentionMetadata, out: torch.Tensor, scale: float,
                     soft_cap: float | None) -> None:
        start = meta.query_start_loc[i]
        length = meta.query_start_loc[i + 1] - start
        end = start + run * length

        def batched(x: torch.Tensor) -> torch.Tensor:  # [run * L, H, D] -> [run, H, L, D]
            return x[start:end].view(run, length, *x.shape[1:]).transpose(1, 2)

        res = _attend(batched(q), batched(k), batched(v), None, scale, soft_cap, is_causal=True)
        out[start:end] = res.transpose(1, 2).reshape(run * length, *q.shape[1:])

    def _write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  meta: AttentionMetadata) -> None:
        write_kv_cache(kv_cache, k, v, meta.slot_mapping)

    def _padded_bidirectional(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Whole encoder batch as one padded SDPA call: one op per layer instead of one per
        sequence (embedding batches hold many short sequences)."""
        b, max_len = meta.num_seqs, meta.max_seq_len
        flat, mask = self._padding(meta, q.device)
        qkv = _packed_qkv(q, k, v)
        if qkv is not None:  # one fused projection (BERT): pad q, k and v in a single copy
            padded = qkv.new_zeros(b * max_len, *qkv.shape[1:])
            padded.index_copy_(0, flat, qkv)
            pq, pk, pv = (t.view(b, max_len, *t.shape[1:]).transpose(1, 2)
                          for t in padded.unbind(1))
        else:
            def pad(x: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [B, H, L, D]
                out = x.new_zeros(b * max_len, *x.shape[1:])
                out.index_copy_(0, flat, x)
                return out.view(b, max_len, *x.shape[1:]).transpose(1, 2)
            pq, pk, pv = pad(q), pad(k), pad(v)
        o = F.scaled_dot_product_attention(pq, pk, pv, attn_mask=mask, scale=scale,
                                           enable_gqa=q.shape[1] != k.shape[1])
        return o.transpose(1, 2).reshape(b * max_len, *q.shape[1:]).index_select(0, flat)

    @staticmethod
    def _padding(meta: AttentionMetadata, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(padded row of every token [T], key mask [B, 1, 1, L]) for the encoder path; the
        same in every layer, so derived once per step."""
        cached = meta.scratch.get("padding")
        if cached is not None:
            return cached
        b, max_len = meta.num_seqs, meta.max_seq_len
        qsl = torch.tensor(meta.query_start_loc, device=device)
        lens = qsl[1:] - qsl[:-1]
        total = meta.num_tokens
        seq = torch.repeat_interleave(torch.arange(b, device=device), lens, output_size=total)
        flat = seq * max_len + torch.arange(total, device=device) - qsl[:-1][seq]
        # Padded query rows still see their sequence's real keys, so no row is all-masked.
        mask = (torch.arange(max_len, device=device)[None, :] < lens[:, None])[:, None, None, :]
        meta.scratch["padding"] = flat, mask
        return flat, mask

    def _decodes(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 scale: float, sliding_window: int | None,
                 soft_cap: float | None) -> torch.Tensor:
        """All single-token sequences in one batched call over padded cached K/V."""
        n = meta.num_decodes
        table, max_len, mask = self._decode_inputs(meta, sliding_window)
        keys, values = gather_blocks(kv_cache, table, n, max_len)
        out = _attend(q[:n].unsqueeze(2), keys, values, mask, scale, soft_cap)
        return out.squeeze(2)

    @staticmethod
    def _decode_inputs(meta: AttentionMetadata, sliding_window: int | None
                       ) -> tuple[torch.Tensor, int, torch.Tensor]:
        """(flat block table, padded length, mask [n, 1, 1, L]) of the decodes: the same in
        every layer with the same window, so derived once per step."""
        key = ("decodes", sliding_window)
        cached = meta.scratch.get(key)
        if cached is not None:
            return cached
        n = meta.num_decodes
        max_len = max(meta.seq_lens[:n])  # host list: no device sync
        num_blocks = -(-max_len // meta.block_size)
        table = meta.block_tables[:n, :num_blocks].reshape(-1).long()
        lens = meta.seq_lens_t[:n].long().unsqueeze(1)  # [n, 1]
        k_pos = torch.arange(max_len, device=lens.device).unsqueeze(0)  # [1, L]
        keep = k_pos < lens
        if sliding_window is not None:
            keep = keep & (k_pos >= lens - sliding_window)
        meta.scratch[key] = table, max_len, keep[:, None, None, :]
        return meta.scratch[key]

    def _prefill(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_cache: torch.Tensor | None, meta: AttentionMetadata, out: torch.Tensor,
                 scale: float, sliding_window: int | None, soft_cap: float | None) -> None:
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        ctx = meta.context_len(i)
        if ctx == 0:  # nothing cached before: attend to the fresh K/V directly
            ki = k[start:end].transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
            vi = v[start:end].transpose(0, 1).unsqueeze(0)
        elif kv_cache is None:
            raise ValueError(f"sequence {i} has {ctx} cached tokens but the layer has no KV cache")
        else:
            length = meta.seq_lens[i]
            num_blocks = -(-length // meta.block_size)
            ki, vi = gather_blocks(kv_cache, meta.block_tables[i, :num_blocks].long(), 1, length)
        qi = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, Lq, D]
        plain_causal = meta.causal and ctx == 0 and sliding_window is None
        mask = None
        if not plain_causal:
            q_pos = torch.arange(ctx, ctx + end - start, device=q.device)
            mask = _mask(q_pos, torch.arange(ki.shape[2], device=q.device), meta.causal,
                         sliding_window)
        res = _attend(qi, ki, vi, mask, scale, soft_cap, is_causal=plain_causal)
        out[start:end] = res.squeeze(0).transpose(0, 1)
