"""Compiling `GrammarSpec`s with xgrammar: a bounded cache, a time limit, readable errors.

One `GrammarCompiler` exists per (process, tokenizer): the API process uses it to reject bad
specs with a 400 before admission (`validate_structured_outputs`), the engine's
`GrammarManager` uses its own to build matchers. Both share these rules:

* every failure surfaces as `ValueError("Invalid <what>: <reason>")`; no xgrammar exception
  type leaves this module (the native library raises bare RuntimeErrors with C++ file paths);
* compilation runs on a small worker pool so a caller can stop waiting after
  `compile_timeout_s`. xgrammar cannot be interrupted, so the work goes on in the background,
  but concurrent requests for the same spec join the one in-flight compile instead of starting
  another, and its outcome (grammar or error) is cached when it lands;
* compiled grammars are cached by spec (LRU, bounded by count and bytes), failures too.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import threading
from collections import OrderedDict
from typing import Any

from inferd.sampling_params import StructuredOutputsParams
from inferd.structured.spec import GrammarSpec, build_spec

try:
    import xgrammar as xgr
except ImportError:  # optional dependency: `pip install inferd[structured]`
    xgr = None

logger = logging.getLogger(__name__)

DEFAULT_COMPILE_TIMEOUT_S = 10.0  # a small schema takes ~10 ms; bounded repeats take seconds
DEFAULT_CACHE_ENTRIES = 512
DEFAULT_CACHE_BYTES = 512 * 2**20
_MAX_FAILURES = 1024  # cached error messages (cheap strings)
_MAX_MESSAGE_CHARS = 400  # xgrammar echoes the whole schema in some messages


def require_xgrammar() -> Any:
    if xgr is None:
        raise ValueError("Structured outputs are not available: the xgrammar package is not "
                         "installed (pip install 'inferd[structured]')")
    return xgr


def clean_error(exc: BaseException) -> str:
    """xgrammar's message without its log prefix, C++ location and check boilerplate."""
    msg = str(exc).strip() or type(exc).__name__
    msg = re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", msg)  # "[23:06:04] /project/cpp/x.cc:83: "
    msg = re.sub(r"^Check failed: \(.*?\) is false:\s*", "", msg)
    msg = re.sub(r"^Invalid [\w ]+ error:\s*", "", msg)  # InvalidStructuralTagError's own prefix
    msg = " ".join(msg.split())
    if len(msg) > _MAX_MESSAGE_CHARS:
        msg = msg[:_MAX_MESSAGE_CHARS] + "..."
    return msg


