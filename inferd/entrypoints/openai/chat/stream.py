"""The chat SSE chunks (reference §2.3), from the engine's DELTA outputs.

Order: one role chunk per choice (`delta: {role, content: ""}`), the echoed content if any,
then one chunk per choice per engine delta (empty ones skipped), the last of which carries that
choice's finish_reason, then the usage chunk (`choices: []`) when asked for.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from inferd.entrypoints.openai.chat.context import ChatContext
from inferd.entrypoints.openai.chat.tools import ForcedToolCalls
from inferd.entrypoints.parsers.reasoning.base import ReasoningParser
from inferd.entrypoints.openai.common import chat_logprobs, usage_json
from inferd.entrypoints.parsers import ChatOutputParser, DeltaMessage, DeltaToolCall, \
    make_tool_call_id
from inferd.outputs import CompletionOutput, RequestOutput


@dataclass
class _ChoiceStream:
    parser: ChatOutputParser | None
    forced: ForcedToolCalls | None
    reasoner: ReasoningParser | None = None  # forced calls after reasoning: splits it off
    tokens: int = 0
    called: bool = False
    call_ids: dict[int, str] = field(default_factory=dict)


async def stream_chunks(ctx: ChatContext, outputs: AsyncIterator[RequestOutput]
                        ) -> AsyncIterator[dict]:
    req = ctx.request
    include_usage, continuous = req.usage_options()
    states = [_ChoiceStream(ctx.output_parser(), ctx.forced_calls(), ctx.reasoner_before_calls())
              for _ in range(req.n)]
    for i in range(req.n):
        chunk = _chunk(ctx, {"index": i, "delta": {"role": ctx.role, "content": ""},
                             "logprobs": None, "finish_reason": None})
        if req.return_token_ids:
            chunk["prompt_token_ids"] = ctx.prompt_ids
        if continuous:
            chunk["usage"] = usage_json(len(ctx.prompt_ids), 0, None)
        yield chunk
    if ctx.echo_text:
        for i in range(req.n):
            yield _chunk(ctx, {"index": i, "delta": {"content": ctx.echo_text}, "logprobs": None,
                               "finish_reason": None})
    cached = 0
    # Closing this stream early (client gone) closes the engine iterator now, not at GC.
    async with aclosing(outputs):  # type: ignore[type-var]
        async for res in outputs:
            cached = max(cached, res.num_cached_tokens)
            for out in res.outputs:
                st = states[out.index]
                choice = _delta_choice(ctx, st, out)
                if choice is None:
                    continue
                chunk = _chunk(ctx, choice)
                if continuous:
                    chunk["usage"] = usage_json(len(ctx.prompt_ids), st.tokens, None)
                yield chunk
    if include_usage:
        chunk = _chunk(ctx, None)
        chunk["usage"] = ctx.usage(sum(s.tokens for s in states), cached)
        yield chunk


def _chunk(ctx: ChatContext, choice: dict | None) -> dict[str, Any]:
    return {"id": ctx.request_id, "object": "chat.completion.chunk", "created": ctx.created,
            "model": ctx.model, "choices": [choice] if choice is not None else []}


def _parse_delta(ctx: ChatContext, st: _ChoiceStream, text: str, finished: bool) -> DeltaMessage:
    if st.forced is not None:
        reasoning = None
        if st.reasoner is not None:
            part = st.reasoner.feed(text)
            if finished:
                part.merge(st.reasoner.finish())
            reasoning, text = part.reasoning, part.content or ""
        delta = DeltaMessage(reasoning=reasoning, tool_calls=st.forced.feed(text))
        if finished and not st.forced.calls:
            delta.add_content(st.forced.text)  # not a call after all: as the JSON response does
        return delta
    if st.parser is None:
        return DeltaMessage(content=text or None)
    delta = st.parser.feed(text)
    if finished:
        delta.merge(st.parser.finish())
    return delta


def _delta_choice(ctx: ChatContext, st: _ChoiceStream, out: CompletionOutput) -> dict | None:
    req = ctx.request
    finished = out.finish_reason is not None
    st.tokens += len(out.token_ids)
    delta = _parse_delta(ctx, st, out.text, finished)
    body: dict[str, Any] = {}
    if delta.content:
        body["content"] = delta.content
    if delta.reasoning and req.include_reasoning:
        body["reasoning"] = body["reasoning_content"] = delta.reasoning
    calls = [_call_json(st, c) for c in delta.tool_calls if ctx.keep_call(c.index)]
    if calls:
        body["tool_calls"] = calls
        st.called = True
    logprobs = None
    if req.logprobs and out.logprobs:
        logprobs = {"content": chat_logprobs(out.token_ids, out.logprobs, req.top_logprobs or 0,
                                             ctx.token_text)}
    if not body and not finished and logprobs is None and not (req.return_token_ids
                                                               and out.token_ids):
        return None
    choice: dict[str, Any] = {"index": out.index, "delta": body, "logprobs": logprobs,
                              "finish_reason": None}
    if finished:
        choice["finish_reason"] = ctx.finish_reason(out.finish_reason, st.called)
        choice["stop_reason"] = out.stop_reason
    if req.return_token_ids:
        choice["token_ids"] = list(out.token_ids)
    return choice


def _call_json(st: _ChoiceStream, call: DeltaToolCall) -> dict[str, Any]:
    """One `delta.tool_calls` entry; the first one of each call carries its id, type and name."""
    body: dict[str, Any] = {"index": call.index}
    if call.index not in st.call_ids:
        st.call_ids[call.index] = call.id or make_tool_call_id()
        body["id"], body["type"] = st.call_ids[call.index], "function"
    function: dict[str, str] = {}
    if call.name is not None:
        function["name"] = call.name
    if call.arguments is not None:
        function["arguments"] = call.arguments
    body["function"] = function
    return body
