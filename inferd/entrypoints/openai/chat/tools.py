"""Tool choice for chat: which mode a request is in, its checks, and the forced modes.

* `none`: tools may be shown to the template; the output is never parsed for calls.
* `auto`: the server's `--tool-call-parser` finds calls in free text (`ChatOutputParser`).
* `required` / named: generation is constrained by a JSON schema (structured outputs), so the
  output *is* the call(s); `ForcedToolCalls` turns that JSON into tool calls, streamed or whole,
  with the same result either way.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from inferd.entrypoints.openai.chat.schemas import ChatCompletionRequest, NamedToolChoice
from inferd.entrypoints.openai.errors import BadRequest
from inferd.entrypoints.openai.state import ServerConfig
from inferd.entrypoints.parsers.types import DeltaToolCall, ToolCall, make_tool_call_id
from inferd.sampling_params import StructuredOutputsParams

ToolMode = Literal["none", "auto", "required", "named"]

AUTO_NEEDS_FLAGS = ('"auto" tool choice requires --enable-auto-tool-choice and '
                    "--tool-call-parser to be set")
REQUIRED_NEEDS_PARSER = 'tool_choice="required" requires --tool-call-parser to be set'
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def tool_mode(req: ChatCompletionRequest, config: ServerConfig) -> ToolMode:
    """The request's mode, after vLLM's checks (each failure a 400 with vLLM's message)."""
    choice = req.tool_choice
    if req.tools is not None and not req.tools:
        raise BadRequest("tools must not be an empty array", param="tools")
    if choice is None:
        choice = "auto" if req.tools else "none"
    if choice == "none":
        return "none"
    if not req.tools:
        raise BadRequest("When using tool_choice, tools must be set.", param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        if all(t.function.name != choice.function.name for t in req.tools):
            raise BadRequest(f"Tool '{choice.function.name}' has not been passed in `tools`.",
                             param="tool_choice")
        return "named"
    if choice == "auto":
        if not (config.enable_auto_tool_choice and config.tool_call_parser):
            raise BadRequest(AUTO_NEEDS_FLAGS, param="tool_choice")
        return "auto"
    if not config.tool_call_parser:
        raise BadRequest(REQUIRED_NEEDS_PARSER, param="tool_choice")
    return "required"


def forced_constraint(req: ChatCompletionRequest, mode: ToolMode) -> StructuredOutputsParams | None:
    """The JSON schema that makes the output a call: the named tool's arguments, or (required)
    a non-empty array of {name, parameters} objects, one alternative per tool."""
    if mode == "named":
        assert isinstance(req.tool_choice, NamedToolChoice)
        tool = next(t for t in req.tools or [] if t.function.name == req.tool_choice.function.name)
        return StructuredOutputsParams(json=tool.function.parameters or EMPTY_PARAMETERS)
    if mode != "required":
        return None
    defs: dict[str, dict[str, Any]] = {}
    alternatives = [{"type": "object",
                     "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                    "parameters": _hoist_definitions(
                                        t.function.parameters or EMPTY_PARAMETERS,
                                        t.function.name, defs)},
                     "required": ["name", "parameters"]} for t in req.tools or []]
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": {"anyOf": alternatives}, **defs}
    if req.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema)


def _hoist_definitions(parameters: dict[str, Any], tool: str,
                       defs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A tool's `$defs` / `definitions` moved to the combined schema's root, where its
    root-relative refs (`#/$defs/X`, as Pydantic writes them) still resolve once the tool's
    schema is nested; the same name defined differently by two tools is a 400."""
    if not isinstance(parameters, dict):
        return parameters
    out = dict(parameters)
    for key in ("$defs", "definitions"):
        sub = out.pop(key, None)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise BadRequest(f"tools: {tool}.parameters.{key} must be an object", param="tools")
        bucket = defs.setdefault(key, {})
        for name, definition in sub.items():
            if name in bucket and bucket[name] != definition:
                raise BadRequest(
                    f"tools: {key}/{name} is defined differently by two tools; tool_choice "
                    "'required' joins every tool's schema into one, so rename one of them",
                    param="tools")
            bucket[name] = definition
    return out


class ForcedToolCalls:
    """Tool calls from constrained output, fed incrementally.

    named: the whole output is the arguments object; argument text streams as it comes.
    required: the output is `[{"name": ..., "parameters": {...}}, ...]`; a call is emitted once
    its array element is complete (a half-written element is not yet a call).
    """

    def __init__(self, mode: ToolMode, name: str | None = None):
        self.mode, self.name = mode, name
        self.text = ""
        self.calls: list[ToolCall] = []
        # required: where the current array element started, and the JSON scanner's state
        self._scanned = 0
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._element_start: int | None = None

    def feed(self, delta: str) -> list[DeltaToolCall]:
        if not delta:
            return []
        self.text += delta
        if self.mode == "named":
            return self._feed_named(delta)
        return [DeltaToolCall(i, c.id, "function", c.name, c.arguments)
                for i, c in self._scan_required()]

    def _feed_named(self, delta: str) -> list[DeltaToolCall]:
        if not self.calls:
            self.calls.append(ToolCall(make_tool_call_id(), self.name or "", delta))
            return [DeltaToolCall(0, self.calls[0].id, "function", self.name, delta)]
        first = self.calls[0]
        self.calls[0] = ToolCall(first.id, first.name, first.arguments + delta)
        return [DeltaToolCall(0, arguments=delta)]

    def _scan_required(self) -> list[tuple[int, ToolCall]]:
        """Advance the scanner over new text; returns the calls completed by it."""
        done = []
        for pos in range(self._scanned, len(self.text)):
            ch = self.text[pos]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "[{":
                self._depth += 1
                if self._depth == 2 and ch == "{":
                    self._element_start = pos
            elif ch in "]}":
                self._depth -= 1
                if self._depth == 1 and ch == "}" and self._element_start is not None:
                    call = _element_call(self.text[self._element_start:pos + 1])
                    self._element_start = None
                    if call is not None:
                        self.calls.append(call)
                        done.append((len(self.calls) - 1, call))
        self._scanned = len(self.text)
        return done


def _element_call(element: str) -> ToolCall | None:
    try:
        obj = json.loads(element)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("parameters", obj.get("arguments", {}))
    return ToolCall(make_tool_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))
