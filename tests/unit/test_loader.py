"""Model resolution, weight iteration and model building (tiny checkpoints, no network)."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from inferd.attention.metadata import build_attention_metadata
from inferd.models.loader import (ModelNotFoundError, iter_safetensors_weights, load_hf_config,
                                  load_model, resolve_model)
from inferd.models.registry import get_model_class


def _tiny_llama(path: Path, **save_kwargs) -> dict[str, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, **save_kwargs)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_local_dir_loads_and_runs(tmp_path):
    _tiny_llama(tmp_path)
    path = resolve_model(str(tmp_path))
    assert path == tmp_path.resolve()
    model = load_model(path, load_hf_config(path), torch.float32, "cpu")
    meta = build_attention_metadata([0], [3], [], 16)  # no KV cache bound: cache-less prefill
    with torch.no_grad():
        logits = model.compute_logits(model(torch.tensor([1, 2, 3]), torch.arange(3), meta))
    assert logits.shape == (3, 64) and logits.dtype == torch.float32
    assert not model.training


def test_sharded_checkpoint_iterates_every_tensor(tmp_path):
    state = _tiny_llama(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = dict(iter_safetensors_weights(tmp_path))
    expected = {k for k in state if k != "lm_head.weight"}  # tied: saved once
    assert set(loaded) == expected
    for name in expected:
        torch.testing.assert_close(loaded[name], state[name])


def test_unknown_architecture_names_supported_ones():
    with pytest.raises(ValueError, match="FooForCausalLM") as e:
        get_model_class(["FooForCausalLM"])
    assert "LlamaForCausalLM" in str(e.value) and "Gemma3ForCausalLM" in str(e.value)


def test_missing_tensor_is_an_error(tmp_path):
    _tiny_llama(tmp_path)
    config = load_hf_config(tmp_path)
    model = get_model_class(config.architectures)(config)
    weights = [(n, t) for n, t in iter_safetensors_weights(tmp_path) if "k_proj" not in n]
    with pytest.raises(ValueError, match="missing"):
        model.load_weights(weights)


def test_hub_id_offline_gives_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("inferd-test/does-not-exist", download_dir=str(tmp_path))
    message = str(e.value)
    assert "inferd-test/does-not-exist" in message and "HF_HUB_OFFLINE" in message
    assert "\n" not in message
    assert e.value.__suppress_context__ or e.value.__context__ is None  # no chained traceback


def test_local_paths_that_do_not_exist(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="no such file"):
        resolve_model("missing-model.gguf")
    other = tmp_path / "weights.bin"
    other.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        resolve_model(str(other))


def test_modelscope_without_package(monkeypatch):
    monkeypatch.setenv("INFERD_USE_MODELSCOPE", "true")
    monkeypatch.setitem(sys.modules, "modelscope", None)  # import fails as if not installed
    with pytest.raises(ModelNotFoundError, match="pip install modelscope"):
        resolve_model("Qwen/Qwen3-0.6B")


def test_gguf_file_dispatches_to_gguf_reader(monkeypatch, tmp_path):
    """A .gguf path builds the model from GGUFModel's config and HF-named weights."""
    ckpt = tmp_path / "ckpt"
    _tiny_llama(ckpt)
    config = load_hf_config(ckpt)

    class FakeGGUF:
        def __init__(self, path):
            self.hf_config = config

        def iter_weights(self, dtype=None):
            return iter_safetensors_weights(ckpt)

    monkeypatch.setitem(sys.modules, "inferd.models.gguf",
                        types.SimpleNamespace(GGUFModel=FakeGGUF))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    path = resolve_model(str(gguf))
    model = load_model(path, load_hf_config(path), torch.float32, "cpu")
    assert model.config is config
