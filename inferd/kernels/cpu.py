"""The CPU kernels of `csrc/`: built once per machine, loaded through ctypes.

Why ctypes and not a torch C++ extension: the kernels take raw pointers and need no torch
headers, so a build is one `g++` call of about a second instead of a minute of compiling
torch's headers, and there is no ninja or build-isolation step to get wrong on a fresh machine.
The library is built with `-march=native` into the user cache, keyed by the source, the
compiler and the CPU's feature flags, so a cache shared between different machines never hands
one of them code it cannot run. Without a compiler (or with INFERD_CPU_KERNELS=0) `load()`
returns None and callers keep their pure-torch path.

Every wrapper checks dtypes, devices, shapes and strides before passing pointers: the C side
trusts what it is given.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
ABI_VERSION = 3
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# -ffp-contract=off: no fused multiply-adds the source did not write, so kernels that
# replace torch op sequences round exactly as those ops do.
_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
NATIVE = "native"
"""-march for the library the engine loads; tests also build portable variants (x86-64-v2)
to check the code paths other CPUs take."""

_i64, _f32, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    "inferd_abi_version": ([], ctypes.c_int),
    "inferd_decode_attention": ([ctypes.c_int, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr,
                                 _i64, _i64, _i64, _i64, _i64, _f32, _i64, _f32, _i64], None),
    "inferd_prefill_attention": ([_ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr,
                                  _i64, _i64, _i64, _i64, _i64, _i64, _f32, _i64, _i64], None),
    "inferd_write_kv": ([ctypes.c_int, _ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _i64],
                        None),
    "inferd_argmax_f32": ([_ptr, _i64, _i64, _ptr], None),
    "inferd_rms_norm": ([ctypes.c_int, _ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _i64, _i64, _f32,
                         ctypes.c_int], None),
    "inferd_rotary": ([ctypes.c_int, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr], None),
    "inferd_act_and_mul": ([ctypes.c_int, _ptr, _ptr, _i64, _i64, ctypes.c_int], None),
    "inferd_has_gemv_bf16": ([], ctypes.c_int),
    "inferd_gemv_bf16": ([_ptr, ctypes.c_int, _i64, _ptr, _i64, _ptr, _ptr, _i64, _i64, _i64],
                         None),
    "inferd_gemv_q4": ([_ptr, ctypes.c_int, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _i64,
                        _i64], None),
    "inferd_gemv_q8": ([_ptr, ctypes.c_int, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64],
                       None),
    "inferd_amx_init": ([], ctypes.c_int),
    "inferd_decoder_layers": ([_ptr, _i64, _ptr, _ptr, _ptr], None),
    "inferd_gemm_q4_amx": ([_ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64],
                           None),
    "inferd_gemm_q4_avx512": ([_ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _i64,
                               _i64], None),
}
ACTIVATIONS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu_fast": 1}
"""Gated activations with a kernel; others (exact erf GELU) stay on torch."""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "inferd" / "kernels"


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or "g++"
    return shutil.which(cxx)


def _sources() -> list[Path]:
    return sorted(CSRC.glob("*.cpp"))


def _flags(march: str) -> list[str]:
    return [f"-march={march}", *_FLAGS]


def library_path(cxx: str, march: str = NATIVE) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    code = [p.read_text() for p in sorted(CSRC.iterdir()) if p.suffix in (".cpp", ".h")]
    key = hashlib.sha256("\0".join([*code, " ".join(_flags(march)), version,
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    return _cache_dir() / f"cpu_kernels-{key}.so"


def build(cxx: str, march: str = NATIVE) -> Path:
    """Compile the library unless this machine's build is cached; returns its path. The build
    goes to a temporary name first, so concurrent builders never load a half-written file."""
    path = library_path(cxx, march)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        res = subprocess.run([cxx, *_flags(march), *map(str, _sources()), "-o", tmp],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{cxx} failed to build the CPU kernels:\n{res.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def open_library(path: Path) -> ctypes.CDLL:
    """A built library with every entry point's ctypes signature set."""
    lib = ctypes.CDLL(str(path))
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL | None:
    """The kernel library, or None when disabled or unbuildable (logged once)."""
    from inferd import envs
    if not envs.INFERD_CPU_KERNELS:
        return None
    cxx = _compiler()
    if cxx is None:
        logger.warning("no C++ compiler found (set CXX): CPU kernels off, using torch ops")
        return None
    try:
        lib = open_library(build(cxx))
    except (OSError, RuntimeError) as e:
        logger.warning("CPU kernels unavailable, using torch ops: %s", e)
        return None
    if lib.inferd_abi_version() != ABI_VERSION:
        logger.warning("CPU kernel library has a different ABI version: using torch ops")
        return None
    return lib


