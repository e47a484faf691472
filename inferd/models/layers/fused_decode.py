"""All decoder layers of a CPU decode step in one kernel call (`csrc/decoder.cpp`).

A decode step of a few sequences runs ~12 small ops per layer, and from Python each costs
10-30 us of interpreter and wrapper time here, about what the arithmetic costs. When a
Llama-family model has every linear's GGUF 4-bit blocks (`quant.attach_gguf_blocks`), a pure
decode step of up to FUSED_MAX_ROWS sequences runs the same kernels back to back in C
instead, so both paths give the same bits (up to Linear's own limit for `kernels.gemm_q4`,
Q4_GEMM_MAX_ROWS; larger fused steps use it where the module path would use oneDNN).
Anything else (prefill chunks, fp32, models without 4-bit blocks, soft-capping, Gemma's norms)
keeps the layer-by-layer path.

The layer descriptors (weight and cache pointers) are built once and rebuilt only if a KV cache
is rebound; per step only the small step descriptor changes. Every index the kernels follow
(slots, block tables, lengths) is checked against the caches first.
"""
from __future__ import annotations

import ctypes
from typing import Any

import torch

from inferd.attention.metadata import AttentionMetadata
from inferd.kernels import cpu as kernels
from inferd.models.layers.linear import q4_skinny_max_rows
from inferd.models.layers.norm import RMSNorm

_p, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
FUSED_MAX_ROWS = 64
"""Decode steps of up to this many sequences take the fused path (`kernels.gemm_q4` beyond
the skinny limit). Past Linear's own limit (32) the matmuls alone are only even with oneDNN,
but the whole step still wins. Sapphire Rapids (AMX): 48 sequences 50-57 ms against 61-82 ms
layer by layer, 64 sequences 65-72 against 67-83 (noisy machine, alternating runs). Zen 4 (no
AMX, AVX512-BF16 tiles): 16 sequences 29 against 38 ms, 64 sequences even (88-99 against
92)."""


class _Q4Ref(ctypes.Structure):
    _fields_ = [("qs", _p), ("d", _p), ("m", _p), ("tq", _p), ("td", _p), ("tm", _p),
                ("bias", _p), ("n", _i64), ("k", _i64)]


class _LayerRef(ctypes.Structure):
    _fields_ = [("input_norm", _p), ("post_norm", _p), ("q_norm", _p), ("k_norm", _p),
                ("qkv", _Q4Ref), ("o", _Q4Ref), ("gate_up", _Q4Ref), ("down", _Q4Ref),
                ("kv_cache", _p), ("num_blocks", _i64), ("window", _i64)]


class _StepRef(ctypes.Structure):
    _fields_ = [("tokens", _i64), ("hidden", _i64), ("heads", _i64), ("kv_heads", _i64),
                ("head_dim", _i64), ("intermediate", _i64), ("block_size", _i64),
                ("table_stride", _i64), ("act", _i64), ("use_amx", _i64),
                ("skinny_max_rows", _i64), ("eps", _f32),
                ("scale", _f32), ("cos", _p), ("sin", _p), ("slots", _p), ("block_tables", _p),
                ("seq_lens", _p)]


def _q4_ref(linear: Any, use_amx: bool) -> _Q4Ref:
    q4 = linear._q4
    bias = linear.bias
    tq = td = tm = None  # AMX reads the blocks, not the tiles
    if not use_amx:
        t = q4.tiles()
        tq, td, tm = t.tq.data_ptr(), t.td.data_ptr(), t.tm.data_ptr()
    return _Q4Ref(q4.qs.data_ptr(), q4.d.data_ptr(), q4.m.data_ptr(), tq, td, tm,
                  None if bias is None else bias.data_ptr(), q4.shape[0], q4.shape[1])


