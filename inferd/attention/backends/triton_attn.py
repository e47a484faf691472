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


def _paged_decode(q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, tables_ptr, lens_ptr, scale, soft_cap,
                  window, stride_qb, stride_qh, stride_ob, stride_oh, stride_kb, stride_kt,
                  stride_kh, stride_vb, stride_vt, stride_vh, stride_tb,
                  GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr,
                  HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                  SPLITS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  DOT_F32: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
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
    end = seq_len
    if SPLITS > 1:  # this program's share of the key tiles; split 0 holds the first key
        per = tl.cdiv(tl.cdiv(seq_len - start, BLOCK_N), SPLITS) * BLOCK_N
        start = start + split * per
        end = tl.minimum(start + per, seq_len)
    for n0 in range(start, end, BLOCK_N):
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
    if SPLITS == 1:
        acc = acc / l_i[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:  # partials [B, H, SPLITS, HEAD_DIM_P + 2]: unnormalised acc, then m and l
        row = ((seq * (tl.num_programs(1) * GROUP) + heads) * SPLITS + split) * (HEAD_DIM_P + 2)
        tl.store(part_ptr + row[:, None] + d[None, :], acc, mask=g_ok[:, None])
        tl.store(part_ptr + row + HEAD_DIM_P, m_i, mask=g_ok)
        tl.store(part_ptr + row + HEAD_DIM_P + 1, l_i, mask=g_ok)


def _combine_splits(part_ptr, out_ptr, stride_ob, stride_oh, SPLITS: tl.constexpr,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr):
    """One program per (sequence, head): the splits' partial softmaxes merged exactly."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, HEAD_DIM_P)
    row = ((seq * tl.num_programs(1) + head) * SPLITS + sp) * (HEAD_DIM_P + 2)
    m = tl.load(part_ptr + row + HEAD_DIM_P)
    l_s = tl.load(part_ptr + row + HEAD_DIM_P + 1)
    acc = tl.load(part_ptr + row[:, None] + d[None, :])
    m_max = tl.max(m, 0)
    w = tl.exp(m - m_max)  # an empty split has m = -inf: weight 0
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_s * w, 0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d,
             out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@functools.lru_cache(maxsize=1)
def _kernels():
    # jit at first use, not at import: importing this module must not need triton. The table
    # width changes every step; specialising on it (== 1, % 16) would recompile mid-serving.
    return (triton.jit(_paged_decode, do_not_specialize=["stride_tb", "window"]),
            triton.jit(_combine_splits))


MAX_SPLITS = 16


def num_splits(batch: int, kv_heads: int, max_len: int, device: torch.device) -> int:
    """How many programs share one (sequence, KV head)'s keys: enough for the grid to cover
    about twice the GPU's SMs (batch 1 with 8 KV heads is 8 programs otherwise), never so
    many that a split has fewer than 4 tiles of the longest context. A power of two."""
    if device.type != "cuda":
        return 1
    want = min(-(-2 * _sm_count(device) // (batch * kv_heads)), max_len // (4 * BLOCK_N),
               MAX_SPLITS)
    return 1 << (max(want, 1).bit_length() - 1)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float, sliding_window: int | None,
                     soft_cap: float | None) -> torch.Tensor:
    """The step's first meta.num_decodes rows (one query each) through the kernel, split by
    the longest context the host knows of (a captured batch's: the whole table)."""
    n = meta.num_decodes
    splits = meta.scratch.get("triton_splits")
    if splits is None:  # the same in every layer: one host pass over the batch per step
        splits = meta.scratch["triton_splits"] = num_splits(
            n, kv_cache.shape[3], max(meta.seq_lens[:n]), q.device)
    return paged_decode_attention(q[:n], kv_cache, meta.block_tables[:n], meta.seq_lens_t[:n],
                                  scale, sliding_window, soft_cap, splits=splits)


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
                           soft_cap: float | None = None, out: torch.Tensor | None = None,
                           splits: int = 1) -> torch.Tensor:
    """q [B, H, D] (one query per sequence), kv_cache [2, blocks, block_size, Hkv, D],
    block_tables int32 [B, >= ceil(len / block_size)], seq_lens int32 [B] (>= 1 each) ->
    [B, H, D]. Block ids are trusted: callers pass the scheduler's own tables. `splits` (a
    power of two, see `num_splits`) divides each sequence's keys among that many programs,
    whose partial softmaxes a second kernel merges (flash-decoding)."""
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
    if splits < 1 or splits & (splits - 1) or splits > MAX_SPLITS:
        raise ValueError(f"splits={splits} is not a power of two up to {MAX_SPLITS}")
    group = h // hkv
    keys, values = kv_cache[0], kv_cache[1]
    head_p = max(16, triton.next_power_of_2(d))
    part = (torch.empty(b, h, splits, head_p + 2, dtype=torch.float32, device=q.device)
            if splits > 1 else out)  # unused by the single-split kernel
    decode, combine = _kernels()
    decode[(b, hkv, splits)](
        q, keys, values, out, part, block_tables, seq_lens, float(scale), float(soft_cap or 1.0),
        int(sliding_window or 0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), HEAD_DIM=d,
        HEAD_DIM_P=head_p, BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_N=BLOCK_N, SPLITS=splits, HAS_CAP=soft_cap is not None,
        HAS_WINDOW=sliding_window is not None,
        # fp32 dots are exact (not tf32); the interpreter's dot cannot take bf16/fp16 operands.
        DOT_F32=q.dtype == torch.float32 or q.device.type == "cpu",
        # fp32 dots (FMA, not tensor cores) and 256-wide heads spill registers with 4 warps
        num_warps=8 if q.dtype == torch.float32 or d > 128 else 4)
    if splits > 1:
        combine[(b, h)](part, out, out.stride(0), out.stride(1), SPLITS=splits, HEAD_DIM=d,
                        HEAD_DIM_P=head_p)
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
        return decode_attention(q, kv_cache, meta, scale, sliding_window, soft_cap)
