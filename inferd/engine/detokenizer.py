"""Incremental detokenization and stop strings, per request, in the API process.

Two layers:
 - `_TextStream` turns token ids into text chunks. It decodes a small sliding window (the
   tokens of the last emitted chunk as context, plus the new ones) and emits the part past
   the context's text, so a token costs O(window), not O(output). A chunk is held while the
   window's text ends in U+FFFD: a multi-byte character (CJK, emoji) split across byte-level
   tokens is still incomplete, and emitting it would stream a broken character.
 - `IncrementalDetokenizer` matches stop strings on the output text with one KMP automaton
   per stop string (O(1) amortised per character) and releases text only when it can no
   longer become part of a stop-string match.

Semantics follow vLLM: stop strings are searched in the output text only (not the prompt);
the matched string is cut from the output unless `include_stop_str_in_output`; a stop
string must end in text of a token past `min_tokens`. When several stop strings could end
the text, the one that completes first wins (longest on a tie), so the result does not
depend on how the text happened to be split into tokens.
"""
from __future__ import annotations

from typing import Any

from inferd.sampling_params import SamplingParams

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded as context for the first output token (a SentencePiece decoder
# drops the leading space of the first token it sees; after context it must not).
_PRIME_TOKENS = 6
# A character needs at most 4 byte tokens. Text still ending in U+FFFD after this many is
# invalid bytes, not a character in progress: emit it rather than grow the window forever.
_MAX_PENDING_TOKENS = 16


def _decode_fn(tokenizer: Any, skip_special_tokens: bool):
    """The cheapest `ids -> str` available: the Rust tokenizer behind a transformers fast
    tokenizer, else the object's own `decode` (a `tokenizers.Tokenizer` or a slow HF one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    target = tokenizer if backend is None else backend
    return lambda ids: target.decode(ids, skip_special_tokens=skip_special_tokens)


def _added_tokens(tokenizer: Any) -> dict[int, str]:
    """Id -> content of every added (special or user-added) token."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None)
    if decoder is None and hasattr(tokenizer, "get_added_tokens_decoder"):
        decoder = tokenizer.get_added_tokens_decoder()
    return {i: str(getattr(t, "content", t)) for i, t in (decoder or {}).items()}


def decode_token_for_logprobs(tokenizer: Any, token_id: int) -> str:
    """One token's text for a logprobs entry, as vLLM shows it: decoded alone, special tokens
    kept (a lone byte of a multi-byte character shows as U+FFFD)."""
    return _decode_fn(tokenizer, skip_special_tokens=False)([token_id])


class _TextStream:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool,
                 spaces_between_special_tokens: bool):
        self._decode = _decode_fn(tokenizer, skip_special_tokens)
        # vLLM's rule: with spaces_between_special_tokens off (and specials kept), two added
        # tokens in a row are joined by nothing, whatever separator the decoder would insert.
        self._raw_added: dict[int, str] = {}
        if not (skip_special_tokens or spaces_between_special_tokens):
            self._raw_added = _added_tokens(tokenizer)
        self._last_added = False
        self._ids = self._prime(prompt_token_ids)  # context ids, then ids not yet emitted
        self._num_context = len(self._ids)
        self._context_text = self._decode(self._ids)

    def _prime(self, prompt_token_ids: list[int]) -> list[int]:
        tail = list(prompt_token_ids[-_PRIME_TOKENS:])
        # Start at a token whose text is whole characters: a tail that starts mid-character
        # would decode to U+FFFD and poison the context.
        for start in range(len(tail)):
            if _REPLACEMENT not in self._decode(tail[start:]):
                return tail[start:]
        return []

    def step(self, token_id: int) -> str:
        """Feed one token; return the text it completes ("" while a character is incomplete)."""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        pending = len(self._ids) - self._num_context
        if pending == 1 and text == self._context_text:
            # A skipped special token: the decoder never sees it, so neither does the window
            # (a long run of them would otherwise grow it without bound).
            self._ids.pop()
            return ""
        if len(text) <= len(self._context_text) or (
                text.endswith(_REPLACEMENT) and pending < _MAX_PENDING_TOKENS):
            chunk = ""
        elif text.startswith(self._context_text):
            chunk = text[len(self._context_text):]
        else:
            # The decoder rewrote the context's text given the new token (rare); emit the
            # pending tokens' own text rather than a slice at a misaligned offset.
            chunk = self._decode(self._ids[self._num_context:])
        if self._raw_added:
            chunk = self._join_added_raw(token_id, chunk)
        if chunk:
            # The tokens just emitted become the context for the next ones.
            self._ids = self._ids[self._num_context:]
            self._num_context = len(self._ids)
            self._context_text = self._decode(self._ids)
        return chunk

    def _join_added_raw(self, token_id: int, chunk: str) -> str:
        content = self._raw_added.get(token_id)
        if content is not None and self._last_added:
            chunk = content
        self._last_added = content is not None
        return chunk

    def flush(self) -> str:
        """The text of tokens still held (an incomplete character decodes to U+FFFD, as in
        `tokenizer.decode` of the whole output)."""
        if len(self._ids) == self._num_context:
            return ""
        text = self._decode(self._ids)
        if text.startswith(self._context_text):
            chunk = text[len(self._context_text):]
        else:
            chunk = self._decode(self._ids[self._num_context:])
        self._num_context = len(self._ids)
        self._context_text = text
        return chunk


