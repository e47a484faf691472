"""The gated feed-forward block (SwiGLU / GeGLU): down(act(gate(x)) * up(x)), gate|up fused."""
from __future__ import annotations

import torch
from torch import nn

from inferd.models.layers.activation import ActAndMul
from inferd.models.layers.linear import Linear, MergedLinear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size] * 2, bias, dtype)
        self.act_fn = ActAndMul(act)
        self.down_proj = Linear(intermediate_size, hidden_size, bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))
