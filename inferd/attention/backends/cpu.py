"""The CPU backend: `TorchSDPABackend` with inferd's own kernels for the per-step paged work.

Decodes read K/V straight from the cache blocks (`inferd/kernels/cpu_kernels.cpp`): no padded
gather copy and no masked SDPA, whose CPU kernel is built for long queries. Writes of the new
K/V are one call per layer instead of two `index_copy_`s. Prefill chunks (bf16) read their
K/V from the blocks too, with or without cached context (`csrc/prefill_attention.cpp`, on AMX
tiles where the CPU has them: 1.1-2.2x torch's bf16 flash attention on Zen 4, the most for
short prompts, and no gather of cached K/V). The block tables, slots and query rows the
kernels index with are checked against the cache once per step, not trusted.
"""
from __future__ import annotations

import ctypes

import torch

from inferd.attention.backends.torch_sdpa import TorchSDPABackend
from inferd.attention.metadata import AttentionMetadata
from inferd.kernels import cpu as kernels


class CPUBackend(TorchSDPABackend):
    name = "cpu"

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        # The prefill kernel needs AVX512-BF16, and runs on AMX tiles where the CPU has them
        # (Sapphire Rapids, 2048-token SmolLM2 step: attention 74 ms against 87-97 ms of
        # torch's SDPA plus ~20 ms of copying its output back).
        self._prefill_kernel = bool(lib.inferd_has_gemv_bf16())
        self._amx = kernels.has_amx(lib)

    def _checked(self, kv_cache: torch.Tensor, meta: AttentionMetadata) -> None:
        key = ("paged_checked", kv_cache.shape[1])
        if key not in meta.scratch:
            kernels.check_paged_metadata(meta.slot_mapping, meta.block_tables, meta.seq_lens,
                                         kv_cache.shape[1], meta.block_size)
            meta.scratch[key] = True

    def _write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  meta: AttentionMetadata) -> None:
        if k.dtype != kv_cache.dtype or v.dtype != kv_cache.dtype:
            return super()._write_kv(kv_cache, k, v, meta)
        self._checked(kv_cache, meta)
        kernels.write_kv(self.lib, kv_cache, k, v, meta.slot_mapping)

    def _decodes(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 scale: float, sliding_window: int | None,
                 soft_cap: float | None) -> torch.Tensor:
        if q.dtype != kv_cache.dtype:
            return super()._decodes(q, kv_cache, meta, scale, sliding_window, soft_cap)
        self._checked(kv_cache, meta)
        return kernels.decode_attention(self.lib, q[: meta.num_decodes], kv_cache,
                                        meta.block_tables, meta.seq_lens_t, scale,
                                        sliding_window, soft_cap, self._amx)

    def _prefills(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                  out: torch.Tensor, scale: float, sliding_window: int | None,
                  soft_cap: float | None) -> bool:
        if (not self._prefill_kernel or not meta.causal
                or not kernels.prefill_attention_applies(q, kv_cache, meta.block_size, soft_cap)):
            return False
        self._checked(kv_cache, meta)
        qs = meta.scratch.get("prefill_rows")
        if qs is None:
            kernels.check_prefill_rows(meta.query_start_loc, meta.seq_lens, q.shape[0])
            qs = meta.scratch["prefill_rows"] = torch.tensor(meta.query_start_loc,
                                                             dtype=torch.int32)
        kernels.prefill_attention(self.lib, q, kv_cache, meta.block_tables, meta.seq_lens_t, qs,
                                  meta.num_decodes, scale, sliding_window, out, self._amx)
        return True
