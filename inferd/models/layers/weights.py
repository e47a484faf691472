"""Loading HF checkpoint tensors into models with fused projections, through a mapping table.

A model lists how HF's separate projections stack into its fused ones:
    STACKED = [(".qkv_proj.", ".q_proj.", 0), (".qkv_proj.", ".k_proj.", 1), ...]
and a `rename(hf_name) -> our name | None` for anything else (None = skip the tensor).
After loading, every parameter must have been written: parameters start uninitialised, so a
missing tensor would otherwise be silent garbage.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
from torch import nn

from inferd.models.layers.linear import MergedLinear

logger = logging.getLogger(__name__)

StackedParams = list[tuple[str, str, int]]
"""(fused module name part, HF module name part, shard index)."""

LLAMA_STACKED: StackedParams = [
    (".qkv_proj.", ".q_proj.", 0), (".qkv_proj.", ".k_proj.", 1), (".qkv_proj.", ".v_proj.", 2),
    (".gate_up_proj.", ".gate_proj.", 0), (".gate_up_proj.", ".up_proj.", 1),
]


@torch.no_grad()
def load_mapped_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                        stacked: StackedParams,
                        rename: Callable[[str], str | None] = lambda n: n) -> None:
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    shards: dict[str, set[int]] = {}  # fused parameter -> shards written so far
    unexpected: list[str] = []
    for hf_name, tensor in weights:
        name = rename(hf_name)
        if name is None:
            continue
        for fused, part, shard in stacked:
            if part in name:
                target = name.replace(part, fused)
                module_name, _, param_name = target.rpartition(".")
                module = modules.get(module_name)
                if isinstance(module, MergedLinear):
                    module.load_shard(param_name, shard, tensor)
                    shards.setdefault(target, set()).add(shard)
                    if len(shards[target]) == len(module.out_sizes):
                        loaded.add(target)
                    break
        else:
            if name not in params:
                unexpected.append(hf_name)
                continue
            if params[name].shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {hf_name} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(params[name].shape)}")
            params[name].copy_(tensor)
            loaded.add(name)
    if unexpected:
        logger.warning("ignored %d checkpoint tensors the model does not use, e.g. %s",
                       len(unexpected), unexpected[:3])
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")
