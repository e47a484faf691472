"""`--reasoning-parser deepseek_r1` (DeepSeek-R1, QwQ and other models that think first).

Rules (reference §3.3):
* a leading `<think>` is stripped; the template usually writes it into the prompt, so the model
  may not emit it at all;
* text before the first `</think>` is reasoning, text after it is content (empty -> None);
* if `</think>` never appears (including output cut off by max_tokens), it is all reasoning.
"""
from __future__ import annotations

from inferd.entrypoints.parsers.reasoning.base import ReasoningSplit, register_reasoning_parser
from inferd.entrypoints.parsers.reasoning.think import THINK_END, ThinkTagReasoningParser, strip_start_tag
from inferd.entrypoints.parsers.types import none_if_empty


@register_reasoning_parser("deepseek_r1")
class DeepSeekR1ReasoningParser(ThinkTagReasoningParser):
    def extract(self, text: str) -> ReasoningSplit:
        body, _ = strip_start_tag(text)
        reasoning, end, content = body.partition(THINK_END)
        if not end:
            return ReasoningSplit(none_if_empty(body), None)
        return ReasoningSplit(none_if_empty(reasoning), none_if_empty(content))
