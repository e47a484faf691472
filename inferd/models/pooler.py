"""Pooling: one vector per sequence from the hidden states of a flat, unpadded batch.

A pooling step's hidden states are `[T, H]` for B sequences laid end to end; sequence i owns
rows `[meta.query_start_loc[i], meta.query_start_loc[i + 1])`. A pooler reduces each sequence
(CLS / MEAN / LAST token, or ALL tokens), then applies what the request asks for:

- embedding models: Matryoshka truncation to `dimensions`, then L2 normalisation (the order
  sentence-transformers and vLLM use, so a truncated vector is still unit length);
- classifiers: a head (the model's), then softmax / sigmoid unless `use_activation=False`.

What a model's pooler does by default comes from, in increasing priority: the model class
(e.g. CLS for BERT), the sentence-transformers files next to the checkpoint (modules.json,
1_Pooling/config.json, a Normalize module), and the user's `--pooler-config` dict.
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from inferd.attention.metadata import AttentionMetadata
from inferd.config import ConfigError
from inferd.sampling_params import PoolingParams

# Tasks a pooling request may name (PoolingParams.task). "encode" returns every token's vector.
EMBED, CLASSIFY, SCORE, ENCODE = "embed", "classify", "score", "encode"


class PoolingType(str, enum.Enum):
    CLS = "CLS"  # the first token ([CLS] / <s>)
    MEAN = "MEAN"  # the mean over every token, special tokens included (as sentence-transformers)
    LAST = "LAST"  # the last token (causal LMs: the only one that has seen the whole input)
    ALL = "ALL"  # every token: [L, H] per sequence


@dataclass
class PoolerConfig:
    """How a pooling model reduces and post-processes; None fields take the model's default."""

    pooling_type: PoolingType | None = None
    normalize: bool | None = None
    """L2-normalise embeddings (requests may override per call)."""
    use_activation: bool | None = None
    """softmax / sigmoid on classifier logits (requests may override per call)."""
    activation: str | None = None
    """Classifier activation: sigmoid | softmax | identity | tanh (default: from the config)."""
    dimensions: int | None = None
    """Default Matryoshka output size when a request names none."""
    matryoshka_dimensions: list[int] | None = None
    """The sizes the model was trained to truncate to; None with is_matryoshka means any."""
    is_matryoshka: bool | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PoolerConfig":
        """From `--pooler-config` JSON; unknown keys are an error naming the known ones."""
        return cls(**parse_pooler_overrides(d))


