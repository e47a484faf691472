"""Decode steps replayed from captured CUDA graphs.

A decode step of a small model on a GPU is bound by launches, not arithmetic: a dozen kernels
per layer, each a few microseconds of work. Capturing the model's forward once per batch size
and replaying it costs one launch per step. A capture fixes addresses and shapes, so each size
has its graph over static buffers (token ids, positions, slots, block tables, lengths) that a
step fills before the replay. A batch of n runs in the smallest captured size >= n; its extra
rows are token 0 at position 0, writing and reading only a scratch block the KV manager never
hands out.

Only the model's forward is captured. The LM head and sampling run eagerly on the rows that
exist: padded rows' logits would be waste, and sampling has per-request state.

With `capture=False` the same padded, static-buffer path runs eagerly: CPU tests check the
padding and the static metadata that way, without a GPU.
"""
from __future__ import annotations

import bisect
import logging
import time

import torch

from inferd.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)

MAX_DEFAULT_CAPTURE = 512


def capture_sizes(spec: list[int], max_num_seqs: int) -> list[int]:
    """vLLM's `--cuda-graph-sizes`: none -> 1, 2, 4 and multiples of 8 up to
    min(2 * max_num_seqs, 512); one value N -> that pattern up to N; several -> those. Sizes
    above --max-num-seqs are dropped (no batch is larger); --max-num-seqs itself is added when
    the pattern would stop short of it, so a full batch still replays."""
    if len(spec) > 1:
        return sorted({s for s in spec if s <= max_num_seqs}) or [1]
    top = spec[0] if spec else min(2 * max_num_seqs, MAX_DEFAULT_CAPTURE)
    sizes = {s for s in (1, 2, 4) if s <= top} | set(range(8, top + 1, 8))
    sizes = {s for s in sizes if s <= max_num_seqs}
    if top >= max_num_seqs:
        sizes.add(max_num_seqs)
    return sorted(sizes) or [1]


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, device: torch.device, sizes: list[int],
                 max_model_len: int, block_size: int, scratch_block: int, capture: bool):
        self.model = model
        self.sizes = sorted(sizes)
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.scratch_block = scratch_block
        self.capture = capture
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), scratch_block * block_size, dtype=torch.int64,
                                       device=device)
        self.block_tables = torch.full((n, self.max_blocks), scratch_block, dtype=torch.int32,
                                       device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def _meta(self, size: int) -> AttentionMetadata:
        """Fresh metadata over the static buffers: a backend's per-step scratch must be derived
        inside the capture (or, eagerly, per call), never carried over from a warm-up."""
        return AttentionMetadata(
            num_decodes=size, query_start_loc=list(range(size + 1)),
            seq_lens=[self.max_blocks * self.block_size] * size, seq_lens_t=self.seq_lens[:size],
            block_tables=self.block_tables[:size], slot_mapping=self.slot_mapping[:size],
            block_size=self.block_size, static=True)

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self._meta(size))

    @torch.inference_mode()
    def capture_all(self) -> None:
        if not self.capture:
            return
        torch.cuda.synchronize()
        t0, free0 = time.perf_counter(), torch.cuda.mem_get_info()[0]
        pool = None
        side = torch.cuda.Stream()
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its pool
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the default stream, as torch's docs ask
                for _ in range(2):  # Triton's JIT, cuBLAS handles, the allocator
                    self._forward(size)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = (graph, hidden)
        torch.cuda.synchronize()
        logger.info("Captured CUDA graphs for %d decode batch sizes (%d-%d) in %.1f s, %.2f GiB",
                    len(self.sizes), self.sizes[0], self.sizes[-1], time.perf_counter() - t0,
                    (free0 - torch.cuda.mem_get_info()[0]) / 2**30)

    def applies(self, meta: AttentionMetadata) -> bool:
        return (meta.causal and 0 < meta.num_seqs <= self.max_size
                and meta.num_decodes == meta.num_seqs
                and meta.block_tables.shape[1] <= self.max_blocks)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> torch.Tensor:
        """The step's final hidden states [n, hidden], from the graph of the smallest captured
        size that holds its n decodes (or that path run eagerly)."""
        n = meta.num_seqs
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens_t)
        # Columns past this step's widest table keep older ids: valid blocks, masked by length.
        self.block_tables[:n, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        if size > n:
            self.input_ids[n:size].zero_()
            self.positions[n:size].zero_()
            self.slot_mapping[n:size].fill_(self.scratch_block * self.block_size)
            self.seq_lens[n:size].fill_(1)
            self.block_tables[n:size, 0].fill_(self.scratch_block)
        graph = self.graphs.get(size)
        if graph is None:
            return self._forward(size)[:n]
        graph[0].replay()
        return graph[1][:n]
