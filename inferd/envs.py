"""The one module that reads INFERD_* environment variables.

These are debug and deployment knobs only; everything a user tunes per run is a config field
(inferd/config.py). Values are read at attribute access, not import, so tests can monkeypatch
the environment: `from inferd import envs; envs.INFERD_USE_MODELSCOPE`.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


def _str(name: str, default: str) -> str:
    raw = os.environ.get(name)
    return default if raw is None or raw.strip() == "" else raw.strip()


_VARIABLES: dict[str, Callable[[], Any]] = {
    # Download hub ids from ModelScope, not the Hugging Face Hub (needs `pip install modelscope`).
    "INFERD_USE_MODELSCOPE": lambda: _bool("INFERD_USE_MODELSCOPE", False),
    # Force an attention backend: auto | torch | flash | triton | cpu (`auto`: flash-attn on
    # CUDA if installed, else triton; inferd's kernels on CPU).
    "INFERD_ATTENTION_BACKEND": lambda: _str("INFERD_ATTENTION_BACKEND", "auto").lower(),
    # Root logger level for inferd's loggers.
    "INFERD_LOGGING_LEVEL": lambda: _str("INFERD_LOGGING_LEVEL", "INFO").upper(),
    # API key(s) for `inferd serve` when --api-key is not given (comma-separated for several).
    "INFERD_API_KEY": lambda: _str("INFERD_API_KEY", ""),
    # Keep serving (with /health at 503) after the engine dies, instead of exiting non-zero.
    "INFERD_KEEP_ALIVE_ON_ENGINE_DEATH": lambda: _bool("INFERD_KEEP_ALIVE_ON_ENGINE_DEATH", False),
    # Engine compute threads on CPU (0: one per core in the process's affinity). Fewer threads
    # can win on a machine shared with other busy processes: a descheduled thread stalls every
    # parallel op.
    "INFERD_CPU_THREADS": lambda: int(_str("INFERD_CPU_THREADS", "0") or 0),
    # CPU linear layers through oneDNN with weights packed once at load (on) or plain
    # F.linear through torch's BLAS (off; MKL picks slow paths on AMD CPUs).
    "INFERD_CPU_ONEDNN_LINEAR": lambda: _bool("INFERD_CPU_ONEDNN_LINEAR", True),
    # inferd's own CPU kernels (inferd/kernels/cpu_kernels.cpp, built with the host's C++
    # compiler on first use): paged decode attention, KV writes, argmax. Off: pure torch ops.
    "INFERD_CPU_KERNELS": lambda: _bool("INFERD_CPU_KERNELS", True),
}

if TYPE_CHECKING:  # the names, for type checkers and readers
    INFERD_USE_MODELSCOPE: bool
    INFERD_ATTENTION_BACKEND: str
    INFERD_LOGGING_LEVEL: str
    INFERD_API_KEY: str
    INFERD_KEEP_ALIVE_ON_ENGINE_DEATH: bool
    INFERD_CPU_THREADS: int
    INFERD_CPU_ONEDNN_LINEAR: bool
    INFERD_CPU_KERNELS: bool


def __getattr__(name: str) -> Any:
    if name in _VARIABLES:
        return _VARIABLES[name]()
    raise AttributeError(f"module 'inferd.envs' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(_VARIABLES)