def for_tensor(x: torch.Tensor) -> ctypes.CDLL | None:
    """The library when `x` is a CPU tensor of a dtype the kernels take, else None: the one
    test the model layers make before choosing a kernel over their torch ops."""
    if x.device.type != "cpu" or x.dtype not in DTYPE_CODES:
        return None
    return load()


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(f"cpu kernel: {what}")


def _rows_contiguous(x: torch.Tensor) -> bool:
    """Every dim but the first is packed (the first may have any stride >= the row size)."""
    expected = 1
    for size, stride in zip(reversed(x.shape[1:]), reversed(x.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return x.shape[0] <= 1 or x.stride(0) >= expected


def check_paged_metadata(slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: list[int], num_blocks: int, block_size: int) -> None:
    """What the kernels index with, checked against the cache once per step (the same metadata
    serves every layer): a bad slot or block id would read or write out of bounds."""
    if slot_mapping.numel():
        lo, hi = torch.aminmax(slot_mapping)
        _check(int(lo) >= 0 and int(hi) < num_blocks * block_size, "slot out of range")
    if block_tables.numel():
        lo, hi = torch.aminmax(block_tables)
        _check(int(lo) >= 0 and int(hi) < num_blocks, "block id out of range")
    _check(max(seq_lens, default=0) <= block_tables.shape[1] * block_size,
           "sequence longer than its block table")


def decode_attention(lib: ctypes.CDLL, q: torch.Tensor, kv_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     sliding_window: int | None, soft_cap: float | None,
                     use_amx: bool = False) -> torch.Tensor:
    """q [n, H, D] (one query per sequence), kv_cache [2, NB, bs, Hkv, D], block_tables int32
    [>= n, max_blocks], seq_lens int32 [>= n] -> [n, H, D]; sequence i attends to the first
    seq_lens[i] positions of its blocks (the last of which is the query's own). The caller
    has checked tables and lengths against the cache (`check_paged_metadata`). `use_amx`
    takes the AMX tiles for bf16 where the library has them and the process was granted them
    (`has_amx`; head dims 32/64/128/256, block sizes a multiple of 16, <= 16 query heads per
    KV head), else the AVX512-BF16 path."""
    n, h, d = q.shape
    _, nb, bs, hkv, dk = kv_cache.shape
    _check(q.dtype == kv_cache.dtype and q.dtype in DTYPE_CODES, "dtype")
    _check(dk == d and h % hkv == 0 and kv_cache.is_contiguous() and _rows_contiguous(q), "layout")
    _check(block_tables.dtype == torch.int32 and seq_lens.dtype == torch.int32
           and block_tables.stride(1) == 1 and seq_lens.is_contiguous()
           and block_tables.shape[0] >= n and seq_lens.shape[0] >= n, "tables")
    out = torch.empty(n, h, d, dtype=q.dtype)
    lib.inferd_decode_attention(DTYPE_CODES[q.dtype], out.data_ptr(), q.data_ptr(), q.stride(0),
                                kv_cache.data_ptr(), nb, block_tables.data_ptr(),
                                block_tables.stride(0), seq_lens.data_ptr(), n, h, hkv, d, bs,
                                scale, sliding_window or 0, soft_cap or 0.0, int(use_amx))
    return out


def prefill_attention_applies(q: torch.Tensor, kv_cache: torch.Tensor, block_size: int,
                              soft_cap: float | None) -> bool:
    """Shapes and dtypes `prefill_attention` serves (else the caller uses SDPA)."""
    _, _, _, hkv, d = kv_cache.shape
    h = q.shape[1]
    return (q.dtype == kv_cache.dtype == torch.bfloat16 and soft_cap is None
            and block_size % 16 == 0 and d % 32 == 0 and d <= 256 and h % hkv == 0
            and h // hkv <= 8)


def check_prefill_rows(query_start: list[int], seq_lens: list[int], num_tokens: int) -> None:
    """Query rows of each sequence in order, inside the step's tokens, and no more of them
    than the sequence has positions (checked once per step, like `check_paged_metadata`)."""
    n = len(query_start) - 1
    _check(n <= len(seq_lens) and query_start[0] >= 0 and query_start[-1] <= num_tokens
           and all(0 <= query_start[i + 1] - query_start[i] <= seq_lens[i] for i in range(n)),
           "prefill query rows")


def prefill_attention(lib: ctypes.CDLL, q: torch.Tensor, kv_cache: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor,
                      query_start: torch.Tensor, first: int, scale: float,
                      sliding_window: int | None, out: torch.Tensor,
                      use_amx: bool = False) -> None:
    """Causal attention of the prefill rows of sequences [first, len(query_start) - 1) into
    out (bf16 [T, H, D]): sequence i's queries are q rows [query_start[i], query_start[i+1]),
    the last of its seq_lens[i] positions, and attend to its blocks in kv_cache (which already
    hold their K/V). The caller has checked `prefill_attention_applies`, the tables and
    lengths against the cache (`check_paged_metadata`) and the rows (`check_prefill_rows`).
    `use_amx` takes the AMX tiles where the library has them and the process was granted them
    (`has_amx`), else the AVX512-BF16 path."""
    t, h, d = q.shape
    _, nb, bs, hkv, dk = kv_cache.shape
    n = query_start.shape[0] - 1
    _check(q.dtype == kv_cache.dtype == out.dtype == torch.bfloat16, "dtype")
    _check(dk == d and prefill_attention_applies(q, kv_cache, bs, None)
           and kv_cache.is_contiguous() and _rows_contiguous(q) and out.shape == q.shape
           and _rows_contiguous(out), "layout")
    _check(block_tables.dtype == torch.int32 and seq_lens.dtype == torch.int32
           and query_start.dtype == torch.int32 and query_start.is_contiguous()
           and block_tables.stride(1) == 1 and seq_lens.is_contiguous()
           and block_tables.shape[0] >= n and seq_lens.shape[0] >= n and 0 <= first <= n,
           "tables")
    lib.inferd_prefill_attention(out.data_ptr(), out.stride(0), q.data_ptr(), q.stride(0),
                                 kv_cache.data_ptr(), nb, block_tables.data_ptr(),
                                 block_tables.stride(0), seq_lens.data_ptr(),
                                 query_start.data_ptr(), first, n, h, hkv, d, bs, scale,
                                 sliding_window or 0, int(use_amx))


def write_kv(lib: ctypes.CDLL, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """kv_cache[0/1] at flat slot s <- k/v[t] for slot_mapping[t] = s (as `write_kv_cache`).
    The caller has checked every slot against the cache (`check_paged_metadata`)."""
    _, nb, bs, hkv, d = kv_cache.shape
    t = k.shape[0]
    _check(k.dtype == v.dtype == kv_cache.dtype and k.dtype in DTYPE_CODES, "dtype")
    _check(kv_cache.is_contiguous() and k.shape == v.shape == (t, hkv, d)
           and _rows_contiguous(k) and _rows_contiguous(v), "layout")
    _check(slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
           and slot_mapping.shape == (t,), "slots")
    if t == 0:
        return
    lib.inferd_write_kv(DTYPE_CODES[k.dtype], kv_cache.data_ptr(), nb * bs, k.data_ptr(),
                        k.stride(0), v.data_ptr(), v.stride(0), slot_mapping.data_ptr(), t,
                        hkv * d)


def argmax(lib: ctypes.CDLL, x: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax of float32 [B, V], as `x.argmax(-1)` (first maximum; NaN wins)."""
    _check(x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous(), "argmax input")
    out = torch.empty(x.shape[0], dtype=torch.int64)
    if x.shape[1] == 0:
        raise ValueError("argmax of an empty row")
    lib.inferd_argmax_f32(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
    return out


def rms_norm(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool,
             residual: torch.Tensor | None = None, out: torch.Tensor | None = None
             ) -> torch.Tensor:
    """RMSNorm over the last dim of 2-D x, rounded as torch's eager ops round (see
    csrc/elementwise.cpp). With `residual`: residual <- x + residual (in place), and the
    result normalises that sum, as vLLM's fused_add_rms_norm."""
    rows, dim = x.shape
    _check(x.dtype == weight.dtype and x.dtype in DTYPE_CODES, "dtype")
    _check(weight.shape == (dim,) and weight.is_contiguous() and _rows_contiguous(x), "layout")
    if residual is not None:
        _check(residual.dtype == x.dtype and residual.shape == x.shape
               and _rows_contiguous(residual), "residual")
    out = torch.empty(rows, dim, dtype=x.dtype) if out is None else out
    _check(out.shape == x.shape and out.dtype == x.dtype and _rows_contiguous(out), "out")
    lib.inferd_rms_norm(DTYPE_CODES[x.dtype], out.data_ptr(), out.stride(0) if rows else dim,
                        x.data_ptr(), x.stride(0) if rows else dim,
                        None if residual is None else residual.data_ptr(),
                        residual.stride(0) if residual is not None and rows else dim,
                        weight.data_ptr(), rows, dim, eps, int(gemma))
    return out


def rotary_(lib: ctypes.CDLL, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in place: x [T, heads, D], cos/sin [T, 1, D] or [T, D] from
    `RotaryEmbedding` (x's dtype, sign folded into sin); same rounding as `apply_rotary`."""
    t, heads, d = x.shape
    _check(x.dtype == cos.dtype == sin.dtype and x.dtype in DTYPE_CODES, "dtype")
    _check(d % 2 == 0 and _rows_contiguous(x) and cos.is_contiguous() and sin.is_contiguous()
           and cos.numel() == sin.numel() == t * d, "layout")
    lib.inferd_rotary(DTYPE_CODES[x.dtype], x.data_ptr(), x.stride(0) if t else 0, t, heads, d,
                      cos.data_ptr(), sin.data_ptr())
    return x


def act_and_mul(lib: ctypes.CDLL, x: torch.Tensor, activation: str) -> torch.Tensor:
    """[rows, 2n] (gate | up) -> act(gate) * up [rows, n], each op rounded as torch's."""
    rows, two_n = x.shape
    _check(x.dtype in DTYPE_CODES and x.is_contiguous() and two_n % 2 == 0, "layout")
    _check(activation in ACTIVATIONS, f"activation {activation!r}")
    out = torch.empty(rows, two_n // 2, dtype=x.dtype)
    lib.inferd_act_and_mul(DTYPE_CODES[x.dtype], out.data_ptr(), x.data_ptr(), rows, two_n // 2,
                           ACTIVATIONS[activation])
    return out


def _matmul_out(x: torch.Tensor, n: int, k: int, bias: torch.Tensor | None, max_rows: int,
                what: str) -> torch.Tensor:
    """Checks shared by the matmul wrappers (x [M, K] bf16 rows, weight of N x k, optional
    bf16 bias [N]); returns the bf16 output [M, N] to fill."""
    m = x.shape[0]
    _check(x.dim() == 2 and x.dtype == torch.bfloat16 and x.shape[1] == k and x.stride(1) == 1
           and m <= max_rows and (bias is None or (bias.dtype == torch.bfloat16
                                                   and bias.shape == (n,))), what)
    return torch.empty(m, n, dtype=torch.bfloat16)


def _addr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def gemv_bf16(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] bf16 (M <= 8) @ weight [N, K] bf16 (+ bias) -> [M, N] bf16 (fp32 accumulation,
    rounded once, as oneDNN's bf16 linear)."""
    n, k = weight.shape
    _check(weight.is_contiguous(), "gemv weight")
    out = _matmul_out(x, n, k, bias, 8, "gemv")
    lib.inferd_gemv_bf16(out.data_ptr(), 0, n, x.data_ptr(), x.stride(0), weight.data_ptr(),
                         _addr(bias), out.shape[0], n, k)
    return out


def gemv_q4(lib: ctypes.CDLL, x: torch.Tensor, q4, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] bf16 (M <= 8) @ W^T with W in 4-bit blocks (`quant.Q4Weights`) -> [M, N] bf16."""
    n, k = q4.shape
    out = _matmul_out(x, n, k, bias, 8, "gemv_q4")
    lib.inferd_gemv_q4(out.data_ptr(), 0, n, x.data_ptr(), x.stride(0), q4.qs.data_ptr(),
                       q4.d.data_ptr(), q4.m.data_ptr(), _addr(bias), out.shape[0], n, k)
    return out


def gemv_q8(lib: ctypes.CDLL, x: torch.Tensor, q8, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] bf16 (M <= 8) @ W^T with W in Q8_0 blocks (`quant.Q8Weights`) -> [M, N] bf16."""
    n, k = q8.shape
    out = _matmul_out(x, n, k, bias, 8, "gemv_q8")
    lib.inferd_gemv_q8(out.data_ptr(), 0, n, x.data_ptr(), x.stride(0), q8.qs.data_ptr(),
                       q8.d.data_ptr(), _addr(bias), out.shape[0], n, k)
    return out


@functools.lru_cache(maxsize=None)
def has_amx(lib: ctypes.CDLL) -> bool:
    """AMX built in, and this process granted the tile state by the kernel (asked once)."""
    return bool(lib.inferd_amx_init())


def gemm_q4(lib: ctypes.CDLL, x: torch.Tensor, q4, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] bf16 @ W^T with W in 4-bit blocks (`quant.Q4Weights`) -> [M, N] bf16: on AMX
    tiles where `has_amx(lib)` (weights rounded to bf16, as the bf16 path has them), else with
    AVX512-BF16 on the blocks regrouped into `Q4Weights.tiles` (weights exact, as the skinny
    kernel has them). The caller has checked `inferd_has_gemv_bf16`."""
    n, k = q4.shape
    out = _matmul_out(x, n, k, bias, 1 << 30, "gemm_q4")
    if has_amx(lib):
        lib.inferd_gemm_q4_amx(out.data_ptr(), n, x.data_ptr(), x.stride(0), q4.qs.data_ptr(),
                               q4.d.data_ptr(), q4.m.data_ptr(), _addr(bias), out.shape[0], n, k)
        return out
    t = q4.tiles()  # aligned as the kernel needs (checked when built)
    lib.inferd_gemm_q4_avx512(out.data_ptr(), n, x.data_ptr(), x.stride(0), t.tq.data_ptr(),
                              t.td.data_ptr(), t.tm.data_ptr(), _addr(bias), out.shape[0], n, k)
    return out