class FusedDecode:
    """The fused path for one LlamaModel; `FusedDecode.for_model` returns None when the model
    does not qualify."""

    def __init__(self, model: torch.nn.Module, lib: ctypes.CDLL) -> None:
        self.model, self.lib = model, lib
        self.use_amx = kernels.has_amx(lib)
        self.skinny_max_rows = q4_skinny_max_rows(self.use_amx)
        self.max_rows = FUSED_MAX_ROWS
        layer0 = model.layers[0]
        a = layer0.self_attn.attn
        self.heads, self.kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.scale = a.scale
        self.hidden = layer0.input_layernorm.weight.shape[0]
        self.intermediate = layer0.mlp.down_proj.in_features
        self.eps = layer0.input_layernorm.eps
        self.act = kernels.ACTIVATIONS[layer0.mlp.act_fn.name]
        self._layers: Any = None
        self._cache_key: tuple[int, ...] = ()

    @staticmethod
    def for_model(model: torch.nn.Module) -> "FusedDecode | None":
        lib = kernels.load()
        if lib is None or not lib.inferd_has_gemv_bf16() or not len(model.layers):
            return None
        for layer in model.layers:
            sa, mlp = layer.self_attn, layer.mlp
            linears = (sa.qkv_proj, sa.o_proj, mlp.gate_up_proj, mlp.down_proj)
            norms = [layer.input_layernorm, layer.post_attention_layernorm]
            norms += [n for n in (sa.q_norm, sa.k_norm) if n is not None]
            if (any(getattr(lin, "_q4", None) is None for lin in linears)
                    or any(type(n) is not RMSNorm or n.weight.dtype != torch.bfloat16 for n in norms)
                    or any(lin.bias is not None and lin.bias.dtype != torch.bfloat16 for lin in linears)
                    or sa.attn.logits_soft_cap is not None or sa.attn.head_dim % 2
                    or mlp.act_fn.name not in kernels.ACTIVATIONS):
                return None
        return FusedDecode(model, lib)

    def applies(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        return (meta.causal and x.dtype == torch.bfloat16 and meta.num_decodes == meta.num_seqs
                and 0 < meta.num_seqs <= self.max_rows and x.shape[0] == meta.num_seqs)

    def _layer_refs(self) -> Any:
        caches = [layer.self_attn.attn.kv_cache for layer in self.model.layers]
        key = tuple(0 if c is None else c.data_ptr() for c in caches)
        if self._layers is not None and key == self._cache_key:
            return self._layers
        if any(c is None or c.dtype != torch.bfloat16 or not c.is_contiguous() for c in caches):
            raise ValueError("fused decode: every layer needs a contiguous bf16 KV cache")
        refs = (_LayerRef * len(caches))()
        for ref, layer, cache in zip(refs, self.model.layers, caches):
            sa, mlp = layer.self_attn, layer.mlp
            ref.input_norm = layer.input_layernorm.weight.data_ptr()
            ref.post_norm = layer.post_attention_layernorm.weight.data_ptr()
            ref.q_norm = None if sa.q_norm is None else sa.q_norm.weight.data_ptr()
            ref.k_norm = None if sa.k_norm is None else sa.k_norm.weight.data_ptr()
            amx = self.use_amx
            ref.qkv, ref.o = _q4_ref(sa.qkv_proj, amx), _q4_ref(sa.o_proj, amx)
            ref.gate_up, ref.down = _q4_ref(mlp.gate_up_proj, amx), _q4_ref(mlp.down_proj, amx)
            ref.kv_cache, ref.num_blocks = cache.data_ptr(), cache.shape[1]
            ref.window = sa.attn.sliding_window or 0
        self._layers, self._cache_key = refs, key
        return refs

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] embeddings -> (x, residual) after the last decoder layer."""
        layers = self._layer_refs()
        num_blocks = min(layer.num_blocks for layer in layers)
        kernels.check_paged_metadata(meta.slot_mapping, meta.block_tables, meta.seq_lens,
                                     num_blocks, meta.block_size)
        t = x.shape[0]
        x = x.contiguous()
        residual = torch.empty_like(x)
        cos, sin = cos.contiguous(), sin.contiguous()
        tables = meta.block_tables
        step = _StepRef(t, self.hidden, self.heads, self.kv_heads, self.head_dim,
                        self.intermediate, meta.block_size, tables.stride(0), self.act,
                        int(self.use_amx), self.skinny_max_rows, self.eps, self.scale,
                        cos.data_ptr(), sin.data_ptr(), meta.slot_mapping.data_ptr(),
                        tables.data_ptr(),
                        meta.seq_lens_t.data_ptr())
        self.lib.inferd_decoder_layers(layers, len(layers), ctypes.byref(step), x.data_ptr(),
                                       residual.data_ptr())
        return x, residual
