"""Attention modules shared by the decoder models.

`Attention` is the seam between a model and an attention backend: it holds the head geometry,
the per-layer options (scale, sliding window, soft cap) and `kv_cache`, which the model runner
binds after allocating the pool ([2, num_blocks, block_size, num_kv_heads, head_dim]).

`SelfAttention` is the whole attention sub-block of a Llama-style decoder layer: fused
qkv_proj -> optional per-head q/k RMSNorm (Qwen3, Gemma 3) -> RoPE -> Attention -> o_proj.
"""
from __future__ import annotations

import torch
from torch import nn

from inferd.attention.backends import AttentionBackend, get_attention_backend
from inferd.attention.metadata import AttentionMetadata
from inferd.models.layers.linear import Linear, MergedLinear
from inferd.models.layers.rotary import apply_rotary


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of "
                             f"num_kv_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        self.kv_cache: torch.Tensor | None = None  # bound by the model runner
        self._backend: AttentionBackend | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H, D] (or [T, H * D]), k/v [T, Hkv, D] -> [T, H, D]."""
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self._backend is None:
            self._backend = get_attention_backend(q.device.type)
        return self._backend.forward(q, k, v, self.kv_cache, meta, scale=self.scale,
                                     sliding_window=self.sliding_window,
                                     logits_soft_cap=self.logits_soft_cap)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"scale={self.scale:.4g}, sliding_window={self.sliding_window}, "
                f"soft_cap={self.logits_soft_cap}")


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, attn: Attention, *, qkv_bias: bool, o_bias: bool,
                 qk_norm: type[nn.Module] | None, norm_eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        h, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.qkv_proj = MergedLinear(hidden_size, [h * d, hkv * d, hkv * d], qkv_bias, dtype)
        self.o_proj = Linear(h * d, hidden_size, o_bias, dtype)
        self.q_norm = qk_norm(d, norm_eps, dtype) if qk_norm else None
        self.k_norm = qk_norm(d, norm_eps, dtype) if qk_norm else None
        self.attn = attn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        a = self.attn
        h, hkv, d = a.num_heads, a.num_kv_heads, a.head_dim
        qkv = self.qkv_proj(x)
        # q and k rotate together, as one [T, H + Hkv, D] tensor: half the ops of two calls.
        if self.q_norm is None:
            qk = qkv[:, : (h + hkv) * d].view(t, h + hkv, d)
        else:
            qk = torch.cat((self.q_norm(qkv[:, : h * d].view(t, h, d)),
                            self.k_norm(qkv[:, h * d: (h + hkv) * d].view(t, hkv, d))), 1)
        qk = apply_rotary(qk, cos, sin, inplace=True)  # qkv/the cat are ours to overwrite
        q, k, v = qk[:, :h], qk[:, h:], qkv[:, (h + hkv) * d:]
        out = a(q, k, v, meta)
        return self.o_proj(out.reshape(t, a.num_heads * a.head_dim))
