"""Qwen3 (dense): the Llama decoder with per-head RMSNorm on q and k (before RoPE) and no
q/k/v biases unless `attention_bias` is set."""
from __future__ import annotations

from typing import Any

from inferd.models.llama import DecoderSpec, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def decoder_spec(config: Any) -> DecoderSpec:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderSpec(qkv_bias=bias, o_bias=bias, qk_norm=True)
