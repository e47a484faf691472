"""HF architecture name -> model class, imported lazily (only the served model's module loads).

Adding an architecture: write its module, add one line to `_MODELS`.
"""
from __future__ import annotations

import importlib
from typing import Any

_MODELS: dict[str, tuple[str, str]] = {
    # HF `architectures` entry: (module, class)
    "LlamaForCausalLM": ("inferd.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("inferd.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("inferd.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("inferd.models.qwen3", "Qwen3ForCausalLM"),
    "Gemma3ForCausalLM": ("inferd.models.gemma3", "Gemma3ForCausalLM"),
    # text-only serving of the multimodal checkpoints (the vision tower is skipped)
    "Gemma3ForConditionalGeneration": ("inferd.models.gemma3", "Gemma3ForCausalLM"),
    # pooling models (embeddings, classifiers, cross-encoders)
    "BertModel": ("inferd.models.bert", "BertModel"),
    "BertForSequenceClassification": ("inferd.models.bert", "BertForSequenceClassification"),
    "XLMRobertaModel": ("inferd.models.xlm_roberta", "XLMRobertaModel"),
    "XLMRobertaForSequenceClassification": ("inferd.models.xlm_roberta", "XLMRobertaForSequenceClassification"),
    "RobertaModel": ("inferd.models.xlm_roberta", "XLMRobertaModel"),
    "RobertaForSequenceClassification": ("inferd.models.xlm_roberta", "XLMRobertaForSequenceClassification"),
    "LlamaForSequenceClassification": ("inferd.models.adapters", "LlamaForSequenceClassification"),
    "Qwen2ForSequenceClassification": ("inferd.models.adapters", "Qwen2ForSequenceClassification"),
    "Qwen3ForSequenceClassification": ("inferd.models.adapters", "Qwen3ForSequenceClassification"),
}

# Configs without `architectures` (e.g. built from GGUF metadata) fall back on `model_type`.
_DEFAULT_ARCH_FOR_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForConditionalGeneration",
    "bert": "BertModel",
    "roberta": "RobertaModel",
    "xlm-roberta": "XLMRobertaModel",
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def architectures_of(hf_config: Any) -> list[str]:
    """`hf_config.architectures`, or the default for its `model_type` when that is missing."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs and getattr(hf_config, "model_type", None) in _DEFAULT_ARCH_FOR_MODEL_TYPE:
        archs = [_DEFAULT_ARCH_FOR_MODEL_TYPE[hf_config.model_type]]
    return archs


def get_model_class(architectures: list[str]) -> type:
    """The class for the first supported entry of a config's `architectures`."""
    for arch in architectures or []:
        if arch in _MODELS:
            module, cls = _MODELS[arch]
            return getattr(importlib.import_module(module), cls)
    raise ValueError(f"model architecture {list(architectures or [])} is not supported; "
                     f"supported architectures: {', '.join(supported_architectures())}")
