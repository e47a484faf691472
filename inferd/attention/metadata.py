"""The contract between the model runner and attention backends.

A step's batch is flat: T new tokens from B sequences, no padding. Sequences with a
single new token (decodes) come first, then sequences with several (prefill chunks),
so a backend can run all decodes as one padded batch and loop over the few prefills.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class AttentionMetadata:
    num_decodes: int
    """Sequences [0, num_decodes) have exactly one new token each (tokens [0, num_decodes))."""
    query_start_loc: list[int]
    """Host, length B+1: sequence i's new tokens are [query_start_loc[i], query_start_loc[i+1])."""
    seq_lens: list[int]
    """Host, length B: tokens in context after this step (cached + new)."""
    seq_lens_t: torch.Tensor
    """Device int32 [B], same values as seq_lens."""
    block_tables: torch.Tensor
    """Device int32 [B, max_blocks]; unused entries are 0 and masked by seq_lens."""
    slot_mapping: torch.Tensor
    """Device int64 [T]: flat cache slot (block_id * block_size + offset) where each new token's K/V go."""
    block_size: int
    causal: bool = True
    """False for encoders (BERT): bidirectional attention within each sequence, no KV cache."""
    static: bool = False
    """A captured CUDA graph's decode batch (`worker/cuda_graphs.py`): every row is a decode,
    and the host lists describe the capture (each row at the longest context the block tables
    hold), not the replay; only the device tensors carry each replay's values."""
    scratch: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    """Tensors a backend derives from this metadata in the first layer and reuses in the
    others (gather indices, masks): built once per step instead of once per layer."""

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens) if self.seq_lens else 0

    def query_len(self, i: int) -> int:
        return self.query_start_loc[i + 1] - self.query_start_loc[i]

    def context_len(self, i: int) -> int:
        """Tokens already in the cache before this step for sequence i."""
        return self.seq_lens[i] - self.query_len(i)


def build_attention_metadata(
    context_lens: list[int],
    query_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
    causal: bool = True,
) -> AttentionMetadata:
    """Metadata for sequences given in batch order (decodes must come first).

    context_lens[i]: tokens already cached; query_lens[i]: new tokens this step;
    block_tables[i]: the sequence's block ids, covering context_lens[i] + query_lens[i] tokens.
    """
    return build_batch(context_lens, query_lens, block_tables, block_size, device, causal)[1]


def build_batch(
    context_lens: list[int],
    query_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
    causal: bool = True,
) -> tuple[torch.Tensor, AttentionMetadata]:
    """Token positions [T] and the metadata, computed with whole-array numpy ops."""
    qlens = np.asarray(query_lens, dtype=np.int64)
    ctx = np.asarray(context_lens, dtype=np.int64)
    num_seqs = len(qlens)
    num_decodes = int(np.argmax(qlens != 1)) if (qlens != 1).any() else num_seqs
    if causal:
        assert (qlens[num_decodes:] > 1).all(), "decodes must come first"
    qsl = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(qlens, out=qsl[1:])
    seq_lens = ctx + qlens
    # Position of every new token: its sequence's context length plus its offset in the query.
    seq_of_token = np.repeat(np.arange(num_seqs), qlens)
    positions = np.arange(qsl[-1], dtype=np.int64) - qsl[:-1][seq_of_token] + ctx[seq_of_token]
    max_blocks = max((len(bt) for bt in block_tables), default=0)
    bt = np.zeros((num_seqs, max(max_blocks, 1)), dtype=np.int32)
    for i, row in enumerate(block_tables):
        bt[i, : len(row)] = row
    if block_tables:
        slots = bt[seq_of_token, positions // block_size].astype(np.int64) * block_size \
            + positions % block_size
    else:
        slots = np.zeros(0, dtype=np.int64)
    meta = AttentionMetadata(
        num_decodes=num_decodes,
        query_start_loc=qsl.tolist(),
        seq_lens=seq_lens.tolist(),
        seq_lens_t=torch.from_numpy(seq_lens.astype(np.int32)).to(device),
        block_tables=torch.from_numpy(bt).to(device),
        slot_mapping=torch.from_numpy(slots).to(device),
        block_size=block_size,
        causal=causal,
    )
    return torch.from_numpy(positions).to(device), meta
