"""What both processes need to know about a model before loading weights.

The API process reads this (tokenizer, limits, defaults); the engine process reads it too
and then loads the weights. Both resolve the same path, so they agree without messages.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferd.config import ConfigError, ModelConfig

logger = logging.getLogger(__name__)

GEN_DEFAULT_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                    "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


@dataclass
class ModelInfo:
    path: Path  # local directory or .gguf file
    hf_config: Any  # transformers.PretrainedConfig
    architecture: str
    max_position_embeddings: int
    vocab_size: int
    eos_token_ids: list[int]
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    is_gguf: bool = False
    # ("embed", "score"), ("classify", ...) for pooling models; empty for generative ones.
    pooling_tasks: tuple[str, ...] = ()

    @property
    def is_pooling(self) -> bool:
        return bool(self.pooling_tasks)

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        return self.pooling_tasks or ("generate",)

    def load_tokenizer(self):
        if self.is_gguf:
            from inferd.models.gguf import GGUFModel
            return GGUFModel(self.path).tokenizer()
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(self.path))


def _as_list(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


def read_model_info(cfg: ModelConfig) -> ModelInfo:
    from inferd.models.loader import resolve_model
    path = Path(resolve_model(cfg.model, cfg.revision, cfg.download_dir))
    gen: dict[str, Any] = {}
    chat_template = None
    if path.suffix == ".gguf":
        from inferd.models.gguf import GGUFModel
        g = GGUFModel(path)
        hf_config = g.hf_config
        chat_template = g.chat_template
        gen = dict(getattr(g, "generation_defaults", {}) or {})
        is_gguf = True
    else:
        from transformers import AutoConfig
        try:
            hf_config = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the model config in {path}: {e}") from None
        gen_path = path / "generation_config.json"
        if gen_path.exists():
            gen = json.loads(gen_path.read_text())
        is_gguf = False
    if cfg.generation_config not in ("auto", "vllm"):
        gen = json.loads((Path(cfg.generation_config) / "generation_config.json").read_text())
    text_cfg = getattr(hf_config, "text_config", None) or hf_config
    archs = getattr(hf_config, "architectures", None) or []
    if not archs:
        raise ConfigError(f"{path}: config.json names no architectures")
    eos = _as_list(gen.get("eos_token_id")) + _as_list(getattr(text_cfg, "eos_token_id", None))
    defaults = {}
    if cfg.generation_config != "vllm":
        defaults = {ours: gen[theirs] for theirs, ours in GEN_DEFAULT_KEYS.items()
                    if gen.get(theirs) is not None}
    from inferd.models.adapters import pooling_max_model_len, pooling_tasks
    if is_gguf and (cfg.runner == "pooling" or cfg.convert != "auto"):
        raise ConfigError(f"{path.name}: pooling (--runner pooling / --convert) is not supported "
                          "for GGUF checkpoints; serve the model's safetensors folder instead")
    tasks = () if is_gguf else pooling_tasks(hf_config, cfg.convert, cfg.runner)
    max_pos = int(getattr(text_cfg, "max_position_embeddings", 0) or 2048)
    if tasks:
        max_pos = pooling_max_model_len(hf_config, path) or max_pos
    return ModelInfo(
        path=path, hf_config=hf_config, architecture=archs[0], pooling_tasks=tasks,
        max_position_embeddings=max_pos,
        vocab_size=int(text_cfg.vocab_size),
        eos_token_ids=list(dict.fromkeys(eos)),
        generation_defaults=defaults, chat_template=chat_template, is_gguf=is_gguf)
