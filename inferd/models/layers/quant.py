"""Quantized linear layers for CPU decode (`--quantization int8|int4`), swapped in after loading.

Batch-1 decode is memory-bound: each token reads every weight once, so weight bytes set the
speed (SmolLM2-135M: 538 MB/token in fp32, 135 MB in int8). What torch 2.13 CPU offers, measured
on an AVX2-only Zen 1 (`benchmarks/quant_linear.py`):

- `aten._weight_int8pack_mm` and `aten._weight_int4pack_mm_for_cpu` have vectorized kernels for
  AVX512 only; on AVX2 they run a scalar loop, 10-50x slower than fp32 `F.linear`.
- fbgemm's int8 GEMM (AVX2: u8 activations x s8 weights via vpmaddubsw) is 2.7-3.4x faster than
  fp32 at M=1 and still ahead at M=64. `quantized::linear_dynamic` wraps it with ~50 us of fixed
  cost per call (64x64 takes 54 us), which over 121 matmuls a token eats most of the gain;
  `aten.fbgemm_linear_int8_weight_fp32_activation` reaches the same kernel for ~10 us.
- fp32 activations are quantized per call to uint8 over the input's [min, max] (one range for
  the whole input); bf16 has no fast path on this CPU.

So `int8` is fbgemm int8 weights x dynamically quantized int8 activations (not weight-only). Two
numeric details follow from the kernel:
- vpmaddubsw sums two u8*s8 products into a saturating int16; with 8-bit activations (0..255)
  the weights must stay within +-63 (2*255*64 < 2**15) or large products clip silently. Weights
  are therefore symmetric 7-bit per output channel (int8 storage).
- rows of a multi-row input are scaled to max|x| = 1 first, so one token's outliers (e.g. the
  massive activations of the first position) do not coarsen every other row's quantization.

`int4` is groupwise asymmetric 4-bit (groups of 32 along K, like GGUF Q4_1) through
`_weight_int4pack_mm_for_cpu`: fast on AVX512 CPUs, scalar (very slow) on AVX2 - we warn.
On CUDA neither is wired yet: `quantize_model` leaves the model in its float dtype and says so.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from dataclasses import dataclass, field

from inferd.config import ConfigError
from inferd.models.layers.linear import Q4_GEMM_MAX_ROWS, Linear, MergedLinear

logger = logging.getLogger(__name__)

QUANTIZATION_MODES = ("int8", "int4")
INT8_QMAX = 63
"""Weight range +-63: fbgemm's AVX2 kernel adds two u8*s8 products in int16 (see module doc)."""
INT4_GROUP_SIZE = 32
"""Along K; 32 is GGUF Q4_1's block, so a dequantized Q4_1 weight splits into the same groups."""
DEFAULT_MIN_NUMEL = 1 << 16
"""Layers smaller than this stay float: the kernel's fixed cost outweighs the bytes saved."""
_TINY = torch.finfo(torch.float32).tiny


