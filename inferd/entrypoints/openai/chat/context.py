"""One chat request made ready for the engine: checked, rendered, tokenized, parameterised.

Invariant: every check (fields, tools, template, context length, structured outputs) runs here,
before the engine sees the request.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inferd.entrypoints.openai.chat.schemas import ChatCompletionRequest, NamedToolChoice
from inferd.entrypoints.openai.chat.tools import ForcedToolCalls, ToolMode, forced_constraint, \
    tool_mode
from inferd.entrypoints.openai.chat_template import render_chat, select_template, \
    special_tokens_of, tools_for_template
from inferd.entrypoints.openai.common import ModelLimits, TokenText, check_prompt_ids, \
    check_structured, check_text_length, encode, now, truncate_prompt, usage_json
from inferd.entrypoints.openai.errors import BadRequest
from inferd.entrypoints.openai.state import ServerState
from inferd.entrypoints.parsers import ChatOutputParser
from inferd.entrypoints.parsers.reasoning.base import ReasoningParser, get_reasoning_parser
from inferd.sampling_params import SamplingParams


@dataclass
class ChatContext:
    """One request's fixed facts, shared by the JSON and SSE builders."""
    request: ChatCompletionRequest
    request_id: str
    model: str
    created: int
    role: str
    prompt_text: str
    prompt_ids: list[int]
    params: SamplingParams
    mode: ToolMode
    template_kwargs: dict[str, Any]
    reasoning_parser: str | None
    tool_parser: str | None
    echo_text: str | None  # the last message's content, when echo applies
    token_text: TokenText
    report_cached_tokens: bool  # usage.prompt_tokens_details

    def output_parser(self) -> ChatOutputParser | None:
        """A fresh parser for one choice; None when the text passes through unchanged."""
        tools = self.mode == "auto"
        if self.mode in ("required", "named") or not (self.reasoning_parser or tools):
            return None
        return ChatOutputParser(self.reasoning_parser, self.tool_parser,
                                chat_template_kwargs=self.template_kwargs, tools_enabled=tools,
                                prompt_text=self.prompt_text)

    def reasoner_before_calls(self) -> ReasoningParser | None:
        """Forced tool calls whose grammar waits for the reasoning: a parser that splits the
        reasoning off, so only the content after it is read as calls."""
        so = self.params.structured_outputs
        if self.mode not in ("required", "named") or not (so and so.start_after):
            return None
        assert self.reasoning_parser is not None  # start_after is only set with one
        return _reasoner(self.reasoning_parser, self.template_kwargs, self.prompt_text)

    def forced_calls(self) -> ForcedToolCalls | None:
        if self.mode not in ("required", "named"):
            return None
        choice = self.request.tool_choice
        return ForcedToolCalls(self.mode, choice.function.name
                               if isinstance(choice, NamedToolChoice) else None)

    def finish_reason(self, engine_reason: str | None, called: bool) -> str | None:
        """`tool_calls` when auto/required produced calls; a named choice reports the engine's
        reason (`stop`), as does a truncated output."""
        if called and self.mode in ("auto", "required") and engine_reason != "length":
            return "tool_calls"
        return engine_reason

    def keep_call(self, index: int) -> bool:
        return index == 0 or self.request.parallel_tool_calls is not False

    def usage(self, completion_tokens: int, cached: int) -> dict:
        return usage_json(len(self.prompt_ids), completion_tokens,
                          cached if self.report_cached_tokens else None)


def _last_content_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content
                         if isinstance(p, dict) and p.get("type", "text") == "text")
    return content if isinstance(content, str) else ""


def _reasoner(parser_name: str, template_kwargs: dict[str, Any],
              prompt_text: str) -> ReasoningParser:
    return get_reasoning_parser(parser_name)(chat_template_kwargs=template_kwargs,
                                             prompt_text=prompt_text)


def _grammar_start_ids(parser_name: str, template_kwargs: dict[str, Any], prompt_text: str,
                       tokenizer: Any) -> list[int] | None:
    """The token ids after which a structured output's grammar engages (forced tool calls
    included): the answer follows the reasoning, which stays free."""
    marker = _reasoner(parser_name, template_kwargs, prompt_text).grammar_start_marker()
    if marker is None:
        return None
    return tokenizer.encode(marker, add_special_tokens=False) or None


async def prepare(req: ChatCompletionRequest, state: ServerState, request_id: str) -> ChatContext:
    engine, config = state.engine, state.config
    limits = ModelLimits.of(engine, config)
    model = state.check_model(req.model)
    req.check(limits)
    if config.enable_force_include_usage:
        req.force_usage()
    mode = tool_mode(req, config)
    template = select_template(config.chat_template, req.chat_template,
                               config.trust_request_chat_template, engine.tokenizer)
    kwargs = req.template_kwargs(config.default_chat_template_kwargs)
    hide_tools = config.exclude_tools_when_tool_choice_none and req.tool_choice == "none"
    prompt_text = render_chat(
        req.messages, template=template, special_tokens=special_tokens_of(engine.tokenizer),
        tools=None if hide_tools else tools_for_template(req.tools), documents=req.documents,
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        content_format=config.chat_template_content_format,  # type: ignore[arg-type]
        template_kwargs=kwargs)
    check_text_length(prompt_text, limits, req.truncate_prompt_tokens)
    ids = await encode(engine.tokenizer, prompt_text, req.add_special_tokens)
    ids = truncate_prompt(ids, req.truncate_prompt_tokens, limits)
    check_prompt_ids(ids, limits)
    forced = forced_constraint(req, mode)
    structured = forced or req.structured_params()
    try:
        await check_structured(structured, engine.tokenizer)
    except BadRequest as e:
        if forced is None:
            raise
        # The client sent tools, not this schema: say which of its inputs the problem is in.
        raise BadRequest(f"tools (joined into one schema for tool_choice "
                         f"{'required' if mode == 'required' else 'named'}): {e.message}",
                         param="tools") from None
    if (structured is not None and config.reasoning_parser
            and not config.structured_outputs_config.get("enable_in_reasoning")):
        structured.start_after = _grammar_start_ids(config.reasoning_parser, kwargs, prompt_text,
                                                    engine.tokenizer)
    params = req.to_sampling_params(len(ids), limits, engine.tokenizer, structured)
    role = config.response_role if req.add_generation_prompt else req.messages[-1]["role"]
    last = req.messages[-1]
    echo_text = _last_content_text(last) if req.echo and last.get("role") == role else None
    return ChatContext(req, request_id, model, now(), role, prompt_text, ids, params, mode, kwargs,
                       config.reasoning_parser, config.tool_call_parser, echo_text,
                       TokenText(engine.tokenizer, bool(req.return_tokens_as_token_ids)),
                       limits.report_cached_tokens)
