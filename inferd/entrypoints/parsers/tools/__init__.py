"""Tool-call parsers (`--tool-call-parser`). Importing this package registers every parser."""
from inferd.entrypoints.parsers.tools.base import (
    ParsedCall,
    Segment,
    ToolParser,
    get_tool_parser,
    register_tool_parser,
    tool_parser_names,
)
# Imported for their registration side effect.
from inferd.entrypoints.parsers.tools import hermes, llama3_json, mistral, pythonic  # noqa: F401

__all__ = [
    "ParsedCall",
    "Segment",
    "ToolParser",
    "get_tool_parser",
    "register_tool_parser",
    "tool_parser_names",
]