def quantize_int8_per_channel(weight: torch.Tensor,
                              qmax: int = INT8_QMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (q int8 [N, K] in [-qmax, qmax], scale fp32 [N]); w ~ q * scale."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / qmax).clamp(min=_TINY)
    q = torch.round(w / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale


def quantize_int4_groupwise(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (q uint8 [N, K] in 0..15, scale [N, K/g], zero [N, K/g]) with
    w ~ (q - 8) * scale + zero, torch's int4 kernels' convention (zero = group min + 8 * scale)."""
    n, k = weight.shape
    w = weight.detach().float().view(n, k // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=_TINY)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
    return q.view(n, k), scale, lo + 8 * scale


class QuantLinear(nn.Module):
    """A `Linear` whose weight lives in a packed integer format; forward takes/returns floats.

    Built from a loaded float layer by `QuantLinear.from_float`; a `MergedLinear` keeps its
    `out_sizes` and `split` so the decoder code runs unchanged.
    """

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                 out_sizes: list[int] | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # Plain tensor attributes, not parameters/buffers: the packed weights cannot be moved
        # or serialized anyway, and nn.Module's lookup of registered tensors costs ~2 us per
        # access on the decode path. (So `model.parameters()` no longer counts these layers.)
        self.bias: torch.Tensor | None = (bias.detach().float().clone() if bias is not None
                                          else None)
        self.out_sizes = out_sizes

    @staticmethod
    def from_float(layer: Linear, mode: str) -> "QuantLinear":
        cls = {"int8": Int8Linear, "int4": Int4Linear}.get(mode)
        if cls is None:
            raise ValueError(f"quantization mode {mode!r} is not one of {QUANTIZATION_MODES}")
        return cls(layer.weight, layer.bias, getattr(layer, "out_sizes", None))

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.out_sizes is None:
            raise TypeError("split() of a QuantLinear that was not a MergedLinear")
        return out.split(self.out_sizes, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] (any float dtype) -> [..., out] in x's dtype."""
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y = self._matmul(x2 if x2.dtype == torch.float32 else x2.float())
        if self.bias is not None:
            y.add_(self.bias)
        if x.dim() != 2:
            y = y.view(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] fp32 contiguous -> x @ W.T [M, out] fp32, a fresh tensor (bias added after)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantLinear):
    """y = fbgemm(u8(x) x s8(W_q)) * scale: per-output-channel 7-bit weights, int8 activations."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 out_sizes: list[int] | None = None) -> None:
        n, k = weight.shape
        super().__init__(k, n, bias, out_sizes)
        q, scale = quantize_int8_per_channel(weight)
        self.scale = scale
        # The packed matrix is an opaque fbgemm object inside a byte tensor: a plain attribute,
        # so .to()/state_dict never copy or serialize the raw pointer.
        self._packed = torch.ops.aten.fbgemm_pack_quantized_matrix(q)
        # The op needs row sums of W_q (its zero-point correction) and reads only the shape of
        # its `weight` argument: a stride-0 view avoids keeping a second copy of W_q.
        self._col_offsets = q.sum(dim=1, dtype=torch.int32)
        self._shape_only = torch.zeros(1, 1, dtype=torch.int8).expand(n, k)
        self._zero_bias = torch.zeros(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode calls this ~120 times a token with tiny inputs, and each extra torch call costs
        # 3-10 us here (as long as streaming ~100 KB of weights): 2-D fp32 input, the models'
        # only case on CPU, goes straight to the kernel.
        if x.dim() != 2 or x.dtype != torch.float32:
            return super().forward(x)  # reshape/cast, then back through _matmul
        y = self._matmul(x)
        return y if self.bias is None else y.add_(self.bias)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return self._fbgemm(x).mul_(self.scale)
        # One quantization range serves all rows: give every row max|x| = 1 so each gets ~8 bits.
        row_max = x.abs().amax(dim=1, keepdim=True).clamp_(min=_TINY)
        return self._fbgemm(x / row_max).mul_(row_max).mul_(self.scale)

    def _fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.fbgemm_linear_int8_weight_fp32_activation(
            x, self._shape_only, self._packed, self._col_offsets, 1.0, 0, self._zero_bias)


class Int4Linear(QuantLinear):
    """Groupwise asymmetric 4-bit weights through torch's int4 CPU kernel (AVX512 for speed)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 out_sizes: list[int] | None = None,
                 group_size: int = INT4_GROUP_SIZE) -> None:
        n, k = weight.shape
        if k % group_size:
            raise ValueError(f"int4: in_features {k} is not a multiple of the group size "
                             f"{group_size}")
        super().__init__(k, n, bias, out_sizes)
        self.group_size = group_size
        q, scale, zero = quantize_int4_groupwise(weight, group_size)
        self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        # [K/g, N, 2]: the layout the kernel reads (scale, zero) pairs in.
        self._scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self._packed, self.group_size,
                                                          self._scales_and_zeros)


