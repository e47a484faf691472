"""Gated activations for fused gate/up projections: act(gate) * up on one [T, 2 * I] tensor."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from inferd.kernels import cpu as kernels

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,  # exact (erf)
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class ActAndMul(nn.Module):
    """[.., 2 * I] (gate | up) -> [.., I] = act(gate) * up."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.act = get_activation(name)

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.name in kernels.ACTIVATIONS and gate_up.dim() == 2 and gate_up.is_contiguous():
            lib = kernels.for_tensor(gate_up)
            if lib is not None:  # one pass, the same roundings as the two ops below
                return kernels.act_and_mul(lib, gate_up, self.name)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up

    def extra_repr(self) -> str:
        return self.name
