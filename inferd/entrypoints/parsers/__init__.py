"""Output parsers for chat: reasoning (`--reasoning-parser`) and tool calls (`--tool-call-parser`).

`ChatOutputParser` is what the chat endpoint uses; `reasoning_parser_names()` and
`tool_parser_names()` give the valid flag values; `get_reasoning_parser` / `get_tool_parser`
raise `UnknownParserError` (a KeyError) listing them.
"""
from inferd.entrypoints.parsers.chat_output import ChatOutputParser
from inferd.entrypoints.parsers.reasoning import get_reasoning_parser, reasoning_parser_names
from inferd.entrypoints.parsers.tools import get_tool_parser, tool_parser_names
from inferd.entrypoints.parsers.types import (
    DeltaMessage,
    DeltaToolCall,
    ExtractedToolCalls,
    ParsedMessage,
    ToolCall,
    UnknownParserError,
    make_tool_call_id,
)

__all__ = [
    "ChatOutputParser",
    "DeltaMessage",
    "DeltaToolCall",
    "ExtractedToolCalls",
    "ParsedMessage",
    "ToolCall",
    "UnknownParserError",
    "get_reasoning_parser",
    "get_tool_parser",
    "make_tool_call_id",
    "reasoning_parser_names",
    "tool_parser_names",
]
