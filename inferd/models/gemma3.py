"""Gemma 3 text decoder (Gemma Team 2025), e.g. gemma-3-270m / 1b (and the text half of 4b+).

Differences from Llama, all from the HF reference:
- embeddings are scaled by sqrt(hidden_size), rounded to the embedding dtype first;
- RMSNorms multiply by (1 + w), and there are four per layer: around attention (input / post)
  and around the MLP (pre / post feedforward), each applied before the residual add;
- per-head q/k RMSNorm; attention scale query_pre_attn_scalar ** -0.5;
- local layers (layer_types == "sliding_attention") attend to a sliding window and use their own
  RoPE base (10k), global layers use the main one (1M, possibly scaled);
- GeGLU MLP (gelu tanh approximation); optional final logit tanh soft-capping.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from inferd.attention.metadata import AttentionMetadata
from inferd.models.layers.attention import Attention, SelfAttention
from inferd.models.layers.linear import Embedding, Linear, to_float_logits
from inferd.models.layers.mlp import GatedMLP
from inferd.models.layers.norm import GemmaRMSNorm
from inferd.models.layers.rotary import RotaryEmbedding, rope_parameters
from inferd.models.layers.weights import LLAMA_STACKED, load_mapped_weights
from inferd.models.llama import head_dim_of

SLIDING, FULL = "sliding_attention", "full_attention"


def layer_types_of(config: Any) -> list[str]:
    """transformers 5 lists them; 4.x configs give a period (every Nth layer is global)."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types[: config.num_hidden_layers])
    period = getattr(config, "sliding_window_pattern", 6)
    return [SLIDING if (i + 1) % period else FULL for i in range(config.num_hidden_layers)]


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.is_sliding = layer_type == SLIDING
        attn = Attention(config.num_attention_heads, config.num_key_value_heads,
                         head_dim_of(config), scale=config.query_pre_attn_scalar**-0.5,
                         sliding_window=config.sliding_window if self.is_sliding else None)
        # No attention soft-capping: Gemma 3 dropped Gemma 2's, and HF's Gemma3Attention ignores
        # the `attn_logit_softcapping` field its config still carries (null in real checkpoints).
        bias = bool(getattr(config, "attention_bias", False))
        self.self_attn = SelfAttention(h, attn, qkv_bias=bias, o_bias=bias, qk_norm=GemmaRMSNorm,
                                       norm_eps=eps, dtype=dtype)
        act = getattr(config, "hidden_activation", None) or config.hidden_act
        self.mlp = GatedMLP(h, config.intermediate_size, act, False, dtype)
        self.input_layernorm = GemmaRMSNorm(h, eps, dtype)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps, dtype)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps, dtype)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), cos, sin, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3TextModel(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype)
        # HF multiplies by sqrt(hidden) cast to the weight dtype (e.g. 25.25 -> 25.25 in bf16).
        self.embed_scale = float(torch.tensor(config.hidden_size**0.5).to(dtype))
        types = layer_types_of(config)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, t, dtype) for t in types)
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        d, max_pos = head_dim_of(config), config.max_position_embeddings
        self.rotary_local = RotaryEmbedding(d, rope_parameters(config, SLIDING), max_pos, dtype)
        self.rotary_global = RotaryEmbedding(d, rope_parameters(config, FULL), max_pos, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids) * self.embed_scale
        local, global_ = self.rotary_local(positions), self.rotary_global(positions)
        for layer in self.layers:
            cos, sin = local if layer.is_sliding else global_
            x = layer(x, cos, sin, meta)
        return self.norm(x)


class Gemma3ForCausalLM(nn.Module):
    def __init__(self, hf_config: Any, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        # A multimodal Gemma3Config nests the text model's config; only the text half is served.
        config = getattr(hf_config, "text_config", None) or hf_config
        self.config = config
        self.model = Gemma3TextModel(config, dtype)
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", True))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, dtype)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        logits = to_float_logits(self.lm_head(hidden), out)
        if self.final_logit_softcapping:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def _rename(self, name: str) -> str | None:
        # Multimodal checkpoints: "language_model.model.X" (original) or "model.language_model.X"
        # (transformers 5) hold the text model; the vision tower and projector are not served.
        if "vision_tower" in name or "multi_modal_projector" in name or "rotary_emb" in name:
            return None
        name = name.replace("language_model.model.", "model.")
        name = name.replace("model.language_model.", "model.")
        name = name.replace("language_model.lm_head.", "lm_head.")
        if name == "lm_head.weight" and self.tie_word_embeddings:
            return None
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_mapped_weights(self, weights, LLAMA_STACKED, self._rename)
