"""Qwen2 / Qwen2.5 (Yang et al. 2024): the Llama decoder with biases on the q/k/v projections."""
from __future__ import annotations

from typing import Any

from inferd.models.llama import DecoderSpec, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def decoder_spec(config: Any) -> DecoderSpec:
        return DecoderSpec(qkv_bias=True, o_bias=False)
