"""inferd's CPU kernels (inferd/kernels) against torch on the same inputs.

The attention backend tests (test_attention.py) cover the kernels at a small head size through
the generic path; here the model-sized head dims take the vectorised paths, with long paged
contexts, scattered blocks and every dtype.
"""
from __future__ import annotations

import math

import pytest
import torch

from inferd.attention.backends.torch_sdpa import TorchSDPABackend
from inferd.attention.metadata import build_attention_metadata
from inferd.kernels import cpu as kernels


@pytest.fixture(scope="module", params=["native", "x86-64-v2"])
def lib(request):
    """The library the engine loads, and a portable build (no AVX-512): the scalar paths
    every other CPU takes get the same checks."""
    native = kernels.load()
    if native is None:
        pytest.skip("CPU kernels unavailable (no C++ compiler)")
    if request.param == "native":
        return native
    return kernels.open_library(kernels.build(kernels._compiler(), march=request.param))


def paged_decode_case(heads, kv_heads, head_dim, contexts, dtype, block_size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(c + 1) // block_size) for c in contexts) + 8
    kv = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[perm.pop() for _ in range(-(-(c + 1) // block_size))] for c in contexts]
    meta = build_attention_metadata(list(contexts), [1] * len(contexts), tables, block_size)
    q = torch.randn(len(contexts), heads, head_dim, generator=g).to(dtype)
    return kv, meta, q


TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (8, 2, 128), (4, 1, 256),
                                                        (6, 6, 48)])
@pytest.mark.parametrize("window, soft_cap", [(None, None), (37, None), (None, 30.0)])
@pytest.mark.parametrize("amx", [False, True], ids=["noamx", "amx"])
def test_decode_attention_matches_sdpa(lib, dtype, heads, kv_heads, head_dim, window, soft_cap,
                                       amx):
    if amx and not kernels.has_amx(lib):
        pytest.skip("no AMX here")
    # every context length mod 16 (block size, and the kernels' 16-key groups), long ones
    contexts = list(range(34)) + [200, 333]
    kv, meta, q = paged_decode_case(heads, kv_heads, head_dim, contexts, dtype)
    scale = 1 / math.sqrt(head_dim)
    ours = kernels.decode_attention(lib, q, kv, meta.block_tables, meta.seq_lens_t, scale,
                                    window, soft_cap, use_amx=amx)
    # torch's path in float64 over the same cache is the reference
    ref = TorchSDPABackend()._decodes(q.double(), kv.double(), meta, scale, window, soft_cap)
    assert ours.dtype == dtype and ours.shape == q.shape
    torch.testing.assert_close(ours.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (8, 2, 128), (4, 1, 256),
                                                        (32, 8, 128)])
@pytest.mark.parametrize("amx", [False, True], ids=["noamx", "amx"])
def test_decode_attention_work_split_gives_the_same_bits(lib, dtype, heads, kv_heads, head_dim,
                                                         amx):
    """Many sequences run as whole-sequence items (all KV heads in one sweep; on AMX, as
    many KV heads as fit 16 query heads), one sequence split by KV head across threads: the
    same arithmetic per head, so the same bits."""
    if amx and not kernels.has_amx(lib):
        pytest.skip("no AMX here")
    contexts = [3, 16, 17, 40, 200, 61, 9, 128]
    kv, meta, q = paged_decode_case(heads, kv_heads, head_dim, contexts, dtype)
    batched = kernels.decode_attention(lib, q, kv, meta.block_tables, meta.seq_lens_t, 0.125,
                                       None, None, use_amx=amx)
    for i in range(len(contexts)):
        alone = kernels.decode_attention(lib, q[i:i + 1], kv, meta.block_tables[i:i + 1],
                                         meta.seq_lens_t[i:i + 1], 0.125, None, None,
                                         use_amx=amx)
        assert torch.equal(alone[0], batched[i]), i


def test_decode_attention_on_amx_never_reads_past_the_keys(lib):
    """Cache rows past a sequence's last key (the rest of its last block) and before a
    sliding window may hold anything: NaN there must not reach the output."""
    if not kernels.has_amx(lib):
        pytest.skip("no AMX here")
    contexts = [5, 16, 33, 200]
    kv, meta, q = paged_decode_case(9, 3, 64, contexts, torch.bfloat16)
    tables = meta.block_tables.tolist()
    for window in (None, 37):
        poisoned = kv.clone()
        for i, n in enumerate(contexts):  # keys 0 .. n (the query's own key is n)
            first = 0 if window is None else max(0, n + 1 - window)
            outside = [*range(first), *range(n + 1, -(-(n + 1) // 16) * 16)]
            for pos in outside:
                poisoned[:, tables[i][pos // 16], pos % 16] = float("nan")
        a = kernels.decode_attention(lib, q, poisoned, meta.block_tables, meta.seq_lens_t,
                                     0.125, window, None, use_amx=True)
        b = kernels.decode_attention(lib, q, kv, meta.block_tables, meta.seq_lens_t, 0.125,
                                     window, None, use_amx=True)
        assert not a.isnan().any()
        assert torch.equal(a, b)


def test_decode_attention_reads_strided_queries(lib):
    """q as the first heads of a fused [T, H + Hkv, D] tensor (how the models pass it)."""
    kv, meta, q = paged_decode_case(9, 3, 64, [5, 40], torch.float32)
    fused = torch.cat([q, torch.randn(2, 3, 64)], 1)
    strided = fused[:, :9]
    assert not strided.is_contiguous()
    a = kernels.decode_attention(lib, strided, kv, meta.block_tables, meta.seq_lens_t, 0.1, None,
                                 None)
    b = kernels.decode_attention(lib, q, kv, meta.block_tables, meta.seq_lens_t, 0.1, None, None)
    assert torch.equal(a, b)


def test_write_kv_matches_index_copy(lib):
    kv = torch.zeros(2, 8, 4, 3, 16, dtype=torch.bfloat16)
    ref = kv.clone()
    qkv = torch.randn(5, 9 + 3 + 3, 16).to(torch.bfloat16)
    k, v = qkv[:, 9:12], qkv[:, 12:]
    slots = torch.tensor([3, 0, 31, 17, 8])
    kernels.write_kv(lib, kv, k, v, slots)
    ref.flatten(1, 2)[0].index_copy_(0, slots, k)
    ref.flatten(1, 2)[1].index_copy_(0, slots, v)
    assert torch.equal(kv, ref)


def test_metadata_out_of_range_is_refused():
    tables = torch.tensor([[0, 7]], dtype=torch.int32)
    ok = torch.tensor([0, 31])
    kernels.check_paged_metadata(ok, tables, [20], num_blocks=8, block_size=16)
    with pytest.raises(ValueError, match="slot out of range"):
        kernels.check_paged_metadata(torch.tensor([128]), tables, [20], 8, 16)
    with pytest.raises(ValueError, match="block id out of range"):
        kernels.check_paged_metadata(ok, torch.tensor([[0, 8]], dtype=torch.int32), [20], 8, 16)
    with pytest.raises(ValueError, match="longer than its block table"):
        kernels.check_paged_metadata(ok, tables, [33], 8, 16)


def test_wrong_dtype_or_layout_is_refused(lib):
    kv, meta, q = paged_decode_case(4, 2, 64, [3], torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        kernels.decode_attention(lib, q.bfloat16(), kv, meta.block_tables, meta.seq_lens_t, 1.0,
                                 None, None)
    with pytest.raises(ValueError, match="layout"):
        kernels.decode_attention(lib, q.transpose(0, 1), kv, meta.block_tables,
                                 meta.seq_lens_t, 1.0, None, None)


@pytest.mark.parametrize("cols", [1, 15, 16, 17, 49152])
def test_argmax_matches_torch(lib, cols):
    g = torch.Generator().manual_seed(cols)
    x = torch.randn(9, cols, generator=g)
    x[1] = float("-inf")                       # all -inf: index 0
    x[2, -1] = 1e30                             # maximum in the scalar tail
    x[3] = 0.5                                  # all tied: the first
    if cols > 3:
        x[4, 2] = x[4, 3] = float("nan")        # NaN wins, the first one
        x[5, 1] = x[5, cols - 1] = 1e30         # tie between first and last
    x[6, 0] = float("nan")
    x[7, -1] = float("nan")                     # a NaN only in the tail
    x[8] = float("inf")
    assert torch.equal(kernels.argmax(lib, x), x.argmax(-1))


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("INFERD_CPU_KERNELS", "0")
    kernels.load.cache_clear()
    try:
        assert kernels.load() is None
    finally:
        monkeypatch.delenv("INFERD_CPU_KERNELS")
        kernels.load.cache_clear()
    assert kernels.load() is not None


def test_build_is_cached_and_keyed_by_source(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cxx = kernels._compiler()
    if cxx is None:
        pytest.skip("no compiler")
    path = kernels.build(cxx)
    assert path.parent == tmp_path / "inferd" / "kernels" and path.exists()
    mtime = path.stat().st_mtime_ns
    assert kernels.build(cxx) == path and path.stat().st_mtime_ns == mtime  # no rebuild
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


def torch_rms_norm(x, w, eps, gemma):
    """The eager ops of inferd.models.layers.norm (HF's rounding)."""
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (n * (1.0 + w.float())).to(x.dtype) if gemma else w * n.to(x.dtype)


def bits_differ(a, b):
    """Fraction of elements whose bits differ."""
    return (a != b).float().mean().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [576, 640, 37])
@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_rounds_like_torch(lib, dtype, dim, gemma):
    g = torch.Generator().manual_seed(dim)
    x = (torch.randn(33, dim, generator=g) * 3).to(dtype)
    w = (torch.randn(dim, generator=g) * 0.5 + (0 if gemma else 1)).to(dtype)
    ours = kernels.rms_norm(lib, x, w, 1e-6, gemma)
    ref = torch_rms_norm(x, w, 1e-6, gemma)
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    else:  # the same bits, except where fp32 summation order moves a value across a rounding
        assert bits_differ(ours, ref) < 0.002
        torch.testing.assert_close(ours.float(), ref.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_fuses_the_residual_add(lib, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 576, generator=g).to(dtype)
    res = torch.randn(5, 576, generator=g).to(dtype)
    w = torch.randn(576, generator=g).to(dtype)
    expected_res = res + x
    expected = torch_rms_norm(expected_res, w, 1e-5, False)
    res_in = res.clone()
    out = kernels.rms_norm(lib, x, w, 1e-5, False, residual=res_in)
    assert torch.equal(res_in, expected_res)  # the add is one rounding, exactly torch's
    torch.testing.assert_close(out.float(), expected.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 256, 20])
def test_rotary_matches_apply_rotary(lib, dtype, head_dim):
    from inferd.models.layers.rotary import RotaryEmbedding, apply_rotary
    rope = RotaryEmbedding(head_dim, {"rope_type": "default", "rope_theta": 10000.0}, 4096, dtype)
    positions = torch.tensor([0, 1, 7, 100, 4000])
    cos, sin = rope(positions)
    qkv = torch.randn(5, 9 + 3 + 3, head_dim).to(dtype)
    qk = qkv[:, :12]  # strided: rows of the fused projection
    ref = apply_rotary(qk.contiguous(), cos, sin)
    kernels.rotary_(lib, qk, cos, sin)
    assert torch.equal(qkv[:, :12], ref)  # bit for bit: same products, same roundings
    assert torch.equal(qkv[:, 12:], qkv[:, 12:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("n", [1536, 17])
def test_act_and_mul_matches_torch(lib, dtype, act, n):
    from inferd.models.layers.activation import ActAndMul
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(7, 2 * n, generator=g) * 4).to(dtype)
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # saturated and zero inputs
    ours = kernels.act_and_mul(lib, x, act)
    ref = ActAndMul(act)(x)
    if dtype == torch.float32:  # 1 + tanh(y) carries ~1e-7 of absolute error in both
        torch.testing.assert_close(ours, ref, atol=2e-6, rtol=1e-5)
    else:  # exp differs from torch's by an ulp of fp32, rarely enough to flip a 16-bit rounding
        assert bits_differ(ours, ref) < 0.01
        torch.testing.assert_close(ours.float(), ref.float(), atol=1e-2, rtol=1e-2)


@pytest.fixture(scope="module")
def bf16_lib(lib):
    if not lib.inferd_has_gemv_bf16():
        pytest.skip("this CPU has no AVX512-BF16: the skinny matmuls are not built")
    return lib


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n, k", [(49, 576), (3072, 37), (16, 1536)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_bf16_matches_linear(bf16_lib, m, n, k, bias):
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    ours = kernels.gemv_bf16(bf16_lib, x, w, b)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    assert ours.dtype == torch.bfloat16 and ours.shape == (m, n)
    # fp32 accumulation rounded once to bf16: within one bf16 rounding of the exact result
    torch.testing.assert_close(ours.double(), ref, atol=1e-3 * k ** 0.5, rtol=8e-3)
    torch.testing.assert_close(ours.float(), F.linear(x, w, b).float(), atol=0.05, rtol=1e-2)


def gguf_blocks(qtype_name, n, k, seed=0):
    """Real GGUF blocks from gguf's own quantizer, with its dequantized weights."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants
    qtype = GGMLQuantizationType[qtype_name]
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    raw = quants.quantize(w, qtype)  # uint8 [n, k / 32 * type_size]
    blocks = torch.from_numpy(np.ascontiguousarray(raw)).view(n, k // 32, -1)
    dequant = torch.from_numpy(quants.dequantize(raw, qtype).reshape(n, k))
    return qtype, blocks, dequant


@pytest.mark.parametrize("qtype_name", ["Q4_0", "Q4_1"])
def test_q4_blocks_split_to_the_same_weights(qtype_name):
    from inferd.models.layers.quant import q4_from_blocks
    qtype, blocks, dequant = gguf_blocks(qtype_name, 24, 96)
    q4 = q4_from_blocks(qtype, blocks)
    q = torch.cat([q4.qs & 0x0F, q4.qs >> 4], dim=-1).float()  # [n, nb, 32], element order
    w = (q4.d[..., None] * q + q4.m[..., None]).reshape(24, 96)
    torch.testing.assert_close(w, dequant, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("qtype_name", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("m", [1, 2, 4, 7])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_q4_matches_the_dequantized_weights(bf16_lib, qtype_name, m, bias):
    from inferd.models.layers.quant import q4_from_blocks
    qtype, blocks, dequant = gguf_blocks(qtype_name, 200, 576, seed=m)
    q4 = q4_from_blocks(qtype, blocks)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 576, generator=g).bfloat16()
    b = torch.randn(200, generator=g).bfloat16() if bias else None
    ours = kernels.gemv_q4(bf16_lib, x, q4, b)
    # exact weights in fp64: the kernel multiplies the blocks as stored, never rounding them
    ref = x.double() @ dequant.double().T + (b.double() if bias else 0)
    torch.testing.assert_close(ours.double(), ref, atol=2e-3, rtol=8e-3)


@pytest.mark.parametrize("qtype_name", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("m", [1, 4, 13, 16, 17, 40, 64, 70])
@pytest.mark.parametrize("n", [200, 96])
@pytest.mark.parametrize("k", [576, 1536])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_q4_matches_the_dequantized_weights(bf16_lib, qtype_name, m, n, k, bias):
    from inferd.models.layers.quant import q4_from_blocks
    qtype, blocks, dequant = gguf_blocks(qtype_name, n, k, seed=m)
    q4 = q4_from_blocks(qtype, blocks)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    ours = kernels.gemm_q4(bf16_lib, x, q4, b)
    # AMX tiles hold the weights rounded to bf16, as the bf16 path's weights are; the AVX512
    # kernel multiplies the blocks as stored (its weights are 128 + q, exact in bf16)
    w = dequant.bfloat16().double() if kernels.has_amx(bf16_lib) else dequant.double()
    ref = x.double() @ w.T + (b.double() if bias else 0)
    assert ours.shape == (m, n)
    torch.testing.assert_close(ours.double(), ref, atol=2e-3, rtol=8e-3)


def test_gemm_q4_avx512_on_a_strided_input(bf16_lib):
    """x as rows of a wider tensor (a slice of a fused projection), ragged last tile."""
    from inferd.models.layers.quant import q4_from_blocks
    if kernels.has_amx(bf16_lib):
        pytest.skip("AMX takes this path")
    qtype, blocks, dequant = gguf_blocks("Q4_1", 40, 64)
    q4 = q4_from_blocks(qtype, blocks)
    wide = torch.randn(9, 100).bfloat16()
    x = wide[:, 4:68]
    ours = kernels.gemm_q4(bf16_lib, x, q4, None)
    ref = x.double() @ dequant.double().T
    torch.testing.assert_close(ours.double(), ref, atol=2e-3, rtol=8e-3)
    assert q4.tiles().tq.shape == (3, 2, 8, 32)  # 40 rows -> 3 tiles, the last zero-padded
    assert int(q4.tiles().tq[2, :, :, 16:].count_nonzero()) == 0


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_q8_matches_the_dequantized_weights(bf16_lib, m, bias):
    from inferd.models.layers.quant import q8_from_blocks
    qtype, blocks, dequant = gguf_blocks("Q8_0", 300, 576, seed=m)
    q8 = q8_from_blocks(blocks)
    w = (q8.d[..., None] * q8.qs.float()).reshape(300, 576)
    torch.testing.assert_close(w, dequant, atol=1e-6, rtol=1e-6)  # the split is exact
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 576, generator=g).bfloat16()
    b = torch.randn(300, generator=g).bfloat16() if bias else None
    ours = kernels.gemv_q8(bf16_lib, x, q8, b)
    ref = x.double() @ dequant.double().T + (b.double() if bias else 0)
    torch.testing.assert_close(ours.double(), ref, atol=2e-3, rtol=8e-3)


def paged_prefill_case(heads, kv_heads, head_dim, cases, seed=0, block_size=16):
    """(context, query rows) per sequence; the cache already holds every position's K/V."""
    g = torch.Generator().manual_seed(seed)
    lens = [c + n for c, n in cases]
    num_blocks = sum(-(-n // block_size) for n in lens) + 4
    kv = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).bfloat16()
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[perm.pop() for _ in range(-(-n // block_size))] for n in lens]
    meta = build_attention_metadata([c for c, _ in cases], [n for _, n in cases], tables,
                                    block_size)
    q = torch.randn(sum(n for _, n in cases), heads, head_dim, generator=g).bfloat16()
    return kv, meta, q, tables


def prefill_reference(kv, meta, q, tables, scale, window, block_size=16):
    """Every query row against its sequence's positions, in float64, masked as a causal LM."""
    heads, kv_heads = q.shape[1], kv.shape[3]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(meta.num_seqs):
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        length = meta.seq_lens[i]
        slots = [tables[i][p // block_size] * block_size + p % block_size for p in range(length)]
        k = kv[0].reshape(-1, kv_heads, kv.shape[-1])[slots].double()  # [L, Hkv, D]
        v = kv[1].reshape(-1, kv_heads, kv.shape[-1])[slots].double()
        qpos = torch.arange(length - (end - start), length)[:, None]
        kpos = torch.arange(length)[None, :]
        keep = kpos <= qpos
        if window:
            keep &= kpos > qpos - window
        for h in range(heads):
            g = h // (heads // kv_heads)
            s = (q[start:end, h].double() @ k[:, g].T) * scale
            p = s.masked_fill(~keep, float("-inf")).softmax(-1)
            out[start:end, h] = p @ v[:, g]
    return out


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (8, 2, 128), (4, 1, 256),
                                                        (6, 6, 32)])
@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("amx", [False, True], ids=["avx512bf16", "amx"])
def test_prefill_attention_matches_the_reference(bf16_lib, heads, kv_heads, head_dim, window, amx):
    from inferd.attention.backends.cpu import CPUBackend
    if amx and not kernels.has_amx(bf16_lib):
        pytest.skip("no AMX on this CPU")
    # a decode first, then fresh prompts, prefix-cache hits and chunks of every alignment
    cases = [(5, 1), (0, 2), (0, 16), (0, 33), (37, 20), (64, 16), (3, 130), (0, 300)]
    kv, meta, q, tables = paged_prefill_case(heads, kv_heads, head_dim, cases)
    assert meta.num_decodes == 1
    scale = 1 / math.sqrt(head_dim)
    out = torch.full_like(q, 7.0)
    backend = CPUBackend(bf16_lib)
    if amx == backend._amx:  # the backend's own choice
        assert backend._prefills(q, kv, meta, out, scale, window, None)
    else:
        kernels.check_prefill_rows(meta.query_start_loc, meta.seq_lens, q.shape[0])
        qs = torch.tensor(meta.query_start_loc, dtype=torch.int32)
        kernels.prefill_attention(bf16_lib, q, kv, meta.block_tables, meta.seq_lens_t, qs,
                                  meta.num_decodes, scale, window, out, use_amx=amx)
    ref = prefill_reference(kv, meta, q, tables, scale, window)
    assert torch.equal(out[0], torch.full_like(q[0], 7.0))  # the decode row is not touched
    torch.testing.assert_close(out[1:].double(), ref[1:], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("amx", [False, True], ids=["avx512bf16", "amx"])
def test_prefill_attention_rows_do_not_depend_on_the_batch(bf16_lib, amx):
    if amx and not kernels.has_amx(bf16_lib):
        pytest.skip("no AMX on this CPU")
    cases = [(0, 40), (21, 17), (0, 5), (0, 270)]
    kv, meta, q, _ = paged_prefill_case(9, 3, 64, cases)
    qs = torch.tensor(meta.query_start_loc, dtype=torch.int32)
    whole = torch.empty_like(q)
    kernels.prefill_attention(bf16_lib, q, kv, meta.block_tables, meta.seq_lens_t, qs, 0, 0.125,
                              None, whole, use_amx=amx)
    for i in range(len(cases)):
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        alone = torch.empty_like(q[start:end])
        kernels.prefill_attention(bf16_lib, q[start:end], kv, meta.block_tables[i:i + 1],
                                  meta.seq_lens_t[i:i + 1],
                                  torch.tensor([0, end - start], dtype=torch.int32), 0, 0.125,
                                  None, alone, use_amx=amx)
        assert torch.equal(alone, whole[start:end]), i


def test_prefill_rows_past_their_positions_are_refused():
    with pytest.raises(ValueError):
        kernels.check_prefill_rows([0, 10, 30], [10, 15], 30)  # 20 rows, 15 positions
    with pytest.raises(ValueError):
        kernels.check_prefill_rows([0, 10], [10], 8)  # rows past the step's tokens
    kernels.check_prefill_rows([0, 10, 25], [10, 15], 25)


def test_prefill_attention_refuses_shapes_it_does_not_serve(bf16_lib):
    kv, meta, q, _ = paged_prefill_case(6, 6, 48, [(0, 20)])  # head_dim 48: not a multiple of 32
    qs = torch.tensor(meta.query_start_loc, dtype=torch.int32)
    assert not kernels.prefill_attention_applies(q, kv, 16, None)
    with pytest.raises(ValueError):
        kernels.prefill_attention(bf16_lib, q, kv, meta.block_tables, meta.seq_lens_t, qs, 0,
                                  0.1, None, torch.empty_like(q))


@pytest.mark.parametrize("block_size", [8, 32])
@pytest.mark.parametrize("window", [None, 37])
def test_decode_attention_other_block_sizes(lib, block_size, window):
    """The bf16 value pass pairs rows inside a block; blocks of 8 or 32 and windows that start
    at odd positions must pair (and mask) the same rows as the reference."""
    contexts = list(range(0, 70, 3)) + [201]
    kv, meta, q = paged_decode_case(9, 3, 64, contexts, torch.bfloat16, block_size=block_size)
    ours = kernels.decode_attention(lib, q, kv, meta.block_tables, meta.seq_lens_t, 0.125,
                                    window, None)
    ref = TorchSDPABackend()._decodes(q.double(), kv.double(), meta, 0.125, window, None)
    torch.testing.assert_close(ours.double(), ref, atol=TOL[torch.bfloat16],
                               rtol=TOL[torch.bfloat16])
