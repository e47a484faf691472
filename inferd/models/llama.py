"""Llama-family decoders (Touvron et al. 2023): Llama 2/3, SmolLM2, Mistral; Qwen2/Qwen3 reuse it.

    x = embed(ids)
    per layer:  x = x + o_proj(attn(rope(q), rope(k), v))      on RMSNorm(x)
                x = x + down(silu(gate(x)) * up(x))             on RMSNorm(x)
    logits = lm_head(RMSNorm(x))

On CPU, a decode step of a model with GGUF 4-bit blocks runs all layers in one kernel call
(`layers/fused_decode.py`); the layer modules below are the reference it reproduces.

The variants differ only in a few switches (`DecoderSpec`): projection biases (Qwen2 has q/k/v
biases) and per-head q/k RMSNorm (Qwen3). Parameter names follow the HF checkpoint except the
fused `qkv_proj` and `gate_up_proj`, filled from q/k/v and gate/up through `LLAMA_STACKED`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from inferd.attention.metadata import AttentionMetadata
from inferd.models.layers.attention import Attention, SelfAttention
from inferd.models.layers.fused_decode import FusedDecode
from inferd.models.layers.linear import Embedding, Linear, to_float_logits
from inferd.models.layers.mlp import GatedMLP
from inferd.models.layers.norm import RMSNorm
from inferd.models.layers.rotary import RotaryEmbedding, rope_parameters
from inferd.models.layers.weights import LLAMA_STACKED, load_mapped_weights


@dataclass(frozen=True)
class DecoderSpec:
    """What distinguishes the Llama-family variants."""
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_windows(config: Any) -> list[int | None]:
    """Per-layer sliding window (None = full attention).

    transformers 5 lists `layer_types`; older Mistral configs set one `sliding_window` for all
    layers; older Qwen2 configs gate it with `use_sliding_window` from `max_window_layers` on.
    """
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types[:n]]
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return [None] * n
    first = getattr(config, "max_window_layers", 0) if hasattr(config, "use_sliding_window") else 0
    return [window if i >= first else None for i in range(n)]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, spec: DecoderSpec, sliding_window: int | None,
                 dtype: torch.dtype) -> None:
        super().__init__()
        d = head_dim_of(config)
        attn = Attention(config.num_attention_heads, config.num_key_value_heads, d,
                         scale=d**-0.5, sliding_window=sliding_window)
        self.self_attn = SelfAttention(config.hidden_size, attn, qkv_bias=spec.qkv_bias,
                                       o_bias=spec.o_bias,
                                       qk_norm=RMSNorm if spec.qk_norm else None,
                                       norm_eps=config.rms_norm_eps, dtype=dtype)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            spec.mlp_bias, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (x, residual): the residual add of each sub-block is fused into the
        norm that follows it (the stream is residual + x; the first layer has no residual)."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, cos, sin, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, spec: DecoderSpec, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, spec, w, dtype) for w in sliding_windows(config))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary_emb = RotaryEmbedding(head_dim_of(config), rope_parameters(config),
                                          config.max_position_embeddings, dtype)
        self._fused: FusedDecode | None | bool = False  # False: not decided yet

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions)  # once per step, shared by all layers
        fused = self._fused_decode()
        if fused is not None and fused.applies(x, meta):
            x, residual = fused.run(x, cos, sin, meta)  # every layer in one kernel call
        else:
            residual = None
            for layer in self.layers:
                x, residual = layer(x, residual, cos, sin, meta)
        return self.norm(x, residual)[0]

    def _fused_decode(self) -> FusedDecode | None:
        """Decided at the first forward: the 4-bit blocks are attached after loading."""
        if self._fused is False:
            on_cpu = self.norm.weight.device.type == "cpu"
            self._fused = FusedDecode.for_model(self) if on_cpu else None
        return self._fused


class LlamaForCausalLM(nn.Module):
    def __init__(self, hf_config: Any, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = hf_config
        self.model = LlamaModel(hf_config, self.decoder_spec(hf_config), dtype)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = Linear(hf_config.hidden_size, hf_config.vocab_size, False, dtype)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def decoder_spec(config: Any) -> DecoderSpec:
        bias = bool(getattr(config, "attention_bias", False))
        return DecoderSpec(qkv_bias=bias, o_bias=bias,
                           mlp_bias=bool(getattr(config, "mlp_bias", False)))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids/positions [T] (flat batch) -> final hidden states [T, hidden]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab], into `out` when given."""
        return to_float_logits(self.lm_head(hidden), out)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def _rename(self, name: str) -> str | None:
        if "rotary_emb.inv_freq" in name:  # a buffer some old checkpoints saved
            return None
        if name == "lm_head.weight" and self.tie_word_embeddings:
            return None  # shares the embedding; some checkpoints store a copy anyway
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_mapped_weights(self, weights, LLAMA_STACKED, self._rename)
