"""The Triton paged decode kernel (the CUDA path's) against a float64 reference: compiled on a
GPU where there is one, else on CPU in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 then).

The interpreter executes the kernel's own indexing, masks and online softmax; only its dots
are taken in fp32 (it cannot multiply bf16 operands), with p rounded to the cache dtype first
as the GPU path rounds it.
"""
from __future__ import annotations

import math

import pytest
import torch

triton_attn = pytest.importorskip("inferd.attention.backends.triton_attn")
if not triton_attn.HAS_TRITON:
    pytest.skip("triton not installed", allow_module_level=True)

from inferd.attention.backends.triton_attn import paged_decode_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def reference(q, cache, tables, lens, scale, window=None, cap=None):
    b, h, d = q.shape
    group, bs = h // cache.shape[3], cache.shape[2]
    out = torch.empty(b, h, d, dtype=torch.float64)
    for i in range(b):
        n = int(lens[i])
        pos = torch.arange(n)
        blocks = tables[i][pos // bs].long()
        k = cache[0][blocks, pos % bs].double()
        v = cache[1][blocks, pos % bs].double()
        for j in range(h):
            s = k[:, j // group] @ q[i, j].double() * scale
            if cap is not None:
                s = cap * torch.tanh(s / cap)
            if window is not None:
                s[pos < n - window] = -math.inf
            out[i, j] = s.softmax(0) @ v[:, j // group]
    return out


def make(h, hkv, d, bs, lens, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = 48
    cache = torch.randn(2, num_blocks, bs, hkv, d, generator=g).to(dtype)
    width = max(-(-n // bs) for n in lens) + 1  # a spare column: tables are wider than needed
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.stack([perm[(3 * i) % (num_blocks - width):][:width]
                          for i in range(len(lens))]).to(torch.int32)
    # q as the first heads of a packed projection: rows are strided, not contiguous
    qkv = torch.randn(len(lens), (h + 2 * hkv) * d, generator=g).to(dtype)
    q = qkv[:, : h * d].view(len(lens), h, d)
    return q, cache, tables, torch.tensor(lens, dtype=torch.int32)


# lengths: a lone token, inside one block, exactly a tile (32), across tiles, long
LENS = [1, 7, 32, 33, 70, 129]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("h,hkv,d,bs", [(9, 3, 64, 16), (8, 2, 128, 16), (4, 4, 80, 32),
                                        (6, 1, 32, 8), (16, 2, 64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(h, hkv, d, bs, dtype):
    q, cache, tables, lens = make(h, hkv, d, bs, LENS, dtype)
    assert not q.is_contiguous()
    out = paged_decode_attention(*on_device(q, cache, tables, lens), d ** -0.5).cpu()
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(q, cache, tables, lens, d ** -0.5),
                               atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("window,cap", [(1, None), (5, None), (40, None), (None, 3.0),
                                        (17, 30.0)])
def test_window_and_soft_cap(window, cap):
    q, cache, tables, lens = make(8, 2, 64, 16, LENS, torch.float32, seed=1)
    out = paged_decode_attention(*on_device(q, cache, tables, lens), 0.125, window, cap).cpu()
    torch.testing.assert_close(out.double(), reference(q, cache, tables, lens, 0.125, window, cap),
                               atol=2e-5, rtol=2e-5)


def test_only_the_tables_blocks_are_read():
    """Blocks outside a sequence's table (and past its length) can hold anything: NaN there
    must not reach the output."""
    q, cache, tables, lens = make(4, 2, 32, 16, [5, 20], torch.float32, seed=2)
    used = set()
    for i, n in enumerate(lens.tolist()):
        used |= set(tables[i, : -(-n // 16)].tolist())
    poisoned = cache.clone()
    for blk in range(cache.shape[1]):
        if blk not in used:
            poisoned[:, blk] = float("nan")
    poisoned[:, int(tables[0, 0]), 5:] = float("nan")  # past sequence 0's 5 tokens
    out = paged_decode_attention(*on_device(q, poisoned, tables, lens), 0.2).cpu()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), reference(q, cache, tables, lens, 0.2),
                               atol=2e-5, rtol=2e-5)


def test_refuses_a_query_that_does_not_fit_the_cache():
    q, cache, tables, lens = make(4, 2, 32, 16, [5], torch.float32)
    with pytest.raises(ValueError, match="does not fit"):
        paged_decode_attention(q[:, :3], cache, tables, lens, 0.2)  # 3 heads over 2 KV heads
    with pytest.raises(ValueError, match="does not fit"):
        paged_decode_attention(q[..., :16], cache, tables, lens, 0.2)  # head dim 16 vs 32


@pytest.mark.parametrize("splits", [2, 4, 16])
@pytest.mark.parametrize("window,cap", [(None, None), (9, None), (None, 5.0)])
def test_split_keys_merge_to_the_same_attention(splits, window, cap):
    """Flash-decoding: each sequence's keys split among programs, partial softmaxes merged.
    16 splits of the short sequences leave most splits empty."""
    q, cache, tables, lens = make(9, 3, 64, 16, LENS, torch.float32, seed=4)
    out = paged_decode_attention(*on_device(q, cache, tables, lens), 0.125, window, cap,
                                 splits=splits).cpu()
    torch.testing.assert_close(out.double(), reference(q, cache, tables, lens, 0.125, window, cap),
                               atol=2e-5, rtol=2e-5)


def test_split_count_fills_the_gpu_and_no_more(monkeypatch):
    monkeypatch.setattr(triton_attn, "_sm_count", lambda device: 132)  # an H100/H200
    cuda = torch.device("cuda")
    assert triton_attn.num_splits(1, 8, 8192, cuda) == 16  # 8 programs -> 128
    assert triton_attn.num_splits(4, 8, 8192, cuda) == 8
    assert triton_attn.num_splits(64, 8, 8192, cuda) == 1  # the batch fills the SMs
    assert triton_attn.num_splits(1, 8, 256, cuda) == 2  # 8 tiles: two splits of 4
    assert triton_attn.num_splits(1, 8, 64, cuda) == 1
    assert triton_attn.num_splits(1, 8, 8192, torch.device("cpu")) == 1
    with pytest.raises(ValueError, match="power of two"):
        q, cache, tables, lens = make(4, 2, 32, 16, [5], torch.float32)
        paged_decode_attention(q, cache, tables, lens, 0.2, splits=3)
