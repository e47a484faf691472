"""Finding tag strings (`</think>`, `<tool_call>`, `[TOOL_CALLS]`, ...) in text that arrives in pieces.

The parsers work on text, not token ids: a tag may be one special token for one model and six
ordinary tokens for another, and detokenised deltas can split it anywhere. So a parser holds back
the end of its buffer while that end could still grow into a tag (`partial_marker_len`).
"""
from __future__ import annotations

from collections.abc import Sequence


def partial_marker_len(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`.

    That many characters must be held back: the next delta may complete the tag.
    """
    best = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:size]):
                best = size
                break
    return best


def find_first_marker(text: str, markers: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """The earliest occurrence of any marker at or after `start`, as (index, marker)."""
    found: tuple[int, str] | None = None
    for marker in markers:
        index = text.find(marker, start)
        if index >= 0 and (found is None or index < found[0]):
            found = (index, marker)
    return found


def is_proper_prefix(text: str, marker: str) -> bool:
    """True when `text` could still become `marker` (it is a strict prefix of it)."""
    return len(text) < len(marker) and marker.startswith(text)
