"""Find a model's files and build the model from them.

    path = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")    # or a local dir / .gguf file
    hf_config = load_hf_config(path)
    model = load_model(path, hf_config, torch.bfloat16, "cpu")

`--model` may be a local HF directory (config.json + *.safetensors), a local .gguf file, or a hub
id downloaded with huggingface_hub (or ModelScope when INFERD_USE_MODELSCOPE=true). Failures to
find or fetch a model raise `ModelNotFoundError` with a one-line message naming the fix.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from inferd import envs
from inferd.config import ConfigError
from inferd.models.layers.linear import prepack_linears
from inferd.models.registry import architectures_of, get_model_class

logger = logging.getLogger(__name__)

# What a served model needs from a hub repo: weights, configs, tokenizer and chat template files.
HUB_ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer*", "*.model", "*.tiktoken",
                      "*.txt"]

Weights = Iterator[tuple[str, torch.Tensor]]


class ModelNotFoundError(ConfigError):
    """--model is neither a usable local path nor a hub id that could be fetched."""


def resolve_model(model: str, revision: str | None = None, download_dir: str | None = None) -> Path:
    """Local directory or .gguf file, else download a hub id; returns the local path."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.is_file():
        if path.suffix == ".gguf":
            return path.resolve()
        raise ModelNotFoundError(f"--model {model!r} is a file but not a .gguf; pass a model "
                                 "directory, a .gguf file or a hub id")
    if _looks_local(model):
        raise ModelNotFoundError(f"--model {model!r}: no such file or directory")
    if envs.INFERD_USE_MODELSCOPE:
        return _download_modelscope(model, revision, download_dir)
    return _download_hf(model, revision, download_dir)


def _looks_local(model: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything path-shaped is meant to be on disk.
    return (model.startswith(("/", "./", "../", "~")) or model.endswith(".gguf")
            or model.count("/") > 1 or os.sep != "/" and os.sep in model)


def _hf_offline() -> bool:
    # Read at call time (huggingface_hub reads it once at import).
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _download_hf(model: str, revision: str | None, download_dir: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    offline = _hf_offline()
    try:
        return Path(snapshot_download(repo_id=model, revision=revision, cache_dir=download_dir,
                                      allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=offline))
    except HFValidationError:
        message = "is neither a local path nor a valid Hugging Face Hub id (owner/name)"
    except RepositoryNotFoundError:
        message = ("was not found on the Hugging Face Hub (if it is private or gated, "
                   "log in with `hf auth login` or set HF_TOKEN)")
    except RevisionNotFoundError:
        message = f"has no revision {revision!r} on the Hugging Face Hub"
    except LocalEntryNotFoundError:
        message = ("is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                   "downloading it; unset HF_HUB_OFFLINE, or pass a local directory or .gguf file"
                   if offline else
                   "could not be downloaded from the Hugging Face Hub and is not in the local "
                   "cache; check network access (or HF_ENDPOINT), or pass a local directory or "
                   ".gguf file")
    except OSError as e:
        message = f"could not be downloaded from the Hugging Face Hub ({type(e).__name__}: {e})"
    raise ModelNotFoundError(f"model {model!r} {message}")


def _download_modelscope(model: str, revision: str | None, download_dir: str | None) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ModelNotFoundError(
            "INFERD_USE_MODELSCOPE=true but the `modelscope` package is not installed; "
            "`pip install modelscope` or unset the variable") from None
    try:
        return Path(snapshot_download(model, revision=revision, cache_dir=download_dir,
                                      allow_patterns=HUB_ALLOW_PATTERNS))
    except (OSError, ValueError, RuntimeError) as e:  # modelscope raises assorted types
        raise ModelNotFoundError(f"model {model!r} could not be downloaded from ModelScope "
                                 f"({type(e).__name__}: {e}); check the id and network access, "
                                 "or pass a local directory") from None


def load_hf_config(model_path: Path) -> Any:
    """The transformers PretrainedConfig of a resolved model (a directory or a .gguf file)."""
    model_path = Path(model_path)
    if model_path.suffix == ".gguf":
        from inferd.models.gguf import GGUFModel

        return GGUFModel(model_path).hf_config
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_path))


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's shards: from model.safetensors.index.json, else every *.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        names = sorted(p.name for p in model_dir.glob("*.safetensors"))
        # Mistral repos ship consolidated.safetensors (original names) beside the HF shards.
        if len(names) > 1:
            names = [n for n in names if not n.startswith("consolidated")] or names
    if not names:
        raise ModelNotFoundError(f"no *.safetensors weights in {model_dir} (only safetensors "
                                 "checkpoints and .gguf files are supported)")
    return [model_dir / n for n in names]


