"""Linear and embedding layers whose parameters start uninitialised.

Every parameter is overwritten by the checkpoint, so random initialisation (seconds for a
1B model on CPU) is wasted work. `MergedLinear` stacks several HF projections (q/k/v,
gate/up) along the output dim: one larger matmul is much faster than three small ones on CPU,
and `load_shard` copies each HF tensor into its slice.

On CPU, `prepack_linears` hands every layer's weight to oneDNN once after loading, in oneDNN's
own blocked layout. Measured on a 2-core AVX2 Zen 1 (fp32): the LM head of SmolLM2 (49152 x 576)
takes 55 ms at 64 rows instead of 100 ms through MKL, and 7 ms instead of 12 ms at one row
(MKL does not pick its fast kernels on AMD CPUs); the gate/up projection 3.3 ms instead of 5.4.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inferd.kernels import cpu as kernels


Q4_MAX_ROWS = 3
"""Inputs of at most this many rows (decode steps of a few sequences) take the 4-bit kernel
when the layer has GGUF blocks: against oneDNN's bf16 matmul on SmolLM2's layer shapes
(benchmarks/linear_small_m.py, best of 3, noisy machine) 2.0-2.8x faster at 1-2 rows,
1.2-1.4x at 3, even at 4, slower from there on, where oneDNN's AMX kernels win."""
Q4_NO_AMX_MAX_ROWS = 1
"""Without AMX (e.g. Zen 4: AVX512-BF16 only) the skinny kernel keeps one row (a batch-1
decode); from 2 rows the AVX512-BF16 tile kernel (csrc/gemm_avx512.cpp) is faster (Zen 4,
best of 3: 1 row 5.9 vs 6.1 ms for the 30 layers, 2 rows 6.4 vs 7.0, 4 rows 7.5 vs 10.0,
6 rows 9.0 vs 13.5)."""


def q4_skinny_max_rows(has_amx: bool) -> int:
    """Rows up to which a layer with 4-bit blocks takes the skinny kernel. The fused decode
    step follows the same rule, so both paths run the same kernel on the same rows."""
    return Q4_MAX_ROWS if has_amx else Q4_NO_AMX_MAX_ROWS

Q4_GEMM_MAX_ROWS = 32
"""From the skinny limit + 1 rows up to this many, layers with GGUF blocks run them on
`kernels.gemm_q4`. With AMX, tiles dequantized on the fly (csrc/gemm_amx.cpp): 1.1-1.5x
oneDNN's bf16 matmul at 4-32 rows on the same layer shapes (the dequantization, not the
arithmetic, is its bound), 1.0-1.1x at 40-64 (session 12). Without, AVX512-BF16 on regrouped blocks
(csrc/gemm_avx512.cpp), Zen 4: 1.4x at 8 rows, 1.2x at 16, 1.0x at 32, 0.9x at 64 (there
both run at the dot-product units' peak). Larger steps (prefill chunks, big batches) stay on
oneDNN."""
_BF16_GEMV_MAX_ROWS = 2  # the bf16 skinny matmul beats oneDNN's only for 1-2 rows
_SMALL_M_ROWS = max(Q4_GEMM_MAX_ROWS, _BF16_GEMV_MAX_ROWS)


def to_float_logits(y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """An LM head's output as float32, into `out` ([N, vocab] float32) when given: at 256
    sequences a fresh 50 MB float32 copy per step is ~10 ms of page faults on CPU (glibc maps
    and unmaps allocations that large each time), a reused buffer ~3 ms."""
    if out is None or y.dtype == torch.float32:
        return y.float()
    return out.copy_(y)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        self._packed: torch.Tensor | None = None  # oneDNN's copy of the weight (CPU)
        self._weight_dtype = dtype  # survives prepack_linears dropping `weight`
        # GGUF blocks of the weight for decode steps of a few rows: Q4_0/Q4_1 (quant.Q4Weights)
        # or Q8_0 (quant.Q8Weights, e.g. a tied LM head's embedding table)
        self._q4 = None
        self._q8 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= _SMALL_M_ROWS and x.dtype == torch.bfloat16:
            y = self._small_m(x)
            if y is not None:
                return y
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def _small_m(self, x: torch.Tensor) -> torch.Tensor | None:
        """A few bf16 rows (a decode step) through inferd's CPU kernels: the GGUF's 4-bit
        blocks when this layer has them (skinny kernel, then `kernels.gemm_q4`), its Q8_0
        blocks (skinny), else the plain bf16 weight if this layer kept one; None when none
        applies."""
        if self._q4 is not None:
            lib = kernels.for_tensor(x)
            if lib is None:
                return None
            if x.shape[0] <= q4_skinny_max_rows(kernels.has_amx(lib)):
                return kernels.gemv_q4(lib, x, self._q4, self.bias)
            return kernels.gemm_q4(lib, x, self._q4, self.bias)
        elif self._q8 is not None:
            lib = kernels.for_tensor(x)
            if lib is not None and x.shape[0] <= Q4_MAX_ROWS:
                return kernels.gemv_q8(lib, x, self._q8, self.bias)
        elif self.weight is not None and x.shape[0] <= _BF16_GEMV_MAX_ROWS \
                and self.weight.dtype == torch.bfloat16:
            lib = kernels.for_tensor(x)
            if lib is not None and lib.inferd_has_gemv_bf16():
                return kernels.gemv_bf16(lib, x, self.weight, self.bias)
        return None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class MergedLinear(Linear):
    """Several projections of the same input, stacked: output = cat([x @ W_i.T for i])."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, sum(out_sizes), bias, dtype)
        self.out_sizes = list(out_sizes)
        self.offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes))]

    @torch.no_grad()
    def load_shard(self, param_name: str, shard: int, tensor: torch.Tensor) -> None:
        param = self.weight if param_name == "weight" else self.bias
        if param is None:
            raise ValueError(f"{param_name} of a bias-free MergedLinear in the checkpoint")
        size = self.out_sizes[shard]
        if tensor.shape[0] != size:
            raise ValueError(f"shard {shard} has {tensor.shape[0]} rows, expected {size}")
        param.narrow(0, self.offsets[shard], size).copy_(tensor)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return out.split(self.out_sizes, dim=-1)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def _onednn_can_pack(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:  # bf16 packing needs AVX512-BW/VL/DQ or AVX-NE-CONVERT; probe instead of guessing
        w = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), None)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 8, dtype=dtype), w, None, "none", [], "")
        return True
    except RuntimeError:
        return False


@torch.no_grad()
def prepack_linears(model: nn.Module) -> int:
    """Give each float `Linear` on CPU a oneDNN-packed weight (see the module doc); returns how
    many were packed. A weight shared with another module (a tied LM head) stays in place
    for the other user; otherwise the plain copy is dropped so memory does not double."""
    layers = [m for m in model.modules() if isinstance(m, Linear) and m.weight is not None
              and m.weight.device.type == "cpu"]
    if not layers or not _onednn_can_pack(layers[0].weight.dtype):
        return 0
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for layer in layers:
        layer._packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), None)
        if owners[id(layer.weight)] == 1:
            layer.weight = None
    return len(layers)


def num_parameters(model: nn.Module) -> int:
    """Parameter count including weights held outside `parameters()`: oneDNN-packed and
    quantized linears keep theirs as opaque buffers."""
    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if getattr(m, "weight", None) is None and hasattr(m, "in_features"):
            n += m.in_features * m.out_features
    return n
