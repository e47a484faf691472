"""The contract between the model runner and attention backends.

A step's batch is flat: T new tokens from B sequences, no padding. Sequences with a
single new token (decodes) come first, then sequences with several (prefill chunks),
so a backend can run all decodes as one padded batch and loop over the few prefills.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    assert all(q > 1 for q in query_lens[num_decodes:]) or not causal, "decodes must come first"
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    slots: list[int] = []
    if block_tables:
        import numpy as np
        for c, q, bt in zip(context_lens, query_lens, block_tables):
            pos = np.arange(c, c + q)
            slots.extend((np.asarray(bt, dtype=np.int64)[pos // block_size] * block_size
                          + pos % block_size).tolist())
    max_blocks = max((len(bt) for bt in block_tables), default=0)
    bt_t = torch.zeros((len(seq_lens), max(max_blocks, 1)), dtype=torch.int32)
    for i, bt in enumerate(block_tables):
        if bt:
            bt_t[i, : len(bt)] = torch.tensor(bt, dtype=torch.int32)
    return AttentionMetadata(
        num_decodes=num_decodes,
        query_start_loc=qsl,
        seq_lens=seq_lens,
        seq_lens_t=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=bt_t.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_size=block_size,
        causal=causal,
    )
