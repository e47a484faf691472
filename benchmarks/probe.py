"""How fast this (shared, noisy) machine multiplies right now: every benchmark prints it first,
so a run taken while something else held the cores can be spotted and discarded."""
from __future__ import annotations

import time

import torch


def matmul_probe() -> float:
    """fp32 GFLOP/s of a 1024x1024 torch matmul on the current threads."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    return 10 * 2 * 1024**3 / (time.perf_counter() - t) / 1e9