def parse_pooler_overrides(d: Mapping[str, Any]) -> dict[str, Any]:
    """`--pooler-config` JSON, validated and typed: only the keys the user gave."""
    d = dict(d)
    # vLLM's older spellings of the activation switch.
    for alias in ("softmax", "activation"):
        if isinstance(d.get(alias), bool):
            d.setdefault("use_activation", d.pop(alias))
    known = {f.name for f in fields(PoolerConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"--pooler-config has unknown keys {unknown}; known: {sorted(known)}")
    if d.get("pooling_type") is not None:
        d["pooling_type"] = _pooling_type(d["pooling_type"], "--pooler-config pooling_type")
    if d.get("activation") is not None and d["activation"] not in _ACTIVATIONS:
        raise ConfigError(f"--pooler-config activation {d['activation']!r} is not one of "
                          f"{sorted(_ACTIVATIONS)}")
    if d.get("dimensions") is not None and (not isinstance(d["dimensions"], int) or d["dimensions"] < 1):
        raise ConfigError(f"--pooler-config dimensions must be a positive int, got {d['dimensions']!r}")
    if d.get("matryoshka_dimensions"):
        d["is_matryoshka"] = True
    return d


def _pooling_type(value: Any, where: str) -> PoolingType:
    try:
        return PoolingType(str(value).upper())
    except ValueError:
        raise ConfigError(f"{where} {value!r} is not one of {[t.value for t in PoolingType]}") from None


# ---------------------------------------------------------------------------------------------
# Reading the checkpoint's sentence-transformers files
# ---------------------------------------------------------------------------------------------
_ST_POOLING_MODES = {"cls": PoolingType.CLS, "mean": PoolingType.MEAN, "lasttoken": PoolingType.LAST}


def read_sentence_transformers_config(model_dir: str | Path | None) -> PoolerConfig:
    """Pooling type and normalisation from modules.json + the Pooling module's config.json.

    A model without modules.json gives an empty config (the model class decides). Modules we
    cannot reproduce (Dense projections, max pooling) raise, rather than serve vectors that
    silently differ from what sentence-transformers computes.
    """
    if model_dir is None or not (Path(model_dir) / "modules.json").is_file():
        return PoolerConfig()
    root = Path(model_dir)
    modules = json.loads((root / "modules.json").read_text())
    cfg = PoolerConfig(normalize=False)
    for m in modules:
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Pooling":
            cfg.pooling_type = _st_pooling_type(root / m.get("path", "") / "config.json")
        elif kind == "Normalize":
            cfg.normalize = True
        elif kind in ("Dense", "LayerNorm", "WeightedLayerPooling", "WordWeights", "CNN", "LSTM"):
            raise ConfigError(f"{root}: sentence-transformers module {kind} (in modules.json) is not "
                              "supported; vectors would differ from sentence-transformers")
    return cfg


def _st_pooling_type(path: Path) -> PoolingType | None:
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    if isinstance(d.get("pooling_mode"), str):  # newer sentence-transformers spelling
        modes = [d["pooling_mode"].lower().removesuffix("_tokens").removesuffix("_token")]
    else:
        modes = [k.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
                 for k, v in d.items() if k.startswith("pooling_mode_") and v is True]
    if d.get("include_prompt") is False:
        raise ConfigError(f"{path}: include_prompt=false pooling is not supported")
    if len(modes) != 1 or modes[0] not in _ST_POOLING_MODES:
        raise ConfigError(f"{path}: pooling mode {modes} is not supported; "
                          f"supported: {sorted(_ST_POOLING_MODES)}")
    return _ST_POOLING_MODES[modes[0]]


def sentence_transformers_max_seq_length(model_dir: str | Path | None) -> int | None:
    """sentence_bert_config.json's max_seq_length: sentence-transformers truncates there, so it
    is the model's real context (all-MiniLM-L6-v2: 256, though BERT's positions reach 512)."""
    if model_dir is None:
        return None
    path = Path(model_dir) / "sentence_bert_config.json"
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("max_seq_length")
    return int(value) if value else None


def resolve_pooler_config(hf_config: Any, model_dir: str | Path | None,
                          overrides: Mapping[str, Any] | PoolerConfig | None = None) -> PoolerConfig:
    """The checkpoint's pooling settings (sentence-transformers files, Matryoshka fields of
    config.json) with the user's `--pooler-config` on top. Model-class defaults fill the rest."""
    cfg = read_sentence_transformers_config(model_dir)
    dims = getattr(hf_config, "matryoshka_dimensions", None)
    if dims or getattr(hf_config, "is_matryoshka", False):
        cfg.is_matryoshka = True
        cfg.matryoshka_dimensions = [int(x) for x in dims] if dims else None
    if isinstance(overrides, PoolerConfig):
        # Typed overrides (offline use): the fields they set.
        cfg = replace(cfg, **{f.name: getattr(overrides, f.name) for f in fields(overrides)
                              if getattr(overrides, f.name) is not None})
    elif overrides:
        cfg = replace(cfg, **parse_pooler_overrides(overrides))
    return cfg


# ---------------------------------------------------------------------------------------------
# Reductions over the flat batch
# ---------------------------------------------------------------------------------------------
def pool_tokens(hidden: torch.Tensor, meta: AttentionMetadata,
                pooling_type: PoolingType) -> torch.Tensor | list[torch.Tensor]:
    """[T, H] -> [B, H] (CLS / MEAN / LAST) in float32, or a list of [L_i, H] for ALL."""
    qsl = meta.query_start_loc
    if pooling_type is PoolingType.ALL:
        return [hidden[qsl[i]:qsl[i + 1]].float() for i in range(meta.num_seqs)]
    if pooling_type is PoolingType.CLS:
        return hidden[torch.tensor(qsl[:-1], device=hidden.device)].float()
    if pooling_type is PoolingType.LAST:
        return hidden[torch.tensor(qsl[1:], device=hidden.device) - 1].float()
    # MEAN: one scatter-add by sequence index (no per-sequence loop, no padding).
    lens = torch.tensor([qsl[i + 1] - qsl[i] for i in range(meta.num_seqs)], device=hidden.device)
    seq_idx = torch.repeat_interleave(torch.arange(meta.num_seqs, device=hidden.device), lens,
                                      output_size=hidden.shape[0])
    sums = torch.zeros(meta.num_seqs, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, seq_idx, hidden.float())
    return sums / lens.unsqueeze(1).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Poolers: what a model's `pool()` delegates to
# ---------------------------------------------------------------------------------------------
class EmbeddingPooler(nn.Module):
    """Embeddings: reduce, truncate to `dimensions`, normalise. Tasks: embed, score (the
    bi-encoder scores by cosine of two embeddings), encode (per-token vectors, flattened)."""

    tasks = (EMBED, SCORE, ENCODE)

    def __init__(self, config: PoolerConfig, default_pooling: PoolingType):
        super().__init__()
        self.pooling_type = config.pooling_type or default_pooling
        self.normalize = True if config.normalize is None else config.normalize
        self.default_dimensions = config.dimensions

    def forward(self, hidden: torch.Tensor, meta: AttentionMetadata,
                params: list[PoolingParams]) -> list[torch.Tensor]:
        pooled: list[torch.Tensor] | torch.Tensor | None = None
        if any(p.task != ENCODE for p in params):
            pooled = pool_tokens(hidden, meta, self.pooling_type)
        tokens = None
        if any(p.task == ENCODE for p in params):
            tokens = pool_tokens(hidden, meta, PoolingType.ALL)
        out = []
        for i, p in enumerate(params):
            if p.task not in self.tasks:
                raise ValueError(f"an embedding model cannot run task {p.task!r}")
            v = tokens[i] if p.task == ENCODE else pooled[i]
            dims = p.dimensions or self.default_dimensions
            if dims is not None:
                v = v[..., :dims]
            normalize = self.normalize if p.normalize is None else p.normalize
            v = F.normalize(v, p=2, dim=-1) if normalize else v
            # Per-token output travels as one flat float list (the engine protocol's type),
            # row-major [L * dims]; the HTTP layer reshapes it by the prompt's token count.
            out.append(v.flatten())
        return out


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,
    "softmax": lambda x: torch.softmax(x, dim=-1),
    "identity": lambda x: x,
    "tanh": torch.tanh,
}
# sentence-transformers CrossEncoder configs name the activation by its torch class path; only
# these are honoured (never imported by name).
_ST_ACTIVATIONS = {"torch.nn.modules.activation.Sigmoid": "sigmoid",
                   "torch.nn.modules.linear.Identity": "identity",
                   "torch.nn.modules.activation.Tanh": "tanh",
                   "torch.nn.modules.activation.Softmax": "softmax"}


