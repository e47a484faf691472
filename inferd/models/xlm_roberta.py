"""XLM-RoBERTa (Conneau et al., 2019) and RoBERTa as pooling models.

The encoder is BERT's (bert.py) with two differences that matter for parity:
- position ids start at padding_idx + 1 (RoBERTa reserves 0..padding_idx), so a checkpoint
  with max_position_embeddings=514 and padding_idx=1 holds 512 usable positions;
- the classification head reads the <s> token through its own dense + tanh
  (`classifier.dense`, `classifier.out_proj`), not BERT's pooler.

Cross-encoder rerankers (bge-reranker-base/large, jina-reranker, mxbai-rerank) are
XLMRobertaForSequenceClassification with one label; bge-m3 is XLMRobertaModel with CLS pooling.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from inferd.attention.metadata import AttentionMetadata
from inferd.models.bert import (BERT_STACKED, BertBackbone, BertModel, bert_rename,
                                default_pooler_config)
from inferd.models.layers.linear import Linear
from inferd.models.layers.weights import load_mapped_weights
from inferd.models.pooler import ClassifierPooler, PoolerConfig, PoolingType, num_labels_of
from inferd.sampling_params import PoolingParams


def roberta_padding_idx(hf_config: Any) -> int:
    pad = getattr(hf_config, "pad_token_id", None)
    return 1 if pad is None else int(pad)


def roberta_max_positions(hf_config: Any) -> int:
    """Usable positions: the embedding table minus the reserved 0..padding_idx rows."""
    return int(hf_config.max_position_embeddings) - roberta_padding_idx(hf_config) - 1


class XLMRobertaModel(BertModel):
    """XLMRobertaModel / RobertaModel checkpoints as embedding models (default: CLS, normalised)."""

    checkpoint_prefix = "roberta."
    uses_token_type_ids = False  # one segment type; pairs are told apart by </s></s>

    @staticmethod
    def padding_idx_of(hf_config: Any) -> int | None:
        return roberta_padding_idx(hf_config)


class RobertaClassificationHead(nn.Module):
    """logits = out_proj(tanh(dense(h_<s>)))."""

    def __init__(self, hidden: int, num_labels: int, dtype: torch.dtype):
        super().__init__()
        self.dense = Linear(hidden, hidden, True, dtype)
        self.out_proj = Linear(hidden, num_labels, True, dtype)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(pooled)))


class XLMRobertaForSequenceClassification(nn.Module):
    """Classifier / cross-encoder. With one label, /score and /rerank report sigmoid(logit)
    (or the activation the checkpoint's sentence-transformers config names)."""

    is_pooling_model = True
    is_encoder = True
    pooler_kind = "classify"
    uses_token_type_ids = False
    default_pooling = PoolingType.CLS

    def __init__(self, hf_config: Any, dtype: torch.dtype = torch.float32,
                 pooler_config: PoolerConfig | None = None):
        super().__init__()
        self.config = hf_config
        self.roberta = BertBackbone(hf_config, dtype, padding_idx=roberta_padding_idx(hf_config))
        self.classifier = RobertaClassificationHead(hf_config.hidden_size,
                                                    num_labels_of(hf_config), dtype)
        self.pooling = ClassifierPooler(pooler_config or default_pooler_config(hf_config),
                                        self.default_pooling, self.classifier, hf_config)
        self.supported_tasks = self.pooling.tasks

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        # RoBERTa has a single segment embedding; token_type_ids are ignored like in transformers
        # when they are all zero (its tokenizers never produce others).
        return self.roberta(input_ids, positions, meta, None)

    def attention_layers(self) -> list[nn.Module]:
        return []

    def pool(self, hidden: torch.Tensor, meta: AttentionMetadata,
             params: list[PoolingParams]) -> list[torch.Tensor]:
        return self.pooling(hidden, meta, params)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        def rename(name: str) -> str | None:
            if name.startswith(("pooler.", "roberta.pooler.")):
                return None  # unused by the RoBERTa classification head
            return bert_rename(name, "roberta.", keep_prefix=True)

        load_mapped_weights(self, weights, BERT_STACKED, rename)


# RoBERTa checkpoints share the architecture exactly.
RobertaModel = XLMRobertaModel
RobertaForSequenceClassification = XLMRobertaForSequenceClassification
