"""The streaming machine shared by the `<think>...</think>` reasoning parsers.

Subclasses state their rules as a few hooks (where the stream starts, what an output without a
leading `<think>` means, which tags end reasoning implicitly) and write `extract` directly, as the
readable statement of those rules. The streaming side below must reproduce `extract` for any cut
of the text into deltas; the property test in tests/unit/test_parsers.py holds it to that.
"""
from __future__ import annotations

from enum import Enum
from typing import Any

from inferd.entrypoints.parsers.markers import find_first_marker, is_proper_prefix, partial_marker_len
from inferd.entrypoints.parsers.reasoning.base import ReasoningParser
from inferd.entrypoints.parsers.types import DeltaMessage

THINK_START = "<think>"
THINK_END = "</think>"


class Mode(Enum):
    PREFIX = "prefix"        # start of output: is there a leading <think> to strip?
    REASONING = "reasoning"  # inside the reasoning block
    HELD = "held"            # saw an implicit end tag; reasoning unless </think> still follows
    CONTENT = "content"      # reasoning is over; everything passes through


def strip_start_tag(text: str) -> tuple[str, bool]:
    """Drop a leading `<think>` (and the whitespace before it); say whether there was one."""
    stripped = text.lstrip()
    if stripped.startswith(THINK_START):
        return stripped[len(THINK_START):], True
    return text, False


class ThinkTagReasoningParser(ReasoningParser):
    # Tags that end reasoning only when no `</think>` follows them anywhere in the output
    # (qwen3's bare `<tool_call>`). Text from such a tag onward is held until that is known.
    implicit_end_tags: tuple[str, ...] = ()

    def __init__(self, *, chat_template_kwargs: dict[str, Any] | None = None,
                 prompt_text: str | None = None):
        super().__init__(chat_template_kwargs=chat_template_kwargs, prompt_text=prompt_text)
        self._buf = ""  # text received but not yet emitted
        self._mode = self.initial_mode()

    # -- hooks ---------------------------------------------------------------------------------
    def initial_mode(self) -> Mode:
        return Mode.PREFIX

    def mode_without_start_tag(self) -> Mode:
        """Where an output that does not open with `<think>` starts."""
        return Mode.REASONING

    def grammar_start_marker(self) -> str | None:
        return None if self.reasoning_ended else THINK_END

    # -- streaming -----------------------------------------------------------------------------
    @property
    def reasoning_ended(self) -> bool:
        return self._mode is Mode.CONTENT

    def feed(self, delta_text: str) -> DeltaMessage:
        self._buf += delta_text
        return self._drain(final=False)

    def finish(self) -> DeltaMessage:
        return self._drain(final=True)

    def _drain(self, final: bool) -> DeltaMessage:
        out = DeltaMessage()
        # Each step emits what it can; it returns True when it changed mode, so the next mode
        # gets to look at the rest of the buffer in the same call.
        while self._step(out, final):
            pass
        return out

    def _step(self, out: DeltaMessage, final: bool) -> bool:
        mode = self._mode
        if mode is Mode.CONTENT:
            return self._step_content(out, final)
        if mode is Mode.REASONING:
            return self._step_reasoning(out, final)
        if mode is Mode.PREFIX:
            return self._step_prefix(out, final)
        return self._step_held(out, final)

    def _step_prefix(self, out: DeltaMessage, final: bool) -> bool:
        stripped = self._buf.lstrip()
        if stripped.startswith(THINK_START):
            self._buf = stripped[len(THINK_START):]
            self._mode = Mode.REASONING
            return True
        if not final and (not stripped or is_proper_prefix(stripped, THINK_START)):
            return False  # whitespace, or "<thi": the tag may still come
        self._mode = self.mode_without_start_tag()
        return True

    def _step_reasoning(self, out: DeltaMessage, final: bool) -> bool:
        tags = (THINK_END, *self.implicit_end_tags)
        hit = find_first_marker(self._buf, tags)
        if hit is not None:
            index, tag = hit
            out.add_reasoning(self._buf[:index])
            if tag == THINK_END:
                self._buf = self._buf[index + len(tag):]
                self._mode = Mode.CONTENT
            else:
                self._buf = self._buf[index:]  # the implicit tag belongs to the content
                self._mode = Mode.HELD
            return True
        keep = 0 if final else partial_marker_len(self._buf, tags)
        cut = len(self._buf) - keep
        out.add_reasoning(self._buf[:cut])
        self._buf = self._buf[cut:]
        return False

    def _step_held(self, out: DeltaMessage, final: bool) -> bool:
        index = self._buf.find(THINK_END)
        if index >= 0:  # the implicit tag was inside the reasoning after all
            out.add_reasoning(self._buf[:index])
            self._buf = self._buf[index + len(THINK_END):]
            self._mode = Mode.CONTENT
            return True
        if final:  # no </think> anywhere: reasoning ended at the implicit tag
            self._mode = Mode.CONTENT
            return True
        return False

    def _step_content(self, out: DeltaMessage, final: bool) -> bool:
        out.add_content(self._buf)
        self._buf = ""
        return False