class GrammarCompiler:
    """xgrammar's TokenizerInfo + compiler for one tokenizer, behind our cache and time limit."""

    def __init__(self, tokenizer: Any, vocab_size: int | None = None, *,
                 stop_token_ids: list[int] | None = None,
                 compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S,
                 max_threads: int | None = None,
                 cache_entries: int = DEFAULT_CACHE_ENTRIES,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        xg = require_xgrammar()
        # vocab_size is the logits width; xgrammar masks ids past the tokenizer's vocabulary.
        self.tokenizer_info = xg.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids or None)
        threads = max_threads or min(8, os.cpu_count() or 1)
        # xgrammar's own cache is off: ours is keyed by the normalised spec, bounded, and also
        # remembers failures.
        self._xgr = xg.GrammarCompiler(self.tokenizer_info, max_threads=threads, cache_enabled=False)
        self.compile_timeout_s = compile_timeout_s
        self._cache_entries, self._cache_bytes = cache_entries, cache_bytes
        self._lock = threading.RLock()  # RLock: a done-callback may run inside `compile`'s lock
        self._cache: OrderedDict[GrammarSpec, tuple[Any, int]] = OrderedDict()  # spec -> (grammar, bytes)
        self._cached_bytes = 0
        self._failures: OrderedDict[GrammarSpec, str] = OrderedDict()
        self._inflight: dict[GrammarSpec, concurrent.futures.Future] = {}
        # Two workers: one pathological spec cannot stall every other compile.
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="inferd-grammar")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer_info.vocab_size

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self.tokenizer_info.stop_token_ids)

    def compile(self, spec: GrammarSpec) -> Any:
        """The `xgrammar.CompiledGrammar` for `spec`; blocks up to `compile_timeout_s`.

        Raises ValueError (invalid spec, or too slow to compile).
        """
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit[0]
            failure = self._failures.get(spec)
            if failure is not None:
                raise ValueError(failure)
            future = self._inflight.get(spec)
            if future is None:
                future = self._pool.submit(self._compile_now, spec)
                self._inflight[spec] = future
                future.add_done_callback(lambda f, s=spec: self._on_done(s, f))
        try:
            return future.result(timeout=self.compile_timeout_s)
        except concurrent.futures.TimeoutError:
            raise ValueError(f"Invalid {spec.label}: compiling it took longer than "
                             f"{self.compile_timeout_s:g} s; simplify it (large bounded "
                             "repetitions such as maxLength or {m,n} are costly)") from None

    def cache_size(self) -> int:
        with self._lock:
            return len(self._cache)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- internals ----------------------------------------------------------------------------
    def _compile_now(self, spec: GrammarSpec) -> Any:
        """Runs on a worker thread; every native failure becomes a ValueError."""
        try:
            if spec.method == "json_schema":
                # strict_mode (xgrammar's default, as in vLLM): no properties beyond the schema's.
                return self._xgr.compile_json_schema(spec.source, any_whitespace=spec.any_whitespace,
                                                     strict_mode=True)
            if spec.method == "regex":
                return self._xgr.compile_regex(spec.source)
            if spec.method == "ebnf":
                return self._xgr.compile_grammar(spec.source)
            if spec.method == "lark":
                return self._xgr.compile_lark(spec.source)
            if spec.method == "structural_tag":
                return self._xgr.compile_structural_tag(spec.source)
            raise ValueError(f"unknown grammar method {spec.method!r}")
        except Exception as e:  # native library: any exception here means "this spec is bad"
            raise ValueError(f"Invalid {spec.label}: {clean_error(e)}") from None

    def _on_done(self, spec: GrammarSpec, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._inflight.pop(spec, None)
            if future.cancelled():
                return
            exc = future.exception()
            if exc is not None:
                self._failures[spec] = str(exc)
                while len(self._failures) > _MAX_FAILURES:
                    self._failures.popitem(last=False)
                return
            grammar = future.result()
            size = int(grammar.memory_size_bytes)
            self._cache[spec] = (grammar, size)
            self._cached_bytes += size
            while self._cache and (len(self._cache) > self._cache_entries
                                   or self._cached_bytes > self._cache_bytes):
                _, (_, evicted) = self._cache.popitem(last=False)
                self._cached_bytes -= evicted


# --- API side ---------------------------------------------------------------------------------
_api_compilers: dict[int, tuple[Any, GrammarCompiler]] = {}  # id(tokenizer) -> (tokenizer, compiler)
_api_lock = threading.Lock()


def _api_compiler(tokenizer: Any) -> GrammarCompiler:
    with _api_lock:
        entry = _api_compilers.get(id(tokenizer))
        # Holding the tokenizer in the entry keeps its id from being reused by another object.
        if entry is None or entry[0] is not tokenizer:
            entry = (tokenizer, GrammarCompiler(tokenizer))
            _api_compilers[id(tokenizer)] = entry
        return entry[1]


def validate_structured_outputs(params: StructuredOutputsParams, tokenizer: Any) -> None:
    """Raise ValueError (a 400) unless `params` compiles for `tokenizer`.

    Runs in the API process before admission. It blocks for the compile (ms for typical
    specs, up to `DEFAULT_COMPILE_TIMEOUT_S`), so async callers should use
    `asyncio.to_thread`. Results are cached by spec.
    """
    spec = build_spec(params)
    require_xgrammar()
    try:
        compiler = _api_compiler(tokenizer)
    except Exception as e:  # a tokenizer xgrammar cannot read: say so instead of a 500
        raise ValueError("Structured outputs are not supported for this tokenizer: "
                         f"{clean_error(e)}") from None
    compiler.compile(spec)
