"""Reasoning parsers (`--reasoning-parser`). Importing this package registers every parser."""
from inferd.entrypoints.parsers.reasoning.base import (
    ReasoningParser,
    ReasoningSplit,
    get_reasoning_parser,
    reasoning_parser_names,
    register_reasoning_parser,
)
# Imported for their registration side effect.
from inferd.entrypoints.parsers.reasoning import deepseek_r1, qwen3  # noqa: F401

__all__ = [
    "ReasoningParser",
    "ReasoningSplit",
    "get_reasoning_parser",
    "reasoning_parser_names",
    "register_reasoning_parser",
]