def classifier_activation(hf_config: Any, config: PoolerConfig) -> str:
    """The activation a classifier's logits get, following (in order) --pooler-config,
    a sentence-transformers CrossEncoder's `activation_fn`, then transformers' problem_type
    (regression: none; multi-label: sigmoid); by default sigmoid for one label, else softmax."""
    if config.activation is not None:
        return config.activation
    st = getattr(hf_config, "sentence_transformers", None) or {}
    name = st.get("activation_fn") if isinstance(st, Mapping) else None
    name = name or getattr(hf_config, "sbert_ce_default_activation_function", None)
    if name:
        if name not in _ST_ACTIVATIONS:
            raise ConfigError(f"classifier activation {name!r} is not supported; known: "
                              f"{sorted(_ST_ACTIVATIONS)} (override with --pooler-config "
                              "'{\"activation\": \"sigmoid\"}')")
        return _ST_ACTIVATIONS[name]
    problem = getattr(hf_config, "problem_type", None)
    if problem == "regression":
        return "identity"
    if problem == "multi_label_classification" or num_labels_of(hf_config) == 1:
        return "sigmoid"
    return "softmax"


def num_labels_of(hf_config: Any) -> int:
    id2label = getattr(hf_config, "id2label", None)
    return len(id2label) if id2label else int(getattr(hf_config, "num_labels", 2))


class ClassifierPooler(nn.Module):
    """Classification: reduce, apply the model's head, then the activation. Tasks: classify
    (probabilities, or logits with use_activation=False); score for one-label cross-encoders."""

    def __init__(self, config: PoolerConfig, default_pooling: PoolingType,
                 head: Callable[[torch.Tensor], torch.Tensor], hf_config: Any):
        super().__init__()
        self.pooling_type = config.pooling_type or default_pooling
        # A bound method, never a registered submodule: the model owns the head's weights.
        self.head = head.forward if isinstance(head, nn.Module) else head
        self.activation = _ACTIVATIONS[classifier_activation(hf_config, config)]
        self.use_activation = True if config.use_activation is None else config.use_activation
        self.num_labels = num_labels_of(hf_config)
        self.tasks = (CLASSIFY, SCORE) if self.num_labels == 1 else (CLASSIFY,)

    def forward(self, hidden: torch.Tensor, meta: AttentionMetadata,
                params: list[PoolingParams]) -> list[torch.Tensor]:
        for p in params:
            if p.task not in self.tasks:
                raise ValueError(f"a {self.num_labels}-label classifier cannot run task {p.task!r}")
        pooled = pool_tokens(hidden, meta, self.pooling_type)
        # The head runs in the model's dtype; activations in float32.
        logits = self.head(pooled.to(hidden.dtype)).float()  # [B, num_labels]
        act = self.activation(logits)
        return [act[i] if (self.use_activation if p.use_activation is None else p.use_activation)
                else logits[i] for i, p in enumerate(params)]