def cpu_has_int4_kernel() -> bool:
    """torch's int4 CPU matmul is vectorized for AVX512 only; elsewhere it is a scalar loop."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _check_int8_support() -> None:
    # fbgemm exists in x86 builds of torch only, and these aten entry points are marked
    # deprecated: fail at load with the reason rather than at the first forward.
    if ("fbgemm" not in torch.backends.quantized.supported_engines
            or not hasattr(torch.ops.aten, "fbgemm_linear_int8_weight_fp32_activation")):
        raise ConfigError(f"--quantization int8 needs fbgemm's int8 GEMM, which this torch "
                          f"build ({torch.__version__}, {torch.backends.cpu.get_cpu_capability()}) "
                          "does not provide; run without --quantization")


def quantize_model(model: nn.Module, mode: str, *, min_numel: int = DEFAULT_MIN_NUMEL) -> int:
    """Replace the model's `Linear`/`MergedLinear` layers by quantized ones, in place.

    Embeddings stay float (a lookup reads one row per token); a tied LM head gets its own
    quantized copy while the embedding keeps the float table. Returns the number of layers
    swapped. Call after the weights are loaded and the model is on its device.
    """
    if mode not in QUANTIZATION_MODES:
        raise ConfigError(f"--quantization {mode!r} is not one of {', '.join(QUANTIZATION_MODES)}")
    device = next(model.parameters()).device
    if device.type != "cpu":
        # Not wired for CUDA yet: bf16 weights already halve fp32's bytes there.
        logger.warning("--quantization %s is implemented for CPU only; the model on %s keeps "
                       "its float weights", mode, device)
        return 0
    if mode == "int8":
        _check_int8_support()
    if mode == "int4" and not cpu_has_int4_kernel():
        logger.warning("--quantization int4: torch has no vectorized int4 kernel for this CPU "
                       "(%s); decode will be much slower than float. Use int8 here.",
                       torch.backends.cpu.get_cpu_capability())
    swapped, kept = 0, 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) not in (Linear, MergedLinear):  # exact: subclasses may change forward
                continue
            if child.weight.numel() < min_numel or (
                    mode == "int4" and child.in_features % INT4_GROUP_SIZE):
                kept += 1
                continue
            with torch.no_grad():
                setattr(parent, name, QuantLinear.from_float(child, mode))
            swapped += 1
    logger.info("Quantized %d linear layers to %s (%d left in float)", swapped, mode, kept)
    return swapped


# --- GGUF 4-bit weights read as stored (CPU decode) ----------------------------------------------

@dataclass
class Q4Weights:
    """A linear layer's weight as GGUF Q4_0 / Q4_1 blocks of 32 along K, split for the kernel:
    w[n, 32 b + j] = d[n, b] * q + m[n, b], q the j-th nibble of block (n, b)."""
    qs: torch.Tensor  # uint8 [N, K / 32, 16]: low nibbles are j < 16, high nibbles j >= 16
    d: torch.Tensor   # float32 [N, K / 32]
    m: torch.Tensor   # float32 [N, K / 32]; Q4_0 stores none: m = -8 d

    _tiles: "Q4Tiles | None" = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.qs.shape[1] * 32

    def tiles(self) -> "Q4Tiles":
        """The same weights regrouped for the AVX512-BF16 matmul (csrc/gemm_avx512.cpp), built
        on first use and kept (about the blocks' size again)."""
        if self._tiles is None:
            self._tiles = Q4Tiles.from_weights(self)
        return self._tiles


@dataclass
class Q4Tiles:
    """Q4Weights in tiles of 16 weight rows, for vdpbf16ps with the rows in the lanes: byte
    2 i + e of tq[t, b, pp] holds, for weight row 16 t + i and block b, the nibble of k = 32 b +
    4 pp + e (low) and of k + 2 (high). Rows past N are zero."""
    tq: torch.Tensor  # uint8 [T, K / 32, 8, 32]
    td: torch.Tensor  # float32 [T, K / 32, 16]: d of rows 16 t .. 16 t + 15
    tm: torch.Tensor  # float32 [T, K / 32, 16]: m - 128 d (the kernel's weights are 128 + q)

    @staticmethod
    def from_weights(w: Q4Weights) -> "Q4Tiles":
        n, nb = w.qs.shape[0], w.qs.shape[1]
        t = -(-n // 16)
        q = torch.cat([w.qs & 0x0F, w.qs >> 4], dim=-1)  # [n, nb, 32], element order
        q = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, 16 * t - n))
        # k = 4 pp + 2 h + e -> [t, nb, pp, i, e] with h as the nibble
        q = q.view(t, 16, nb, 8, 2, 2).permute(0, 2, 3, 1, 5, 4)
        tq = (q[..., 0] | (q[..., 1] << 4)).reshape(t, nb, 8, 32).contiguous()

        def by_tile(v: torch.Tensor) -> torch.Tensor:
            v = torch.nn.functional.pad(v, (0, 0, 0, 16 * t - n))
            return v.view(t, 16, nb).transpose(1, 2).contiguous()

        tiles = Q4Tiles(tq, by_tile(w.d), by_tile(w.m - 128 * w.d))
        # the kernel's aligned vector loads need it (torch's CPU allocations give it), so the
        # per-call wrappers need not check
        if any(a.data_ptr() % 64 for a in (tiles.tq, tiles.td, tiles.tm)):
            raise ValueError("4-bit tiles must be 64-byte aligned")
        return tiles