def iter_safetensors_weights(model_dir: Path) -> Weights:
    """(HF tensor name, CPU tensor) for every tensor of a (possibly sharded) checkpoint."""
    from safetensors import safe_open

    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _count_safetensors(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            total += len(list(f.keys()))
    return total


def _weight_source(model_path: Path, dtype: torch.dtype | None = None,
                   raw_blocks: dict | None = None) -> tuple[Weights, int | None]:
    if model_path.suffix == ".gguf":
        from inferd.models.gguf import GGUFModel

        gguf = GGUFModel(model_path)
        names = getattr(gguf, "weight_names", None)
        # Dequantize straight to the runtime dtype: no fp32 copy of every tensor on the way.
        kw = {} if raw_blocks is None else {"raw_blocks": raw_blocks}
        return (gguf.iter_weights(dtype or torch.float32, **kw),
                len(names()) if callable(names) else None)
    return iter_safetensors_weights(model_path), _count_safetensors(model_path)


def load_checkpoint(model: nn.Module, model_path: Path, dtype: torch.dtype | None = None,
                    raw_blocks: dict | None = None) -> None:
    """Stream a checkpoint's tensors into `model.load_weights`, with a progress bar.
    `raw_blocks` collects a GGUF's Q4/Q8 blocks as they stream past (`GGUFModel.iter_weights`)."""
    from tqdm.auto import tqdm

    model_path = Path(model_path)
    weights, total = _weight_source(model_path, dtype, raw_blocks)
    progress = tqdm(weights, total=total, desc=f"Loading {model_path.name}", unit="tensor",
                    leave=False)
    try:
        model.load_weights(progress)
    finally:
        progress.close()


def _cpu_block_kernels() -> bool:
    from inferd.kernels import cpu as kernels
    lib = kernels.load()
    return lib is not None and bool(lib.inferd_has_gemv_bf16())


def load_model(model_path: Path, hf_config: Any, dtype: torch.dtype, device: str | torch.device,
               *, build: Callable[[], nn.Module] | None = None,
               quantization: str | None = None) -> nn.Module:
    """Build the model for `hf_config` on `device`, load its weights, return it in eval mode.

    `build` replaces the registry class's constructor (e.g. a pooling adapter around a causal
    LM); it runs under `torch.device(device)` like the default. `quantization` ("int8" |
    "int4") swaps the linear layers for quantized ones once the float weights are loaded.
    """
    device = torch.device(device)
    with torch.device(device):  # parameters are allocated where they will live, uninitialised
        if build is not None:
            model = build()
        else:
            model = get_model_class(architectures_of(hf_config))(hf_config, dtype=dtype)
    # bf16 on CPU keeps a GGUF's Q4/Q8 blocks beside the float weights: decode steps of a few
    # sequences read those (2-2.8x fewer bytes), larger batches the bf16 copy through oneDNN.
    raw_blocks = {} if (device.type == "cpu" and dtype == torch.bfloat16 and quantization is None
                        and Path(model_path).suffix == ".gguf" and _cpu_block_kernels()) else None
    load_checkpoint(model, Path(model_path), dtype, raw_blocks)
    model = model.to(device).eval()
    if raw_blocks:
        from inferd.models.layers.quant import attach_gguf_blocks
        from inferd.models.layers.weights import LLAMA_STACKED

        n = attach_gguf_blocks(model, raw_blocks, LLAMA_STACKED)
        logger.info("%d linear layers read their GGUF blocks directly in decode steps", n)
        raw_blocks.clear()
        from inferd.kernels import cpu as kernels

        if not kernels.has_amx(kernels.load()):  # built now, not in the first decode step
            for m in model.modules():
                if getattr(m, "_q4", None) is not None:
                    m._q4.tiles()
    if quantization is not None:
        from inferd.models.layers.quant import quantize_model

        quantize_model(model, quantization)
    if device.type == "cpu" and envs.INFERD_CPU_ONEDNN_LINEAR:
        prepack_linears(model)
    return model
