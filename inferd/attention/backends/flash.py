"""CUDA attention with flash-attn 2 (`flash_attn.flash_attn_varlen_func`).

Prefill chunks are one varlen call: flash-attn aligns the causal mask to the bottom-right
corner when a sequence has more keys than queries, which is exactly "offset by the context
already in cache". Its sliding window (left, right) keeps keys in [p - left, p + right], so
HF's window W (W positions including the query) is (W - 1, 0).

flash-attn 2 reads a paged cache directly (`block_table=`) only when the page size is a multiple
of 256; our blocks are 8..128 tokens, so that path gathers each sequence's context into a packed
[sum(seq_lens), Hkv, D] tensor first (vectorized, see `context_slots`). Decodes would make that
copy the whole cache's worth every layer, so with triton installed they read the blocks in
place through the Triton kernel (`triton_attn.py`) and only the prefills' contexts are gathered.
fp32 is not supported by the kernels: those calls go to the Triton (or torch) backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from inferd.attention.backends.common import context_slots, write_kv_cache
from inferd.attention.backends.torch_sdpa import TorchSDPABackend
from inferd.attention.metadata import AttentionMetadata

try:  # optional dependency, CUDA only
    from flash_attn import flash_attn_varlen_func
    HAS_FLASH_ATTN = True
except ImportError:  # pragma: no cover - depends on the install
    flash_attn_varlen_func = None
    HAS_FLASH_ATTN = False

_PAGED_BLOCK_MULTIPLE = 256  # flash-attn 2's requirement for block_table


class FlashAttentionBackend:
    name = "flash_attn"

    def __init__(self) -> None:
        from inferd.attention.backends.triton_attn import HAS_TRITON, TritonBackend
        self._triton_decodes = HAS_TRITON
        # fp32 (which flash-attn does not take) decodes through Triton where it is installed.
        self._fallback = TritonBackend() if HAS_TRITON else TorchSDPABackend()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor | None, meta: AttentionMetadata, *, scale: float,
                sliding_window: int | None = None,
                logits_soft_cap: float | None = None) -> torch.Tensor:
        if q.dtype not in (torch.float16, torch.bfloat16) or flash_attn_varlen_func is None:
            return self._fallback.forward(q, k, v, kv_cache, meta, scale=scale,
                                          sliding_window=sliding_window,
                                          logits_soft_cap=logits_soft_cap)
        if kv_cache is not None:
            write_kv_cache(kv_cache, k, v, meta.slot_mapping)
        first = 0  # the first sequence of the varlen call; those before it are decodes
        out = None
        if kv_cache is not None and meta.causal and (meta.static or self._triton_decodes):
            from inferd.attention.backends.triton_attn import decode_attention
            if meta.static and q.dtype != kv_cache.dtype:
                raise ValueError("a captured decode batch needs q in the cache's dtype")
            first = meta.num_decodes
            if first:  # a captured batch is all decodes: its host lists are the capture's
                dec = decode_attention(q, kv_cache, meta, scale, sliding_window, logits_soft_cap)
                if first == meta.num_seqs:
                    return dec
                out = torch.empty_like(q)
                out[:first] = dec
        window = (sliding_window - 1, 0) if sliding_window is not None else (-1, -1)
        if not meta.causal and sliding_window is not None:
            window = (sliding_window - 1, sliding_window - 1)
        common = dict(softmax_scale=scale, causal=meta.causal, window_size=window,
                      softcap=logits_soft_cap or 0.0)
        cu_q, max_q = self._query_bounds(meta, first, q.device)
        rows = slice(meta.query_start_loc[first], meta.num_tokens)
        if kv_cache is None:
            if any(meta.context_len(i) for i in range(meta.num_seqs)):
                raise ValueError("cached context without a KV cache")
            return flash_attn_varlen_func(q, k, v, cu_q, cu_q, max_q, max_q, **common)
        cu_k, slots, max_k = self._context(meta, first)
        if slots is None:  # flash-attn pages the cache itself
            res = flash_attn_varlen_func(q[rows], kv_cache[0], kv_cache[1], cu_q, cu_k, max_q,
                                         max_k, block_table=meta.block_tables[first:], **common)
        else:
            flat = kv_cache.flatten(1, 2)
            res = flash_attn_varlen_func(q[rows], flat[0].index_select(0, slots),
                                         flat[1].index_select(0, slots), cu_q, cu_k, max_q,
                                         max_k, **common)
        if out is None:
            return res
        out[rows] = res
        return out

    @staticmethod
    def _query_bounds(meta: AttentionMetadata, first: int,
                      device: torch.device) -> tuple[torch.Tensor, int]:
        """(cu_seqlens_q, max query length) of sequences [first, B), once per step: the copy
        from the host goes through pinned memory without a stream sync, not once per layer."""
        cached = meta.scratch.get(("flash_q", first))
        if cached is None:
            qsl = meta.query_start_loc
            host = torch.tensor([x - qsl[first] for x in qsl[first:]], dtype=torch.int32)
            if device.type == "cuda":
                host = host.pin_memory()
            cached = meta.scratch[("flash_q", first)] = (
                host.to(device, non_blocking=True),
                max(meta.query_len(i) for i in range(first, meta.num_seqs)))
        return cached

    @staticmethod
    def _context(meta: AttentionMetadata, first: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(cu_seqlens_k, the flat cache slots of every context or None when flash-attn pages
        the cache itself, the longest context) of sequences [first, B), once per step."""
        cached = meta.scratch.get(("flash_k", first))
        if cached is None:
            cu_k = F.pad(torch.cumsum(meta.seq_lens_t[first:], 0, dtype=torch.int32), (1, 0))
            paged = meta.block_size % _PAGED_BLOCK_MULTIPLE == 0
            cached = meta.scratch[("flash_k", first)] = (
                cu_k, None if paged else context_slots(meta, first), max(meta.seq_lens[first:]))
        return cached
