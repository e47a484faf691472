"""`PagedRunner`: drive one of our models step by step over a paged KV cache, as the model
runner would, without the engine around it (model and quantization tests).

Importable from any test: pytest puts tests/ on sys.path for its conftest.py."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from inferd.attention.metadata import build_attention_metadata


@dataclass
class PagedRunner:
    """Drives one of our models step by step over a paged KV cache, as the model runner would.

    Blocks come from a shuffled free list so sequences interleave through the pool."""
    model: Any
    block_size: int = 4
    num_blocks: int = 256
    free: list[int] = field(default_factory=list)
    tables: dict[int, list[int]] = field(default_factory=dict)
    lens: dict[int, int] = field(default_factory=dict)  # tokens already in cache per sequence
    dtype: torch.dtype = torch.float32  # of the KV cache: the model's

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.free = torch.randperm(self.num_blocks, generator=g).tolist()
        for layer in self.model.attention_layers():
            layer.kv_cache = torch.zeros(2, self.num_blocks, self.block_size, layer.num_kv_heads,
                                         layer.head_dim, dtype=self.dtype)

    def step(self, chunks: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """chunks: (seq id, new token ids), decodes first. Returns logits [n_new, V] per chunk."""
        ctx, qlens, tables, ids, pos = [], [], [], [], []
        for sid, toks in chunks:
            c = self.lens.get(sid, 0)
            table = self.tables.setdefault(sid, [])
            while len(table) * self.block_size < c + len(toks):
                table.append(self.free.pop())
            ctx.append(c)
            qlens.append(len(toks))
            tables.append(list(table))
            ids += toks
            pos += range(c, c + len(toks))
            self.lens[sid] = c + len(toks)
        meta = build_attention_metadata(ctx, qlens, tables, self.block_size)
        with torch.no_grad():
            hidden = self.model(torch.tensor(ids), torch.tensor(pos), meta)
            logits = self.model.compute_logits(hidden)
        return list(logits.split(qlens))
