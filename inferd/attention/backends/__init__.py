"""Attention backends: `get_attention_backend(device)` picks one per device type.

- `cpu.CPUBackend`: CPU with inferd's kernels built (`inferd/kernels`): paged decode attention.
- `torch_sdpa.TorchSDPABackend`: any device (the CPU path without kernels; the CUDA fallback).
- `flash.FlashAttentionBackend`: CUDA with flash-attn installed (fp16/bf16).
- `triton_attn.TritonBackend`: CUDA without flash-attn: a Triton paged decode kernel, SDPA
  for prefill chunks. (On CPU only under TRITON_INTERPRET=1, which tests use.)
`INFERD_ATTENTION_BACKEND=torch|flash|triton|cpu` forces a choice (debugging).
"""
from __future__ import annotations

import functools

from inferd.attention.backends.common import AttentionBackend


@functools.lru_cache(maxsize=None)
def get_attention_backend(device: str) -> AttentionBackend:
    """The backend for a device ('cpu', 'cuda', 'cuda:0', ...); one shared instance each."""
    from inferd import envs

    choice = envs.INFERD_ATTENTION_BACKEND
    if choice not in ("auto", "torch", "flash", "triton", "cpu"):
        raise ValueError(f"INFERD_ATTENTION_BACKEND={choice!r} is not one of auto, torch, "
                         "flash, triton, cpu")
    if device.startswith("cuda") and choice in ("auto", "flash"):
        from inferd.attention.backends.flash import HAS_FLASH_ATTN, FlashAttentionBackend

        if HAS_FLASH_ATTN:
            return FlashAttentionBackend()
        if choice == "flash":
            raise ValueError("INFERD_ATTENTION_BACKEND=flash but flash_attn is not installed; "
                             "`pip install flash-attn` or unset the variable")
    if choice == "triton" or (device.startswith("cuda") and choice == "auto"):
        from inferd.attention.backends.triton_attn import HAS_TRITON, TritonBackend

        if HAS_TRITON:
            return TritonBackend()
        if choice == "triton":
            raise ValueError("INFERD_ATTENTION_BACKEND=triton but triton is not installed")
    if device == "cpu" and choice in ("auto", "cpu"):
        from inferd.kernels import cpu as kernels

        lib = kernels.load()
        if lib is not None:
            from inferd.attention.backends.cpu import CPUBackend

            return CPUBackend(lib)
        if choice == "cpu":
            raise ValueError("INFERD_ATTENTION_BACKEND=cpu but the CPU kernels could not be "
                             "built (see the warning above); unset the variable")
    from inferd.attention.backends.torch_sdpa import TorchSDPABackend

    return TorchSDPABackend()


__all__ = ["AttentionBackend", "get_attention_backend"]
