"""Engine side of structured outputs: per-request grammar state and the logits mask.

Per decoding step the runner does, for the requests that have a grammar:

    bitmask = manager.allocate_bitmask(batch)          # int32 [batch, ceil(vocab / 32)]
    state.fill_bitmask(bitmask, row)                    # bit t of row: token t allowed
    apply_bitmask(logits, bitmask, rows)                # disallowed -> -inf, other rows untouched
    ... sample ...
    state.accept(token)                                 # False: finish that request with an error

Nothing here may take the engine loop down: `new_state` raises ValueError for a bad spec (the
caller finishes that one request), and a `GrammarState` never raises; an internal failure turns
it into a failed state whose next `accept` returns False.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from inferd.sampling_params import StructuredOutputsParams
from inferd.structured.compiler import (DEFAULT_COMPILE_TIMEOUT_S, GrammarCompiler, clean_error,
                                        require_xgrammar, xgr)
from inferd.structured.spec import build_spec

logger = logging.getLogger(__name__)

_BITS = 32  # tokens per bitmask word (xgrammar packs into int32)


class GrammarManager:
    """One per engine: owns the xgrammar tokenizer info, compiler and compiled-grammar cache."""

    def __init__(self, tokenizer: Any, vocab_size: int, *, stop_token_ids: list[int] | None = None,
                 compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S):
        """`vocab_size` is the model's logits width (may exceed the tokenizer's size; the extra
        ids are never allowed). `stop_token_ids` end a grammar (default: the tokenizer's EOS)."""
        self.vocab_size = vocab_size
        self.compiler = GrammarCompiler(tokenizer, vocab_size, stop_token_ids=stop_token_ids,
                                        compile_timeout_s=compile_timeout_s)

    def new_state(self, params: StructuredOutputsParams) -> GrammarState | DeferredGrammar:
        """Compile (or fetch from the cache) and start a matcher; raises ValueError if invalid.

        Blocks while compiling: milliseconds for typical specs, at most `compile_timeout_s`.
        """
        compiled = self.compiler.compile(build_spec(params))
        try:
            matcher = require_xgrammar().GrammarMatcher(compiled)
        except Exception as e:
            raise ValueError(f"Could not start the grammar matcher: {clean_error(e)}") from None
        state = GrammarState(matcher, self.vocab_size, self.compiler.stop_token_ids)
        return DeferredGrammar(state, params.start_after) if params.start_after else state

    def allocate_bitmask(self, batch_size: int) -> torch.Tensor:
        """A CPU int32 [batch_size, ceil(vocab_size / 32)] mask with every token allowed."""
        return torch.full((batch_size, -(-self.vocab_size // _BITS)), -1, dtype=torch.int32)

    def shutdown(self) -> None:
        self.compiler.shutdown()


class GrammarState:
    """One per request: an xgrammar matcher advanced by the request's sampled tokens."""

    active = True  # constrains the next token (a DeferredGrammar may not yet)

    def __init__(self, matcher: Any, vocab_size: int, stop_token_ids: list[int]):
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._stop_token_ids = [t for t in stop_token_ids if 0 <= t < vocab_size]
        self.error: str | None = None  # set when the matcher itself failed (not a rejection)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (a CPU int32 tensor)."""
        if self.error is not None or self._matcher.is_terminated():
            # Nothing more may follow; only a stop token keeps the request well formed while
            # the engine notices. (xgrammar refuses to fill a mask once terminated.)
            _allow_only(bitmask, row, self._stop_token_ids)
            return
        try:
            self._matcher.fill_next_token_bitmask(bitmask, row)
        except Exception as e:
            self._fail(f"filling the token mask failed: {clean_error(e)}")
            _allow_only(bitmask, row, self._stop_token_ids)

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar rejects it (state unchanged)."""
        # Checked here, not by xgrammar: it would log a warning line per rejected token.
        if self.error is not None or not 0 <= token_id < self._vocab_size:
            return False
        if self._matcher.is_terminated():
            return False
        try:
            return bool(self._matcher.accept_token(int(token_id)))
        except Exception as e:
            self._fail(f"accepting token {token_id} failed: {clean_error(e)}")
            return False

    def is_terminated(self) -> bool:
        """True once the grammar is complete and a stop token was accepted."""
        return self.error is None and bool(self._matcher.is_terminated())

    def _fail(self, message: str) -> None:
        logger.warning("structured outputs: %s", message)
        self.error = message


class DeferredGrammar:
    """A grammar that engages once `marker` (token ids) has been sampled: with a reasoning
    parser the model thinks freely and the grammar shapes the answer after `</think>`. Until
    then every token is accepted and no mask is applied."""

    def __init__(self, state: GrammarState, marker: list[int]):
        self.state = state
        self.marker = list(marker)
        self.active = not self.marker
        self._tail: list[int] = []

    @property
    def error(self) -> str | None:
        return self.state.error

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.state.fill_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        if self.active:
            return self.state.accept(token_id)
        self._tail = (self._tail + [int(token_id)])[-len(self.marker):]
        self.active = self._tail == self.marker
        return True

    def is_terminated(self) -> bool:
        return self.active and self.state.is_terminated()


def _allow_only(bitmask: torch.Tensor, row: int, token_ids: list[int]) -> None:
    bitmask[row].zero_()
    for t in token_ids:
        word, bit = divmod(t, _BITS)
        if word < bitmask.shape[1]:
            # int32 words: bit 31 is the sign bit, so build the value in int64 and wrap.
            value = int(bitmask[row, word]) | (1 << bit)
            bitmask[row, word] = value - (1 << 32) if value >= 1 << 31 else value


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                  rows: list[int] | torch.Tensor) -> None:
    """In place: `logits[r, t] = -inf` where bit t of `bitmask[r]` is 0, for each r in `rows`.

    `bitmask` rows line up with `logits` rows; rows not listed are left untouched. Columns past
    the mask's width (`bitmask.shape[1] * 32`) count as disallowed.
    """
    rows = rows.tolist() if isinstance(rows, torch.Tensor) else [int(r) for r in rows]
    if not rows:
        return
    if min(rows) < 0 or max(rows) >= min(logits.shape[0], bitmask.shape[0]):
        # Checked here because xgrammar's native kernel does not bounds-check its indices.
        raise IndexError(f"rows {rows} out of range for logits {tuple(logits.shape)} "
                         f"and bitmask {tuple(bitmask.shape)}")
    vocab, covered = logits.shape[-1], bitmask.shape[-1] * _BITS
    if covered < vocab:
        logits[rows, covered:] = float("-inf")
    if logits.device.type == "cpu" and xgr is not None and logits.dtype in _NATIVE_DTYPES:
        # xgrammar's C++ kernel: several times faster than the tensor ops below on CPU.
        xgr.apply_token_bitmask_inplace(logits, bitmask.cpu(), vocab_size=min(vocab, covered),
                                        indices=rows, backend="cpu")
    else:
        _apply_bitmask_torch(logits, bitmask, rows)


_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _apply_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Device-agnostic version (GPU): copy the small packed mask over, unpack it there."""
    vocab = min(logits.shape[-1], bitmask.shape[-1] * _BITS)
    rows_t = torch.tensor(rows, dtype=torch.long, device=logits.device)
    packed = bitmask.to(logits.device, non_blocking=True).index_select(0, rows_t)  # [R, W] int32
    shifts = torch.arange(_BITS, dtype=torch.int32, device=logits.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]: token t = word t // 32, bit t % 32
    allowed = bits.flatten(1)[:, :vocab].bool()  # [R, vocab]
    sub = logits[rows_t, :vocab]
    logits[rows_t, :vocab] = sub.masked_fill(~allowed, float("-inf"))
