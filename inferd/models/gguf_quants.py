"""GGML block dequantization in torch, vectorized over all blocks of a tensor at once.

Every quantized ggml type stores a tensor as a flat run of fixed-size blocks; each block holds
`block_size` values in `type_size` bytes (``gguf.GGML_QUANT_SIZES``). A dequantizer here takes the
raw bytes as a ``[n_blocks, type_size]`` uint8 tensor and returns ``[n_blocks, block_size]`` float32.

Each function follows ggml's reference arithmetic (``dequantize_row_*`` in ggml-quants.c, mirrored
by ``gguf.quants``) operation by operation in float32, so the result is bit-identical to
``gguf.quants.dequantize``: no fused multiply-add, same order of multiplications.

Types without a torch kernel here fall back to ``gguf.quants.dequantize`` (numpy, slower).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

QK_K = 256  # values per super-block of the k-quants

Q = GGMLQuantizationType
Dequantizer = Callable[[torch.Tensor], torch.Tensor]


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 field at byte `start` of every block, as float32 of shape [n_blocks, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, m] packed bytes -> [n, 2, m]: low nibbles first, then high nibbles (ggml's order)."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=1)


def _bits(packed: torch.Tensor, n_bits: int, width: int) -> torch.Tensor:
    """[..., m] bytes -> [..., 8 // width, m]: the `width`-bit fields at shifts 0, width, 2*width, ...

    ggml packs sub-blocks so that sub-block j of a group takes bits [j*width, (j+1)*width) of each byte.
    """
    shifts = torch.arange(0, n_bits, width, dtype=torch.uint8).view(-1, 1)
    return (packed.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


# --- 32-value blocks ---------------------------------------------------------------------------


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # d: fp16 | qs: 32 x int8
    return blocks[:, 2:].view(torch.int8).float() * _f16(blocks, 0)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # d: fp16 | qs: 16 bytes of nibbles, value = d * (q - 8)
    q = _nibbles(blocks[:, 2:]).reshape(blocks.shape[0], 32).to(torch.int8) - 8
    return _f16(blocks, 0) * q.float()


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # d: fp16 | m: fp16 | qs: 16 bytes of nibbles, value = d * q + m
    q = _nibbles(blocks[:, 4:]).reshape(blocks.shape[0], 32).float()
    return _f16(blocks, 0) * q + _f16(blocks, 2)


def _q5_low_high(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """5-bit values of a Q5_0/Q5_1 block: 4 low bits from `qs` nibbles, bit 4 from the uint32 `qh`."""
    n = qs.shape[0]
    low = _nibbles(qs).reshape(n, 32)
    # qh is a little-endian uint32: bit j (byte j // 8, bit j % 8) is the high bit of value j.
    high = _bits(qh, 8, 1).transpose(1, 2).reshape(n, 32)
    return low | (high << 4)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    # d: fp16 | qh: 4 bytes | qs: 16 bytes, value = d * (q - 16)
    q = _q5_low_high(blocks[:, 2:6], blocks[:, 6:]).to(torch.int8) - 16
    return _f16(blocks, 0) * q.float()


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    # d: fp16 | m: fp16 | qh: 4 bytes | qs: 16 bytes, value = d * q + m
    q = _q5_low_high(blocks[:, 4:8], blocks[:, 8:]).float()
    return _f16(blocks, 0) * q + _f16(blocks, 2)


# --- 256-value k-quant super-blocks ------------------------------------------------------------


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte field of Q4_K/Q5_K into 8 six-bit scales and 8 six-bit mins.

    Bytes 0-3 hold scales 0-3 (low 6 bits), bytes 4-7 mins 0-3; scales/mins 4-7 take their low
    4 bits from bytes 8-11 and their top 2 bits from the spare top bits of bytes 0-7.
    """
    d, m, md = scales.view(-1, 3, 4).unbind(1)
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return sc, mn


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # scales: 16 bytes (4-bit scale | 4-bit min) | qs: 64 bytes of 2-bit values | d | dmin
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    dl = (_f16(blocks, 80) * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (_f16(blocks, 82) * (scales >> 4).float()).view(n, 16, 1)
    q = _bits(qs.reshape(n, 2, 32), 8, 2).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # hmask: 32 bytes | qs: 64 bytes of 2-bit values | scales: 12 bytes of 6-bit scales | d
    n = blocks.shape[0]
    hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    low = _bits(scales[:, :8], 8, 4).reshape(n, 16)  # low 4 bits of the 16 scales
    high = _bits(scales[:, 8:], 8, 2).reshape(n, 16)  # top 2 bits
    sc = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (_f16(blocks, 108) * sc).view(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 32), 8, 2).reshape(n, 16, 16)
    qh = _bits(hmask.reshape(n, 1, 32), 8, 1).reshape(n, 16, 16)
    # A set hmask bit means "no offset"; a clear one subtracts 4.
    q = (ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # d | dmin | scales: 12 bytes | qs: 128 bytes of nibbles in 4 groups of 32 bytes (2 sub-blocks each)
    n = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    d = (_f16(blocks, 0) * sc.float()).view(n, 8, 1)
    dm = (_f16(blocks, 2) * mn.float()).view(n, 8, 1)
    q = _bits(blocks[:, 16:].reshape(n, 4, 32), 8, 4).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # d | dmin | scales: 12 bytes | qh: 32 bytes (bit j = sub-block j) | qs: 128 bytes of nibbles
    n = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    d = (_f16(blocks, 0) * sc.float()).view(n, 8, 1)
    dm = (_f16(blocks, 2) * mn.float()).view(n, 8, 1)
    ql = _bits(blocks[:, 48:].reshape(n, 4, 32), 8, 4).reshape(n, 8, 32)
    qh = _bits(blocks[:, 16:48], 8, 1)  # [n, 8, 32]
    q = (ql | (qh << 4)).float()
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # ql: 128 bytes of low nibbles | qh: 64 bytes of 2-bit highs | scales: 16 x int8 | d
    n = blocks.shape[0]
    ql = _bits(blocks[:, :128].reshape(n, 2, 64), 8, 4).reshape(n, 8, 32)
    qh = _bits(blocks[:, 128:192].reshape(n, 2, 32), 8, 2).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    d = (_f16(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    return (d * q).reshape(n, QK_K)


_BLOCK_KERNELS: dict[GGMLQuantizationType, Dequantizer] = {
    Q.Q8_0: _q8_0,
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q2_K: _q2_k,
    Q.Q3_K: _q3_k,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
}

# Plain element types: the bytes are the values; only a reinterpretation is needed.
_PLAIN: dict[GGMLQuantizationType, torch.dtype] = {
    Q.F32: torch.float32,
    Q.F16: torch.float16,
    Q.BF16: torch.bfloat16,
    Q.F64: torch.float64,
    Q.I8: torch.int8,
    Q.I16: torch.int16,
    Q.I32: torch.int32,
    Q.I64: torch.int64,
}

VECTORIZED_TYPES = frozenset(_BLOCK_KERNELS) | frozenset(_PLAIN)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the enclosed torch ops on one intra-op thread, then restore the setting.

    Dequantization is a handful of elementwise passes over tensors of ~1M values: a second thread
    saves little, and on a machine whose cores are shared each op waits for the slowest thread
    (SmolLM2 measured 2 s on one thread vs 25 s on two busy ones). Scoped to one tensor at a time,
    so whatever runs between tensors keeps the process's setting.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@functools.cache
def is_supported(qtype: GGMLQuantizationType) -> bool:
    """Whether `qtype` can be dequantized here (in torch, or through the gguf package's numpy code)."""
    if qtype in VECTORIZED_TYPES:
        return True
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    try:  # probe the reference on one all-zero block: it raises for types it does not implement
        gguf_quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return True


def dequantize(raw: torch.Tensor, qtype: GGMLQuantizationType, n_elements: int) -> torch.Tensor:
    """Raw bytes of one tensor (1-D uint8) -> its `n_elements` values, flat.

    Floating types come back in their stored dtype when that is already floating (no copy for F32/F16/
    BF16) so that a caller asking for fp16 from fp16 pays nothing; everything else is float32.
    """
    if qtype in _PLAIN:
        values = raw.view(_PLAIN[qtype])
        return values if values.is_floating_point() and qtype != Q.F64 else values.float()
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = raw.view(-1, type_size)
    if blocks.shape[0] * block_size != n_elements:
        raise ValueError(f"{qtype.name}: {raw.numel()} bytes do not hold {n_elements} values")
    kernel = _BLOCK_KERNELS.get(qtype)
    if kernel is not None:
        return kernel(blocks).reshape(n_elements)
    values = gguf_quants.dequantize(blocks.numpy(), qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(n_elements)
