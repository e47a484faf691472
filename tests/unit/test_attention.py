"""Attention backends against a naive per-sequence float64 reference.

One step mixes decodes (one new token, some cached context) with prefill chunks (several new
tokens, with and without cached context), GQA heads, blocks scattered through the pool, and
optionally a sliding window and tanh logit soft-capping.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from inferd.attention.backends import flash as flash_module
from inferd.attention.backends import get_attention_backend
from inferd.attention.backends.common import context_slots, write_kv_cache
from inferd.attention.backends.cpu import CPUBackend
from inferd.attention.backends.torch_sdpa import TorchSDPABackend
from inferd.attention.metadata import build_attention_metadata
from inferd.kernels import cpu as cpu_kernels

H, HKV, D, BLOCK = 4, 2, 16, 4
NUM_BLOCKS = 64


def naive_attention(q, k, v, q_pos, causal, window, soft_cap, scale):
    """q [Lq, H, D], k/v [L, Hkv, D] of ONE sequence; q_pos [Lq] absolute positions."""
    q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(H // HKV, dim=1)
    v = v.repeat_interleave(H // HKV, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if soft_cap is not None:
        scores = torch.tanh(scores / soft_cap) * soft_cap
    kp = torch.arange(k.shape[0])[None, :]
    qp = q_pos[:, None]
    keep = torch.ones(len(q_pos), k.shape[0], dtype=torch.bool)
    if causal:
        keep &= kp <= qp
        if window is not None:
            keep &= kp > qp - window
    elif window is not None:
        keep &= (kp - qp).abs() < window
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def make_step(context_lens, query_lens, dtype=torch.float32, seed=0):
    """A cache holding each sequence's context, the new q/k/v, metadata and full histories."""
    g = torch.Generator().manual_seed(seed)
    kv_cache = torch.randn(2, NUM_BLOCKS, BLOCK, HKV, D, generator=g).to(dtype)  # garbage elsewhere
    perm = torch.randperm(NUM_BLOCKS, generator=g).tolist()  # blocks scattered through the pool
    tables, hist_k, hist_v = [], [], []
    for c, ql in zip(context_lens, query_lens):
        n = -(-(c + ql) // BLOCK)
        tables.append([perm.pop() for _ in range(n)])
        hist_k.append(torch.randn(c + ql, HKV, D, generator=g).to(dtype))
        hist_v.append(torch.randn(c + ql, HKV, D, generator=g).to(dtype))
    # Write the cached contexts through the same path a previous step would have used.
    ctx_meta = build_attention_metadata([0] * len(context_lens), list(context_lens), tables, BLOCK,
                                        causal=False)
    if sum(context_lens):
        write_kv_cache(kv_cache, torch.cat([hk[:c] for hk, c in zip(hist_k, context_lens)]),
                       torch.cat([hv[:c] for hv, c in zip(hist_v, context_lens)]),
                       ctx_meta.slot_mapping)
    meta = build_attention_metadata(list(context_lens), list(query_lens), tables, BLOCK)
    q = torch.randn(sum(query_lens), H, D, generator=g).to(dtype)
    k = torch.cat([hk[c:] for hk, c in zip(hist_k, context_lens)])
    v = torch.cat([hv[c:] for hv, c in zip(hist_v, context_lens)])
    return kv_cache, meta, q, k, v, hist_k, hist_v


def reference(meta, q, hist_k, hist_v, causal, window, soft_cap, scale):
    outs = []
    for i in range(meta.num_seqs):
        s, e = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        q_pos = torch.arange(meta.context_len(i), meta.seq_lens[i])
        outs.append(naive_attention(q[s:e], hist_k[i], hist_v[i], q_pos, causal, window,
                                    soft_cap, scale))
    return torch.cat(outs)


# decodes first (contexts 5, 17, 0, 12), then prefill chunks: three fresh of 7 (one batched
# call), with context (9 + 6, 3 + 5), fresh again (4)
CONTEXTS = [5, 17, 0, 12, 0, 0, 0, 9, 3, 0]
QUERIES = [1, 1, 1, 1, 7, 7, 7, 6, 5, 4]


def cpu_backend() -> CPUBackend:
    lib = cpu_kernels.load()
    if lib is None:  # CI machines have g++; this only skips on a machine without a compiler
        pytest.skip("CPU kernels unavailable (no C++ compiler)")
    return CPUBackend(lib)


def triton_backend():
    from inferd.attention.backends.triton_attn import HAS_TRITON, TritonBackend
    if not HAS_TRITON:  # installed with xgrammar, so only a partial install skips
        pytest.skip("triton not installed")
    if os.environ.get("TRITON_INTERPRET") != "1":  # a GPU machine: tests/models/test_cuda.py
        pytest.skip("the Triton kernel takes CPU tensors only in Triton's interpreter")
    return TritonBackend()  # its decode kernel in Triton's interpreter (tests/conftest.py)


BACKENDS = {"torch": TorchSDPABackend, "cpu": cpu_backend, "triton": triton_backend}
# Tolerances against the float64 reference: fp32 accumulation in every backend; the 16-bit
# formats round inputs and outputs (bf16 keeps 8 bits of mantissa).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("soft_cap", [None, 5.0])
def test_mixed_decode_and_prefill(backend, dtype, window, soft_cap):
    kv_cache, meta, q, k, v, hk, hv = make_step(CONTEXTS, QUERIES, dtype)
    assert meta.num_decodes == 4
    scale = 1 / math.sqrt(D)
    out = BACKENDS[backend]().forward(q, k, v, kv_cache, meta, scale=scale,
                                      sliding_window=window, logits_soft_cap=soft_cap)
    ref = reference(meta, q, hk, hv, True, window, soft_cap, scale)
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    # the new K/V landed in the cache at their slots
    flat = kv_cache.flatten(1, 2)
    torch.testing.assert_close(flat[0][meta.slot_mapping], k)
    torch.testing.assert_close(flat[1][meta.slot_mapping], v)


def test_decodes_run_as_one_batched_call(monkeypatch):
    """No Python loop over decodes: SDPA is called once for 4 decodes, once for the run of
    equal fresh prefills, and once per other prefill."""
    import inferd.attention.backends.torch_sdpa as mod

    calls = []
    real = mod.F.scaled_dot_product_attention

    def counting(q, *a, **kw):
        calls.append(q.shape[0])
        return real(q, *a, **kw)

    monkeypatch.setattr(mod.F, "scaled_dot_product_attention", counting)
    kv_cache, meta, q, k, v, _, _ = make_step(CONTEXTS, QUERIES)
    TorchSDPABackend().forward(q, k, v, kv_cache, meta, scale=0.25)
    assert calls == [4, 3, 1, 1, 1]


@pytest.mark.parametrize("causal", [False, True])
def test_no_cache(causal):
    """Encoders (bidirectional) and cache-less causal runs attend within each sequence."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(10, H, D, generator=g)
    k = torch.randn(10, HKV, D, generator=g)
    v = torch.randn(10, HKV, D, generator=g)
    meta = build_attention_metadata([0, 0, 0], [1, 3, 6], [], BLOCK, causal=causal)
    out = TorchSDPABackend().forward(q, k, v, None, meta, scale=0.3)
    hk = [k[s:e] for s, e in zip(meta.query_start_loc, meta.query_start_loc[1:])]
    hv = [v[s:e] for s, e in zip(meta.query_start_loc, meta.query_start_loc[1:])]
    ref = reference(meta, q, hk, hv, causal, None, None, 0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_context_slots_matches_block_tables():
    _, meta, *_ = make_step(CONTEXTS, QUERIES)
    expected = []
    for i in range(meta.num_seqs):
        table = meta.block_tables[i].tolist()
        expected += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(meta.seq_lens[i])]
    assert context_slots(meta).tolist() == expected


def fake_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_size,
                      softcap, block_table=None):
    """flash_attn_varlen_func's documented semantics, in float64: bottom-right-aligned causal
    mask; window (left, right) keeps keys in [i + Lk - Lq - left, i + Lk - Lq + right]."""
    assert block_table is None and q.dtype == torch.bfloat16
    outs = []
    for i in range(len(cu_q) - 1):
        qi = q[cu_q[i]:cu_q[i + 1]].double()
        ki = k[cu_k[i]:cu_k[i + 1]].double().repeat_interleave(H // HKV, 1)
        vi = v[cu_k[i]:cu_k[i + 1]].double().repeat_interleave(H // HKV, 1)
        s = torch.einsum("qhd,khd->hqk", qi, ki) * softmax_scale
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        shift = ki.shape[0] - qi.shape[0]
        rel = torch.arange(ki.shape[0])[None, :] - (torch.arange(qi.shape[0])[:, None] + shift)
        keep = torch.ones_like(rel, dtype=torch.bool)
        if causal:
            keep &= rel <= 0
        if window_size[0] >= 0:
            keep &= rel >= -window_size[0]
        if window_size[1] >= 0:
            keep &= rel <= window_size[1]
        outs.append(torch.einsum("hqk,khd->qhd", s.masked_fill(~keep, -math.inf).softmax(-1), vi))
    return torch.cat(outs).to(q.dtype)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("triton_decodes", [False, True])
def test_flash_backend_call_contract(monkeypatch, window, triton_decodes):
    """The CUDA backend's inputs to flash-attn (packed context, cu_seqlens, window) are right,
    for the whole batch or (with triton) for the prefills alone, decodes read in place.

    flash-attn cannot run here, so a float64 emulation of its documented API stands in."""
    if triton_decodes:
        triton_backend()  # skips where the Triton kernel cannot run on CPU tensors
    calls = []

    def fake(q, k, *args, **kw):
        calls.append((q.shape[0], k.shape[0]))
        return fake_flash_varlen(q, k, *args, **kw)
    monkeypatch.setattr(flash_module, "flash_attn_varlen_func", fake)
    kv_cache, meta, q, k, v, hk, hv = make_step(CONTEXTS, QUERIES, dtype=torch.bfloat16)
    backend = flash_module.FlashAttentionBackend()
    backend._triton_decodes = triton_decodes
    out = backend.forward(q, k, v, kv_cache, meta, scale=0.25, sliding_window=window,
                          logits_soft_cap=4.0)
    ref = reference(meta, q, hk, hv, True, window, 4.0, 0.25)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    first = meta.num_decodes if triton_decodes else 0
    # one varlen call over the prefills' rows and only their contexts (or everyone's)
    assert calls == [(meta.num_tokens - meta.query_start_loc[first], sum(meta.seq_lens[first:]))]


def test_backend_selection():
    expected_cpu = "cpu" if cpu_kernels.load() is not None else "torch_sdpa"
    assert get_attention_backend("cpu").name == expected_cpu
    from inferd.attention.backends.triton_attn import HAS_TRITON
    expected = ("flash_attn" if flash_module.HAS_FLASH_ATTN
                else "triton" if HAS_TRITON else "torch_sdpa")
    assert get_attention_backend("cuda").name == expected
