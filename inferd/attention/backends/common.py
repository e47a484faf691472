"""Pieces every attention backend shares: the backend protocol, the paged-cache write and gathers.

KV cache layout (one tensor per layer): [2, num_blocks, block_size, num_kv_heads, head_dim],
index 0 = keys, 1 = values. Token slot s lives at block s // block_size, offset s % block_size,
so a flat view [2, num_blocks * block_size, Hkv, D] is indexed by slot directly.
"""
from __future__ import annotations

from typing import Protocol

import torch

from inferd.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor | None,
        meta: AttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> torch.Tensor:  # [T, H, D]
        ...


def write_kv_cache(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store this step's keys/values at their slots (in place)."""
    flat = kv_cache.flatten(1, 2)  # a view: [2, num_blocks * block_size, Hkv, D]
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def gather_blocks(kv_cache: torch.Tensor, flat_table: torch.Tensor, num_seqs: int, max_len: int,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of B sequences as padded [B, Hkv, max_len, D], from their block ids flattened
    to int64 [B * num_blocks] (positions past a sequence's length hold whatever the blocks
    hold; callers mask them). `index_select` on whole blocks copies about a third faster than
    advanced indexing with a 2-D table."""
    keys = kv_cache[0].index_select(0, flat_table)  # [B * nb, block_size, Hkv, D]
    values = kv_cache[1].index_select(0, flat_table)
    shape = (num_seqs, -1, *kv_cache.shape[3:])
    keys = keys.view(shape)[:, :max_len]  # [B, max_len, Hkv, D]
    values = values.view(shape)[:, :max_len]
    return keys.transpose(1, 2), values.transpose(1, 2)


def context_slots(meta: AttentionMetadata, first: int = 0) -> torch.Tensor:
    """Flat cache slots of the whole context of sequences [first, B), concatenated: int64
    [sum(seq_lens[first:])].

    Vectorized (no per-sequence loop) so it runs as a handful of device ops.
    """
    device = meta.block_tables.device
    total = sum(meta.seq_lens[first:])
    lens = meta.seq_lens_t[first:].long()
    starts = torch.cumsum(lens, 0) - lens
    seq_idx = torch.repeat_interleave(torch.arange(len(lens), device=device), lens,
                                      output_size=total)
    pos = torch.arange(total, device=device) - starts[seq_idx]
    blocks = meta.block_tables[first:].long()[seq_idx, pos // meta.block_size]
    return blocks * meta.block_size + pos % meta.block_size
