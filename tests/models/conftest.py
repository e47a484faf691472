"""Tiny random checkpoints of each supported architecture, and a minimal paged-cache runner.

Each checkpoint is built from transformers' own config class, every weight perturbed (norm
gains and biases too, so a mis-loaded norm or bias cannot hide behind its init value), saved
with `save_pretrained` (safetensors) and kept beside the HF model as the reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from paged_runner import PagedRunner

# The test machines are small and shared: one intra-op thread avoids OpenMP oversubscription
# (spinning threads made these tiny-model tests ~5x slower under load) and is plenty here.
torch.set_num_threads(1)

VOCAB = 256
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
               eos_token_id=None, bos_token_id=None, pad_token_id=None)


def _configs() -> dict[str, Any]:
    from transformers import (Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config,
                              Qwen3Config)

    llama3_rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                   "rope_theta": 500000.0}
    return {
        "llama": LlamaConfig(**_COMMON, num_hidden_layers=2, tie_word_embeddings=True,
                             rope_parameters=llama3_rope),
        "mistral": MistralConfig(**_COMMON, num_hidden_layers=2, sliding_window=7,
                                 tie_word_embeddings=False),
        "qwen2": Qwen2Config(**_COMMON, num_hidden_layers=2, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "linear", "factor": 2.0,
                                              "rope_theta": 10000.0}),
        "qwen3": Qwen3Config(**_COMMON, num_hidden_layers=2, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 64,
                                              "rope_theta": 10000.0}),
        # window 6 < every prompt; a final soft cap small enough to bend the logits
        "gemma3": Gemma3TextConfig(**_COMMON, num_hidden_layers=3, sliding_window=6,
                                   layer_types=["sliding_attention", "full_attention",
                                                "sliding_attention"],
                                   query_pre_attn_scalar=24, final_logit_softcapping=8.0),
    }


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Any test taking `decoder_arch` runs once per architecture.
    if "decoder_arch" in metafunc.fixturenames:
        metafunc.parametrize("decoder_arch", ARCHS)


@dataclass
class TinyModel:
    path: Path
    hf_model: Any  # transformers model, float32, eager attention
    vocab_size: int = VOCAB


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    from transformers import AutoModelForCausalLM

    out = {}
    for i, (name, config) in enumerate(_configs().items()):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                 dtype=torch.float32)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "norm" in pname or pname.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.3)
                else:
                    p.normal_(0.0, 0.08)  # bigger than HF's 0.02: peaked logits, no near-ties
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        out[name] = TinyModel(path, model.eval())
    return out


@pytest.fixture
def tiny_decoder(tiny_models: dict[str, TinyModel], decoder_arch: str) -> TinyModel:
    return tiny_models[decoder_arch]


@pytest.fixture
def paged_runner() -> type[PagedRunner]:
    return PagedRunner