class _StopMatcher:
    """KMP automaton for one stop string. `state` is the length of the longest prefix of the
    stop string that is a suffix of the text fed so far (a partial match still in play)."""

    def __init__(self, stop: str):
        self.stop = stop
        self.state = 0
        # fail[i]: length of the longest proper border of stop[:i + 1].
        self._fail = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self._fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self._fail[i] = k

    def feed(self, ch: str) -> bool:
        """Advance by one character; True when the whole stop string ends here."""
        s, stop = self.state, self.stop
        while s and stop[s] != ch:
            s = self._fail[s - 1]
        if stop[s] == ch:
            s += 1
        if s == len(stop):
            self.state = self._fail[s - 1]  # keep overlapping matches possible
            return True
        self.state = s
        return False


class IncrementalDetokenizer:
    """Per-request output text. Call `update` with each step's new tokens, then read
    `get_delta_text()` (streaming) or `output_text`; call `flush()` when the request
    finishes for any reason other than a stop string.

    Text lives in two places: `_parts`, released pieces that can no longer change, and
    `_tail`, the short suffix held back because it may still be cut by a stop string
    (at most the longest stop string plus one chunk). Appending never copies the whole text.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams):
        self._stream = _TextStream(tokenizer, prompt_token_ids, params.skip_special_tokens,
                                   params.spaces_between_special_tokens)
        self._matchers = [_StopMatcher(s) for s in params.stop]
        # Including the stop string means no released text can ever be cut: hold nothing.
        self._hold_back = bool(self._matchers) and not params.include_stop_str_in_output
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self.token_ids: list[int] = []
        self.stop_string: str | None = None  # the stop string that ended the output, if any
        self.finished = False
        self._parts: list[str] = []
        self._tail = ""
        self._num_returned_parts = 0  # parts already handed out by get_delta_text

    @property
    def output_text(self) -> str:
        """All released text."""
        return "".join(self._parts)

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Append tokens; return the stop string that matched (the output is then final).

        `stop_terminated`: the last token is a stop token / EOS chosen by the engine. As in
        vLLM its text is left out unless `include_stop_str_in_output`; call `flush()` next.
        """
        if self.finished:
            return None
        decode_ids = new_token_ids
        if stop_terminated and new_token_ids and not self._include_stop:
            decode_ids = new_token_ids[:-1]
        for token_id in decode_ids:
            self.token_ids.append(token_id)
            chunk = self._stream.step(token_id)
            if chunk and self._append(chunk, len(self.token_ids) > self._min_tokens):
                return self.stop_string
        self.token_ids.extend(new_token_ids[len(decode_ids):])
        self._release(self._held_length())
        return None

    def _append(self, chunk: str, may_stop: bool) -> bool:
        """Add text and run the stop automata over it; True when a stop string matched."""
        start = len(self._tail)
        self._tail += chunk
        if not self._matchers:
            return False
        for offset, ch in enumerate(chunk):
            matched = [m.stop for m in self._matchers if m.feed(ch)]
            if matched and may_stop:
                stop = max(matched, key=len)
                end = start + offset + 1
                # The match starts inside the tail: released text was never a partial match.
                self._tail = self._tail[:end if self._include_stop else end - len(stop)]
                self.stop_string = stop
                self._finish()
                return True
        return False

    def _held_length(self) -> int:
        """Length of the longest suffix that is still a prefix of some stop string."""
        return max(m.state for m in self._matchers) if self._hold_back else 0

    def _release(self, held: int) -> None:
        cut = len(self._tail) - held
        if cut > 0:
            self._parts.append(self._tail[:cut])
            self._tail = self._tail[cut:]

    def _finish(self) -> None:
        self.finished = True
        self._release(0)

    def get_delta_text(self) -> str:
        """Text released since the last call."""
        delta = "".join(self._parts[self._num_returned_parts:])
        self._num_returned_parts = len(self._parts)
        return delta

    def flush(self) -> str:
        """Finish (length / EOS / stop token / abort): release held-back text, including the
        U+FFFD of an incomplete last character; return what get_delta_text had not returned.

        Text the stream still held goes through the stop automata too, so the final text is
        the same however it was chunked; if that completes a stop string, `stop_string` is set.
        """
        if not self.finished:
            chunk = self._stream.flush()
            if not (chunk and self._append(chunk, len(self.token_ids) > self._min_tokens)):
                self._finish()
        return self.get_delta_text()
