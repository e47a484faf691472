"""The reasoning-parser interface and its registry (`--reasoning-parser NAME`).

A reasoning parser splits one choice's output text into `reasoning` and `content`, both whole
(`extract`, for non-streamed responses) and delta by delta (`feed` ... `finish`, for SSE). The two
must agree: the reasoning deltas concatenated equal `extract(...).reasoning`, and likewise for
content, however the text was cut into deltas (tests/unit/test_parsers.py checks this).

One parser object serves one choice of one request; it is not reused.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, NamedTuple

from inferd.entrypoints.parsers.types import DeltaMessage, UnknownParserError


class ReasoningSplit(NamedTuple):
    """A non-streamed split; None where that part is empty."""

    reasoning: str | None
    content: str | None


class ReasoningParser(ABC):
    name: str = ""

    def __init__(self, *, chat_template_kwargs: dict[str, Any] | None = None,
                 prompt_text: str | None = None):
        # chat_template_kwargs: the request's (merged over --default-chat-template-kwargs);
        # prompt_text: the rendered prompt, when known, so a parser can tell whether the template
        # already opened (or closed) the reasoning block.
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.prompt_text = prompt_text

    @abstractmethod
    def extract(self, text: str) -> ReasoningSplit:
        """Split a whole output."""

    @abstractmethod
    def feed(self, delta_text: str) -> DeltaMessage:
        """Consume the next piece of output; return the reasoning/content now known to be final."""

    @abstractmethod
    def finish(self) -> DeltaMessage:
        """The output ended (EOS, stop, or length): flush whatever was held back."""

    @property
    @abstractmethod
    def reasoning_ended(self) -> bool:
        """True once the stream has moved on to content for good."""

    def grammar_start_marker(self) -> str | None:
        """Asked before any output: the text that ends reasoning, after which a structured
        output's grammar starts; None when the answer starts at the first token."""
        return None


_REGISTRY: dict[str, type[ReasoningParser]] = {}


def register_reasoning_parser(*names: str) -> Callable[[type[ReasoningParser]], type[ReasoningParser]]:
    def register(cls: type[ReasoningParser]) -> type[ReasoningParser]:
        for name in names:
            if name in _REGISTRY:
                raise ValueError(f"reasoning parser {name!r} registered twice")
            _REGISTRY[name] = cls
        cls.name = names[0]
        return cls
    return register


def reasoning_parser_names() -> list[str]:
    return sorted(_REGISTRY)


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    """The class for `--reasoning-parser NAME`; an unknown name raises, listing the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownParserError("reasoning parser", name, reasoning_parser_names()) from None
