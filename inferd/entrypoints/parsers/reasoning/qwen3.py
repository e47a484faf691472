"""`--reasoning-parser qwen3` (Qwen3, Qwen3.5; the template may open `<think>` in the prompt).

Rules (reference §3.3), in order:
1. `chat_template_kwargs.enable_thinking` is false, or the prompt already closed the reasoning
   block (its tail is `</think>`, as the template writes when thinking is off): all content.
2. A leading `<think>` in the output is stripped and opens reasoning. Without one, reasoning is
   open only if the prompt opened it (its last `<think>` is not closed: the generation prompt,
   or an assistant prefill continuing one) or the prompt is unknown (then, as
   vLLM does, we assume the template opened it). Otherwise the output is all content: qwen3
   needs both tags, and a model that did not open `<think>` is not reasoning.
3. Open reasoning ends at the first `</think>`. If there is none, a bare `<tool_call>` ends it
   implicitly (that tag and what follows are content, so the tool parser sees them); if there is
   neither, the output was cut off while thinking and is all reasoning.
"""
from __future__ import annotations

from enum import Enum
from typing import Any

from inferd.entrypoints.parsers.reasoning.base import ReasoningSplit, register_reasoning_parser
from inferd.entrypoints.parsers.reasoning.think import (
    THINK_END,
    THINK_START,
    Mode,
    ThinkTagReasoningParser,
    strip_start_tag,
)
from inferd.entrypoints.parsers.types import none_if_empty

TOOL_CALL_START = "<tool_call>"


class PromptThinkState(Enum):
    UNKNOWN = "unknown"  # no prompt text given
    OPEN = "open"        # the prompt's last <think> is not closed (the template opened it)
    CLOSED = "closed"    # the generation prompt ends with </think> (thinking disabled)
    NONE = "none"        # the model has to open <think> itself


def prompt_think_state(prompt_text: str | None) -> PromptThinkState:
    # Only the tail counts: earlier turns (e.g. an assistant tool-call turn kept with its
    # reasoning) contain complete <think>...</think> blocks that say nothing about this turn.
    if prompt_text is None:
        return PromptThinkState.UNKNOWN
    tail = prompt_text.rstrip()
    # An open <think> with no </think> after it: the generation prompt opened reasoning, also
    # when an assistant prefill (continue_final_message) already wrote some of it.
    if prompt_text.rfind(THINK_START) > prompt_text.rfind(THINK_END):
        return PromptThinkState.OPEN
    if tail.endswith(THINK_END):
        return PromptThinkState.CLOSED
    return PromptThinkState.NONE


@register_reasoning_parser("qwen3")
class Qwen3ReasoningParser(ThinkTagReasoningParser):
    implicit_end_tags = (TOOL_CALL_START,)

    def __init__(self, *, chat_template_kwargs: dict[str, Any] | None = None,
                 prompt_text: str | None = None):
        # Set before the base constructor, which asks initial_mode().
        # The Qwen3 template tests `enable_thinking is false`, so only a literal False disables.
        self._thinking_disabled = (chat_template_kwargs or {}).get("enable_thinking", True) is False
        self._prompt_state = prompt_think_state(prompt_text)
        super().__init__(chat_template_kwargs=chat_template_kwargs, prompt_text=prompt_text)

    @property
    def _all_content(self) -> bool:
        return self._thinking_disabled or self._prompt_state is PromptThinkState.CLOSED

    def initial_mode(self) -> Mode:
        return Mode.CONTENT if self._all_content else Mode.PREFIX

    def mode_without_start_tag(self) -> Mode:
        if self._prompt_state is PromptThinkState.NONE:
            return Mode.CONTENT
        return Mode.REASONING

    def grammar_start_marker(self) -> str | None:
        # A prompt that leaves <think> to the model: a constrained answer starts at once (the
        # grammar rules out <think>, so the output is all content, as rule 2 reads it).
        if self._prompt_state is PromptThinkState.NONE:
            return None
        return super().grammar_start_marker()

    def extract(self, text: str) -> ReasoningSplit:
        if self._all_content:
            return ReasoningSplit(None, none_if_empty(text))
        body, opened = strip_start_tag(text)
        if not opened and self._prompt_state is PromptThinkState.NONE:
            return ReasoningSplit(None, none_if_empty(text))
        reasoning, end, content = body.partition(THINK_END)
        if end:
            return ReasoningSplit(none_if_empty(reasoning), none_if_empty(content))
        index = body.find(TOOL_CALL_START)
        if index >= 0:
            return ReasoningSplit(none_if_empty(body[:index]), none_if_empty(body[index:]))
        return ReasoningSplit(none_if_empty(body), None)