def q4_from_blocks(qtype, blocks: torch.Tensor) -> Q4Weights:
    """GGUF blocks uint8 [N, K / 32, type_size] -> Q4Weights (ggml's block layouts:
    Q4_0 = d fp16 | 16 bytes of nibbles; Q4_1 = d fp16 | m fp16 | 16 bytes)."""
    from inferd.models.gguf import GGMLQuantizationType as Q

    def f16(start: int) -> torch.Tensor:
        return blocks[..., start:start + 2].contiguous().view(torch.float16).squeeze(-1).float()

    if qtype == Q.Q4_1:
        d, m, qs = f16(0), f16(2), blocks[..., 4:]
    elif qtype == Q.Q4_0:
        d, qs = f16(0), blocks[..., 2:]
        m = -8 * d
    else:
        raise ValueError(f"not a 4-bit block type: {qtype!r}")
    return Q4Weights(qs.contiguous(), d.contiguous(), m.contiguous())


@dataclass
class Q8Weights:
    """A linear layer's weight as GGUF Q8_0 blocks: w[n, 32 b + j] = d[n, b] * qs[n, b, j]."""
    qs: torch.Tensor  # int8 [N, K / 32, 32]
    d: torch.Tensor   # float32 [N, K / 32]

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.qs.shape[1] * 32


def q8_from_blocks(blocks: torch.Tensor) -> Q8Weights:
    """GGUF Q8_0 blocks uint8 [N, K / 32, 34] (d fp16 | 32 x int8) -> Q8Weights."""
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
    return Q8Weights(blocks[..., 2:].contiguous().view(torch.int8), d.contiguous())


def _sources(model: nn.Module, name: str, module: nn.Module,
             stacked: list[tuple[str, str, int]]) -> list[str] | None:
    """The HF checkpoint weights a layer's weight was loaded from, in row order."""
    if isinstance(module, MergedLinear):
        leaf = name.rsplit(".", 1)[-1]
        parts = sorted((shard, part) for fused, part, shard in stacked if fused[1:-1] == leaf)
        if len(parts) != len(module.out_sizes):
            return None
        return [f"{name.rsplit('.', 1)[0]}.{part.strip('.')}.weight" for _, part in parts]
    if name == "lm_head" and getattr(model, "tie_word_embeddings", False):
        return ["model.embed_tokens.weight"]  # a tied head: the GGUF stores only the table
    return [f"{name}.weight"]


def attach_gguf_blocks(model: nn.Module, raw: dict, stacked: list[tuple[str, str, int]]) -> int:
    """Give each bf16 CPU `Linear` whose checkpoint weights were all Q4_0/Q4_1 (or all Q8_0)
    in the GGUF (`GGUFModel.iter_weights(raw_blocks=...)`) those blocks, for decode steps of
    up to Q4_GEMM_MAX_ROWS rows (Q8: Q4_MAX_ROWS); returns how many layers got them. A fused
    layer (qkv, gate/up) qualifies when every one of its HF projections did; their rows stack
    in shard order, as the float weight's do."""
    from inferd.models.gguf import GGMLQuantizationType as Q
    attached = 0
    for name, module in model.named_modules():
        if type(module) not in (Linear, MergedLinear) or module._weight_dtype != torch.bfloat16:
            continue
        sources = _sources(model, name, module, stacked)
        if not sources or not all(s in raw for s in sources):
            continue
        types = {raw[s][0] for s in sources}
        if types <= {Q.Q4_0, Q.Q4_1}:
            parts = [q4_from_blocks(*raw[s]) for s in sources]
            blocks = Q4Weights(*(torch.cat([getattr(w, f) for w in parts]) for f in ("qs", "d", "m")))
        elif types == {Q.Q8_0}:
            parts = [q8_from_blocks(raw[s][1]) for s in sources]
            blocks = Q8Weights(*(torch.cat([getattr(w, f) for w in parts]) for f in ("qs", "d")))
        else:
            continue
        if blocks.shape != (module.out_features, module.in_features):
            raise ValueError(f"{name}: GGUF blocks of shape {blocks.shape} for a "
                             f"{module.out_features} x {module.in_features} layer")
        if isinstance(blocks, Q4Weights):
            module._q4 = blocks
        else:
            module._q8 = blocks
        attached += 1
    return attached
