"""Rotary position embeddings (RoPE, Su et al. 2021) with HF's `rope_scaling` variants.

HF layout ("rotate half"): a head vector x = [x1 | x2] (two halves) at position p becomes
[x1 cos - x2 sin | x2 cos + x1 sin], with angles p * inv_freq[j], j < D/2.

Config fields differ between transformers versions; `rope_parameters(config, layer_type)` reads
both: transformers 5 `config.rope_parameters` (flat, or per layer type for Gemma 3:
{"sliding_attention": {...}, "full_attention": {...}}) and 4.x `rope_theta` + `rope_scaling`
(+ Gemma 3's `rope_local_base_freq` for its sliding layers).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from inferd.kernels import cpu as kernels

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The RoPE dict (rope_type, rope_theta, scaling fields) for a layer of `config`."""
    params = getattr(config, "rope_parameters", None)
    if params:
        if layer_type is not None and isinstance(params.get(layer_type), dict):
            return dict(params[layer_type])
        if "rope_theta" in params or "rope_type" in params:
            return {"rope_type": "default", **params}
    # transformers 4.x fields
    if layer_type == "sliding_attention" and getattr(config, "rope_local_base_freq", None):
        return {"rope_type": "default", "rope_theta": float(config.rope_local_base_freq)}
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling["rope_type"] = scaling.pop("type", None) or scaling.get("rope_type") or "default"
    scaling["rope_theta"] = float(getattr(config, "rope_theta", 10000.0))
    return scaling


def _default_inv_freq(dim: int, theta: float) -> torch.Tensor:
    # Same expression as HF so fp32 frequencies match bit for bit.
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, blended, scaled)


def _yarn_inv_freq(dim: int, p: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): interpolate low frequencies, extrapolate high ones, with a
    linear ramp between, and scale cos/sin by an attention factor."""
    theta = p["rope_theta"]
    orig = p.get("original_max_position_embeddings") or max_pos
    factor = p.get("factor") or max_pos / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = p.get("attention_factor")
    if attn is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attn)


def compute_inv_freq(head_dim: int, params: dict[str, Any],
                     max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim / 2] float32, scale applied to cos/sin) for a RoPE dict."""
    rope_type = params.get("rope_type", "default")
    theta = float(params["rope_theta"])
    if rope_type == "default":
        return _default_inv_freq(head_dim, theta), 1.0
    if rope_type == "linear":
        return _default_inv_freq(head_dim, theta) / params["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(_default_inv_freq(head_dim, theta), params), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(head_dim, params, max_position_embeddings)
    raise ValueError(f"rope type {rope_type!r} is not supported; supported: "
                     f"{', '.join(SUPPORTED_ROPE_TYPES)}")


class RotaryEmbedding(nn.Module):
    """positions [T] -> (cos, sin) [T, 1, D] in the model dtype, computed once per forward and
    shared by every layer (no position-table limit: angles are computed on the fly).

    Both come pre-expanded to the full head width with the sign of rotate-half folded into
    `sin` ([-sin | sin]), so each layer rotates q and k in four elementwise ops."""

    def __init__(self, head_dim: int, params: dict[str, Any], max_position_embeddings: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = compute_inv_freq(head_dim, params,
                                                            max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.dtype = dtype

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # [T, D/2], float32 as HF
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        cos, sin = cos.to(self.dtype), sin.to(self.dtype)
        return torch.cat((cos, cos), -1).unsqueeze(1), torch.cat((-sin, sin), -1).unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 inplace: bool = False) -> torch.Tensor:
    """x [T, heads, D], cos/sin [T, 1, D] from `RotaryEmbedding` -> rotated x.

    Rotate-half: [x1 | x2] -> [x1 cos - x2 sin | x2 cos + x1 sin] = x * cos + [x2 | x1] * sin
    with sin = [-sin | sin]; negation is exact, so this rounds exactly like HF's expression.
    `inplace=True` lets the CPU kernel (same roundings) overwrite x instead of allocating.
    """
    if inplace and x.dtype == cos.dtype:
        lib = kernels.for_tensor(x)
        if lib is not None:
            return kernels.rotary_(lib, x, cos, sin)
    t, h, d = x.shape
    swapped = x.view(t, h, 2, d // 2).flip(2).view(t, h, d)
    return x * cos + swapped * sin
