"""RMSNorm (Zhang & Sennrich 2019) in the two flavours HF checkpoints use.

Both normalise in float32 and return the input dtype; they differ in where the weight enters:
- Llama/Qwen: `w * x_normed.to(dtype)` (weight stored as the gain itself, initialised to 1);
- Gemma: `(x_normed * (1 + w)).to(dtype)` (weight stored as an offset from 1, initialised to 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One op instead of six; in fp32 there is no cast for it to round differently.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * self._normed(x).to(x.dtype)


class GemmaRMSNorm(RMSNorm):
    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(dim, eps, dtype)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self._normed(x) * (1.0 + self.weight.float())).to(x.dtype)
