"""Paged decode attention in Triton: the CUDA path's fused kernel when flash-attn is absent,
and the decode attention of captured CUDA graphs whatever the backend.

One program per (sequence, KV head) reads that head's keys and values straight from the cache
blocks through the block table (any block size: flash-attn 2 pages only in multiples of 256),
for all the query heads sharing it (GQA), with an online softmax over tiles of BLOCK_N keys.
Everything it needs lives in device tensors (block tables, sequence lengths), so one launch
serves any batch of the captured size and the graph replays it unchanged.

With TRITON_INTERPRET=1 set before triton is imported, the same kernel runs on CPU tensors in
Triton's interpreter (numpy): that is how CI checks it against a float64 reference without a
GPU. It is far too slow to serve from there.
"""
from __future__ import annotations

import functools
import os

import torch

from inferd.attention.backends.torch_sdpa import TorchSDPABackend
from inferd.attention.metadata import AttentionMetadata

try:  # triton ships with torch's CUDA wheels and with xgrammar
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None
    HAS_TRITON = False

BLOCK_N = 32  # keys per softmax tile, whatever the block size (larger tiles spill registers)


def _paged_decode(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr, scale, soft_cap, window,
                  stride_qb, stride_qh, stride_ob, stride_oh, stride_kb, stride_kt, stride_kh,
                  stride_vb, stride_vt, stride_vh, stride_tb,
                  GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr,
                  HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_CAP: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_F32: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(lens_ptr + seq)
    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, HEAD_DIM_P)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, HEAD_DIM_P], tl.float32)
    first = 0
    if HAS_WINDOW:  # HF's window: the last `window` positions, the query's own included
        first = tl.maximum(seq_len - window, 0)
    start = (first // BLOCK_N) * BLOCK_N
    for n0 in range(start, seq_len, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = (n < seq_len) & (n >= first)
        block = tl.load(tables_ptr + seq * stride_tb + n // BLOCK_SIZE, mask=n < seq_len, other=0)
        row = block.to(tl.int64) * stride_kb + (n % BLOCK_SIZE) * stride_kt + kv_head * stride_kh
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        if HAS_CAP:  # cap * tanh(s / cap), tanh spelled with exp (no libdevice in the interpreter)
            e = tl.exp(tl.minimum(2.0 * s / soft_cap, 80.0))  # clamped: no overflow to inf
            s = soft_cap * (1.0 - 2.0 / (e + 1.0))
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vrow = block.to(tl.int64) * stride_vb + (n % BLOCK_SIZE) * stride_vt + kv_head * stride_vh
        v = tl.load(v_ptr + vrow[:, None] + d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if DOT_F32:  # p rounded to the cache dtype first, as the native path rounds it
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


@functools.lru_cache(maxsize=1)
def _kernel():
    # jit at first use, not at import: importing this module must not need triton. The table
    # width changes every step; specialising on it (== 1, % 16) would recompile mid-serving.
    return triton.jit(_paged_decode, do_not_specialize=["stride_tb", "window"])


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
                           soft_cap: float | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, D] (one query per sequence), kv_cache [2, blocks, block_size, Hkv, D],
    block_tables int32 [B, >= ceil(len / block_size)], seq_lens int32 [B] (>= 1 each) ->
    [B, H, D]. Block ids are trusted: callers pass the scheduler's own tables."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("paged_decode_attention runs on CPU tensors only in Triton's "
                           "interpreter (TRITON_INTERPRET=1 before triton is imported)")
    b, h, d = q.shape
    hkv = kv_cache.shape[3]
    if h % hkv or kv_cache.shape[4] != d or q.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError(f"paged_decode_attention: q {tuple(q.shape)} does not fit the cache "
                         f"{tuple(kv_cache.shape)}")
    if out is None:
        out = torch.empty_like(q)
    if b == 0:
        return out
    group = h // hkv
    keys, values = kv_cache[0], kv_cache[1]
    _kernel()[(b, hkv)](
        q, keys, values, out, block_tables, seq_lens, float(scale), float(soft_cap or 1.0),
        int(sliding_window or 0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), HEAD_DIM=d,
        HEAD_DIM_P=max(16, triton.next_power_of_2(d)), BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_N=BLOCK_N, HAS_CAP=soft_cap is not None,
        HAS_WINDOW=sliding_window is not None,
        # fp32 dots are exact (not tf32); the interpreter's dot cannot take bf16/fp16 operands.
        DOT_F32=q.dtype == torch.float32 or q.device.type == "cpu",
        # fp32 dots (FMA, not tensor cores) and 256-wide heads spill registers with 4 warps
        num_warps=8 if q.dtype == torch.float32 or d > 128 else 4)
    return out


class TritonBackend(TorchSDPABackend):
    """CUDA without flash-attn: decodes through the Triton kernel above, prefill chunks
    through torch's SDPA (flash/memory-efficient kernels on GPU)."""
    name = "triton"

    def _decodes(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 scale: float, sliding_window: int | None,
                 soft_cap: float | None) -> torch.Tensor:
        if q.dtype != kv_cache.dtype:
            if meta.static:  # SDPA would gather every row's whole max_model_len in the graph
                raise ValueError("a captured decode batch needs q in the cache's dtype")
            return super()._decodes(q, kv_cache, meta, scale, sliding_window, soft_cap)
        n = meta.num_decodes
        return paged_decode_attention(q[:n], kv_cache, meta.block_tables[:n], meta.seq_lens_t[:n],
                                      scale, sliding_window, soft_cap)
