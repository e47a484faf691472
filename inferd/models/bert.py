"""BERT (Devlin et al., 2018) as a pooling model: embeddings and sequence classification.

An encoder: post-LayerNorm transformer blocks with bidirectional attention within each
sequence of a flat, unpadded batch (the runner lays B sequences end to end; `meta` says where
each starts). No KV cache: an encoder sees every token of a sequence in one step.

    x = LN(word_emb[ids] + pos_emb[positions] + type_emb[token_type_ids])
    per layer:  x = LN(x + Wo · attn(Wqkv · x));   x = LN(x + W2 · act(W1 · x))

Module and parameter names follow the Hugging Face checkpoint (`embeddings.word_embeddings`,
`encoder.layer.N.attention.output.dense`, ...), except that query/key/value are fused into one
`qkv_proj` matmul; `load_weights` maps the names through `_rename`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
from torch import nn

from inferd.attention.backends import get_attention_backend
from inferd.attention.metadata import AttentionMetadata
from inferd.config import ConfigError
from inferd.models.layers.activation import get_activation
from inferd.models.layers.linear import Embedding, Linear, MergedLinear
from inferd.models.layers.weights import StackedParams, load_mapped_weights
from inferd.models.pooler import (ClassifierPooler, EmbeddingPooler, PoolerConfig,
                                  PoolingType, num_labels_of, resolve_pooler_config)
from inferd.sampling_params import PoolingParams

# HF's separate query/key/value projections fill the thirds of our fused qkv_proj.
BERT_STACKED: StackedParams = [(".attention.qkv_proj.", ".attention.self.query.", 0),
                               (".attention.qkv_proj.", ".attention.self.key.", 1),
                               (".attention.qkv_proj.", ".attention.self.value.", 2)]


def encoder_meta(meta: AttentionMetadata) -> AttentionMetadata:
    """An encoder attends both ways whatever the runner built the metadata for."""
    return meta if not meta.causal else dataclasses.replace(meta, causal=False)


def default_pooler_config(hf_config: Any) -> PoolerConfig:
    """When the runner passes none: the checkpoint's own settings (sentence-transformers files
    beside config.json, which `from_pretrained` records as `name_or_path`)."""
    return resolve_pooler_config(hf_config, getattr(hf_config, "name_or_path", None) or None)


class BertEmbeddings(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype, padding_idx: int | None = None):
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = Embedding(config.vocab_size, h, dtype)
        self.position_embeddings = Embedding(config.max_position_embeddings, h, dtype)
        self.token_type_embeddings = Embedding(max(int(config.type_vocab_size), 1), h, dtype)
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps, dtype=dtype)
        # RoBERTa: position ids start after the padding index (see xlm_roberta.py).
        self.padding_idx = padding_idx

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                token_type_ids: torch.Tensor | None) -> torch.Tensor:
        if self.padding_idx is not None:
            positions = roberta_positions(input_ids, meta, self.padding_idx)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]  # all segment 0: one broadcast add
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


def roberta_positions(input_ids: torch.Tensor, meta: AttentionMetadata, pad: int) -> torch.Tensor:
    """RoBERTa's position ids, as transformers computes them from padded input: non-pad tokens
    count up from pad + 1 within their sequence; pad tokens sit at `pad`. (Flat batch: the count
    restarts at each sequence's first row.)"""
    not_pad = (input_ids != pad).long()  # [T]
    count = not_pad.cumsum(0)
    starts = torch.tensor(meta.query_start_loc[:-1], device=input_ids.device)
    lens = torch.tensor([meta.query_len(i) for i in range(meta.num_seqs)], device=input_ids.device)
    before = (count - not_pad)[starts]  # non-pad tokens of earlier sequences
    count = count - torch.repeat_interleave(before, lens, output_size=input_ids.shape[0])
    return count * not_pad + pad


class BertResidualOutput(nn.Module):
    """`attention.output` and `output` in the checkpoint: dense, residual add, LayerNorm."""

    def __init__(self, d_in: int, d_out: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.dense = Linear(d_in, d_out, True, dtype)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps, dtype=dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = h // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = MergedLinear(h, [h, h, h], True, dtype)  # checkpoint: self.query/key/value
        self.output = BertResidualOutput(h, h, config.layer_norm_eps, dtype)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).view(t, 3, self.num_heads, self.head_dim).unbind(1)  # [T, H, D]
        # No KV cache: each sequence attends over its own tokens, both ways (meta.causal=False).
        o = get_attention_backend(x.device.type).forward(q, k, v, None, meta, scale=self.scale)
        return self.output(o.reshape(t, -1), x)


class BertLayer(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype):
        super().__init__()
        self.attention = BertAttention(config, dtype)
        self.intermediate = Linear(config.hidden_size, config.intermediate_size, True, dtype)
        self.act = get_activation(config.hidden_act)
        self.output = BertResidualOutput(config.intermediate_size, config.hidden_size,
                                         config.layer_norm_eps, dtype)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.attention(x, meta)
        return self.output(self.act(self.intermediate(x)), x)


class BertBackbone(nn.Module):
    """Embeddings + encoder: token ids -> hidden states [T, H]. `add_pooler` adds BERT's
    next-sentence head on [CLS], tanh(W_p · h), which BertForSequenceClassification reads."""

    def __init__(self, config: Any, dtype: torch.dtype, padding_idx: int | None = None,
                 add_pooler: bool = False):
        super().__init__()
        pos_type = getattr(config, "position_embedding_type", "absolute") or "absolute"
        if pos_type != "absolute":
            raise ConfigError(f"position_embedding_type {pos_type!r} is not supported (only absolute)")
        self.embeddings = BertEmbeddings(config, dtype, padding_idx)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(config, dtype)
                                           for _ in range(config.num_hidden_layers))
        if add_pooler:
            self.pooler = nn.Module()
            self.pooler.dense = Linear(config.hidden_size, config.hidden_size, True, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        meta = encoder_meta(meta)
        x = self.embeddings(input_ids, positions, meta, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, meta)
        return x


def bert_rename(name: str, prefix: str, keep_prefix: bool) -> str | None:
    """Checkpoint name -> ours. `prefix` ("bert." / "roberta.") names the backbone inside a
    task model: stripped for bare models, kept for classifiers; checkpoints of either kind may
    come with or without it. None skips a tensor we do not use."""
    bare = name[len(prefix):] if name.startswith(prefix) else name
    if bare.startswith(("classifier.", "score.")):
        return bare  # task heads keep their names
    if bare.endswith((".position_ids", ".token_type_ids")) or bare.startswith(("cls.", "lm_head.")):
        return None  # buffers and masked-LM heads
    if bare.startswith("pooler.") and not keep_prefix:
        return None  # the NSP head: embedding models read raw token states
    bare = bare.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    bare = bare.replace(".intermediate.dense.", ".intermediate.")
    return prefix + bare if keep_prefix else bare


class BertModel(BertBackbone):
    """`BertModel` checkpoints served as embedding models (sentence-transformers and friends).

    Pooling defaults to CLS, with L2 normalisation; the checkpoint's sentence-transformers
    files (e.g. MEAN for all-MiniLM-L6-v2) and --pooler-config override it.
    """

    is_pooling_model = True
    is_encoder = True  # the runner builds bidirectional (causal=False) metadata, no KV cache
    pooler_kind = "embed"
    uses_token_type_ids = True
    default_pooling = PoolingType.CLS
    checkpoint_prefix = "bert."

    def __init__(self, hf_config: Any, dtype: torch.dtype = torch.float32,
                 pooler_config: PoolerConfig | None = None):
        super().__init__(hf_config, dtype, padding_idx=self.padding_idx_of(hf_config))
        self.config = hf_config
        self.pooling = EmbeddingPooler(pooler_config or default_pooler_config(hf_config),
                                       self.default_pooling)
        self.supported_tasks = self.pooling.tasks

    @staticmethod
    def padding_idx_of(hf_config: Any) -> int | None:
        return None  # BERT counts positions from 0

    def attention_layers(self) -> list[nn.Module]:
        return []  # no KV cache: an encoder runs each sequence whole, in one step

    def pool(self, hidden: torch.Tensor, meta: AttentionMetadata,
             params: list[PoolingParams]) -> list[torch.Tensor]:
        return self.pooling(hidden, meta, params)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_mapped_weights(self, weights, BERT_STACKED,
                            lambda n: bert_rename(n, self.checkpoint_prefix, keep_prefix=False))


class BertForSequenceClassification(nn.Module):
    """BERT with the sequence-classification head: logits = W · tanh(W_p · h_[CLS]) + b.

    One label makes it a cross-encoder (query/document pairs told apart by token_type_ids):
    /score and /rerank report the sigmoid of that logit, as sentence-transformers' CrossEncoder.
    """

    is_pooling_model = True
    is_encoder = True
    pooler_kind = "classify"
    uses_token_type_ids = True
    default_pooling = PoolingType.CLS

    def __init__(self, hf_config: Any, dtype: torch.dtype = torch.float32,
                 pooler_config: PoolerConfig | None = None):
        super().__init__()
        self.config = hf_config
        self.bert = BertBackbone(hf_config, dtype, add_pooler=True)
        self.classifier = Linear(hf_config.hidden_size, num_labels_of(hf_config), True, dtype)
        self.pooling = ClassifierPooler(pooler_config or default_pooler_config(hf_config),
                                        self.default_pooling, self._head, hf_config)
        self.supported_tasks = self.pooling.tasks

    def _head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.bert.pooler.dense(pooled)))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.bert(input_ids, positions, meta, token_type_ids)

    def attention_layers(self) -> list[nn.Module]:
        return []

    def pool(self, hidden: torch.Tensor, meta: AttentionMetadata,
             params: list[PoolingParams]) -> list[torch.Tensor]:
        return self.pooling(hidden, meta, params)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_mapped_weights(self, weights, BERT_STACKED,
                            lambda n: bert_rename(n, "bert.", keep_prefix=True))
