"""Attention backends: `get_attention_backend(device)` picks one per device type.

- `torch_sdpa.TorchSDPABackend`: any device (the CPU path; the CUDA fallback).
- `flash.FlashAttentionBackend`: CUDA with flash-attn installed (fp16/bf16).
`INFERD_ATTENTION_BACKEND=torch|flash` forces a choice (debugging).
"""
from __future__ import annotations

import functools

from inferd.attention.backends.common import AttentionBackend


@functools.lru_cache(maxsize=None)
def get_attention_backend(device: str) -> AttentionBackend:
    """The backend for a device ('cpu', 'cuda', 'cuda:0', ...); one shared instance each."""
    from inferd import envs

    choice = envs.INFERD_ATTENTION_BACKEND
    if choice not in ("auto", "torch", "flash"):
        raise ValueError(f"INFERD_ATTENTION_BACKEND={choice!r} is not one of auto, torch, flash")
    if device.startswith("cuda") and choice != "torch":
        from inferd.attention.backends.flash import HAS_FLASH_ATTN, FlashAttentionBackend

        if HAS_FLASH_ATTN:
            return FlashAttentionBackend()
        if choice == "flash":
            raise ValueError("INFERD_ATTENTION_BACKEND=flash but flash_attn is not installed; "
                             "`pip install flash-attn` or unset the variable")
    from inferd.attention.backends.torch_sdpa import TorchSDPABackend

    return TorchSDPABackend()


__all__ = ["AttentionBackend", "get_attention_backend"]
