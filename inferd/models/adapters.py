"""Pooling models from causal LMs, and the one entry point the engine uses to build any pooler.

A decoder-only LM becomes
- an embedding model (`--convert embed`): the hidden state of the LAST token (the only one that
  has attended to the whole input), L2-normalised; or MEAN pooling via --pooler-config;
- a classifier (`--convert classify`, and Qwen2/Qwen3/Llama `*ForSequenceClassification`
  checkpoints): a bias-free `score` head [num_labels, hidden] on the last token.

The adapter holds the registry's causal LM unchanged (its weights load through its own
`load_weights`) minus `lm_head`, which pooling never reads. Attention stays causal and runs
without a KV cache: a pooling request is scheduled whole, in one step, so every sequence
starts at position 0 and attends only to its own tokens.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from inferd.attention.metadata import AttentionMetadata
from inferd.config import ConfigError
from inferd.models.layers.linear import Linear
from inferd.models.pooler import (CLASSIFY, EMBED, SCORE, ClassifierPooler, EmbeddingPooler,
                                  PoolerConfig, PoolingType, num_labels_of, resolve_pooler_config,
                                  sentence_transformers_max_seq_length)
from inferd.models.registry import architectures_of, get_model_class
from inferd.sampling_params import PoolingParams

CONVERT_CHOICES = ("auto", "embed", "classify")


def causal_meta(meta: AttentionMetadata) -> AttentionMetadata:
    """A decoder attends causally whatever the runner built the metadata for."""
    return meta if meta.causal else dataclasses.replace(meta, causal=True)


class CausalLMPoolingModel(nn.Module):
    """A registry causal LM run as a pooler. Subclasses set `pooler_kind` and, for checkpoint
    architectures, `base_cls`; `as_pooling_model` makes one for any causal LM class."""

    is_pooling_model = True
    # To the runner this is an encoder: whole prompts in one step, no KV cache, metadata built
    # with causal=False (so 1-token prompts may sit anywhere in the batch); `forward` makes
    # the attention causal again.
    is_encoder = True
    uses_token_type_ids = False
    default_pooling = PoolingType.LAST
    base_cls: type[nn.Module]
    pooler_kind = EMBED

    def __init__(self, hf_config: Any, dtype: torch.dtype = torch.float32,
                 pooler_config: PoolerConfig | None = None):
        super().__init__()
        self.config = hf_config
        self.lm = self.base_cls(hf_config, dtype=dtype)
        self.lm.lm_head = None  # pooling never reads vocabulary logits
        self.lm.tie_word_embeddings = False
        cfg = pooler_config or resolve_pooler_config(
            hf_config, getattr(hf_config, "name_or_path", None) or None)
        if self.pooler_kind == CLASSIFY:
            self.score = Linear(hf_config.hidden_size, num_labels_of(hf_config), False, dtype)
            self.pooling = ClassifierPooler(cfg, self.default_pooling, self.score, hf_config)
        else:
            self.pooling = EmbeddingPooler(cfg, self.default_pooling)
        self.supported_tasks = self.pooling.tasks

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm(input_ids, positions, causal_meta(meta))

    def attention_layers(self) -> list[nn.Module]:
        return []  # no KV cache (see the module docstring); layers see kv_cache=None

    def pool(self, hidden: torch.Tensor, meta: AttentionMetadata,
             params: list[PoolingParams]) -> list[torch.Tensor]:
        return self.pooling(hidden, meta, params)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        score_loaded = False

        def lm_weights() -> Iterable[tuple[str, torch.Tensor]]:
            nonlocal score_loaded
            for name, tensor in weights:
                if name.startswith("lm_head."):
                    continue
                if name == "score.weight" and self.pooler_kind == CLASSIFY:
                    self._load_score(tensor)
                    score_loaded = True
                    continue
                if name.startswith("score."):
                    continue  # a classifier checkpoint served as an embedding model
                yield name, tensor

        self.lm.load_weights(lm_weights())
        if self.pooler_kind == CLASSIFY and not score_loaded:
            raise ConfigError("the checkpoint has no `score.weight`, so it cannot run as a classifier "
                              "(--convert classify needs a *ForSequenceClassification checkpoint)")

    @torch.no_grad()
    def _load_score(self, tensor: torch.Tensor) -> None:
        if tensor.shape != self.score.weight.shape:
            raise ValueError(f"score.weight has shape {tuple(tensor.shape)}; num_labels="
                             f"{self.score.weight.shape[0]} and hidden_size={self.score.weight.shape[1]} "
                             "expect " + str(tuple(self.score.weight.shape)))
        self.score.weight.copy_(tensor)


@functools.lru_cache(maxsize=None)
def as_pooling_model(base_cls: type[nn.Module], kind: str) -> type[CausalLMPoolingModel]:
    """`base_cls` (a registry causal LM) wrapped as an embedding model or a classifier."""
    if kind not in (EMBED, CLASSIFY):
        raise ConfigError(f"--convert {kind!r} is not one of embed, classify")
    suffix = "EmbeddingModel" if kind == EMBED else "ForSequenceClassification"
    return type(f"{base_cls.__name__.removesuffix('ForCausalLM')}{suffix}", (CausalLMPoolingModel,),
                {"base_cls": base_cls, "pooler_kind": kind, "__module__": __name__})


@functools.lru_cache(maxsize=None)
def _checkpoint_classifier(arch: str) -> type[CausalLMPoolingModel]:
    """`*ForSequenceClassification` checkpoints of registry decoders: `model.*` + `score.weight`."""
    base = get_model_class([arch.replace("ForSequenceClassification", "ForCausalLM")])
    return as_pooling_model(base, CLASSIFY)


def __getattr__(name: str) -> type[CausalLMPoolingModel]:
    # `registry.py` maps e.g. "Qwen3ForSequenceClassification" to this module's attribute; the
    # class is made on first access so importing this module never imports every decoder.
    if name.endswith("ForSequenceClassification") and name[0].isupper():
        return _checkpoint_classifier(name)
    raise AttributeError(name)


# ---------------------------------------------------------------------------------------------
# What the engine calls
# ---------------------------------------------------------------------------------------------
def pooling_model_class(hf_config: Any, convert: str = "auto", runner: str = "auto") -> type | None:
    """The class serving `hf_config` as a pooling model, or None for a generative model.

    `--convert embed|classify` wraps a causal LM; `--runner pooling` on a causal LM means
    `--convert embed` (as vLLM); an encoder or classifier checkpoint is a pooler by itself.
    """
    if convert not in CONVERT_CHOICES:
        raise ConfigError(f"--convert {convert!r} is not one of {', '.join(CONVERT_CHOICES)}")
    cls = get_model_class(architectures_of(hf_config))
    if getattr(cls, "is_pooling_model", False):
        if convert not in ("auto", cls.pooler_kind):
            raise ConfigError(f"--convert {convert} does not apply to {cls.__name__}, which is "
                              f"already a pooling model ({cls.pooler_kind}); drop --convert")
        return cls
    if convert == "auto":
        if runner != "pooling":
            return None
        convert = EMBED
    return as_pooling_model(cls, convert)


def build_pooling_model(cls: type, hf_config: Any, dtype: torch.dtype,
                        model_dir: str | Path | None,
                        pooler_overrides: dict[str, Any] | None = None) -> nn.Module:
    """`cls(hf_config, dtype, pooler_config)` with the checkpoint's sentence-transformers
    settings and `--pooler-config` applied. Weights are loaded by the caller."""
    cfg = resolve_pooler_config(hf_config, model_dir, pooler_overrides)
    return cls(hf_config, dtype=dtype, pooler_config=cfg)


def pooling_tasks(hf_config: Any, convert: str = "auto", runner: str = "auto") -> tuple[str, ...]:
    """The tasks a served pooling model supports (empty for a generative model):
    embedding models ("embed", "score"); classifiers ("classify",), plus "score" with one label."""
    cls = pooling_model_class(hf_config, convert, runner)
    if cls is None:
        return ()
    if cls.pooler_kind == CLASSIFY:
        return (CLASSIFY, SCORE) if num_labels_of(hf_config) == 1 else (CLASSIFY,)
    return (EMBED, SCORE)


def pooling_max_model_len(hf_config: Any, model_dir: str | Path | None) -> int | None:
    """The longest input a pooling model reads: RoBERTa-family position tables reserve
    padding_idx + 1 rows, and sentence-transformers' max_seq_length caps the rest
    (all-MiniLM-L6-v2: 256). None when the config does not say."""
    limit = getattr(hf_config, "max_position_embeddings", None)
    if limit is not None and getattr(hf_config, "model_type", "") in ("roberta", "xlm-roberta",
                                                                      "camembert"):
        from inferd.models.xlm_roberta import roberta_max_positions
        limit = roberta_max_positions(hf_config)
    st = sentence_transformers_max_seq_length(model_dir)
    if st is not None:
        limit = min(limit, st) if limit else st
    return int(limit) if limit else None
