"""RMSNorm (Zhang & Sennrich 2019) in the two flavours HF checkpoints use.

Both normalise in float32 and return the input dtype; they differ in where the weight enters:
- Llama/Qwen: `w * x_normed.to(dtype)` (weight stored as the gain itself, initialised to 1);
- Gemma: `(x_normed * (1 + w)).to(dtype)` (weight stored as an offset from 1, initialised to 0).

`forward(x, residual)` fuses the residual add in front (vLLM's fused_add_rms_norm): it returns
(norm(x + residual), x + residual). On CPU both run as one kernel (inferd/kernels) that rounds
as the eager ops do; elsewhere as torch ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inferd.kernels import cpu as kernels


class RMSNorm(nn.Module):
    gemma = False  # where the weight enters (see the module doc); the kernel takes it as a flag

    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One op instead of six; in fp32 there is no cast for it to round differently.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * self._normed(x).to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        lib = kernels.for_tensor(x) if x.dtype == self.weight.dtype else None
        if lib is not None:
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            if residual is None:
                return kernels.rms_norm(lib, x2, self.weight, self.eps, self.gemma).view(shape)
            # the residual stream is this layer's own tensor: updated in place
            out = kernels.rms_norm(lib, x2, self.weight, self.eps, self.gemma,
                                   residual=residual.view(-1, shape[-1]))
            return out.view(shape), residual
        if residual is None:
            return self._torch(x)
        residual = x + residual
        return self._torch(residual), residual


class GemmaRMSNorm(RMSNorm):
    gemma = True

    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(dim, eps, dtype)
        nn.init.zeros_(self.weight)

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        return (self._normed(x) * (1.0 + self.weight.float())).to(x.dtype)
