"""/v1/chat/completions: prepare (context.py) → generate → JSON here, or SSE (stream.py).

Output text goes through one path per tool mode, the same for streamed and whole responses:
`ChatOutputParser` (reasoning, then auto tool calls from the content) or `ForcedToolCalls`
(required/named: the constrained JSON is the call).
"""
from __future__ import annotations

from collections.abc import AsyncIterator

from inferd.entrypoints.openai.chat.context import ChatContext, prepare
from inferd.entrypoints.openai.chat.schemas import ChatCompletionRequest
from inferd.entrypoints.openai.chat.stream import stream_chunks
from inferd.entrypoints.openai.common import chat_logprobs, engine_request_id, prompt_logprobs_json
from inferd.entrypoints.openai.state import ServerState
from inferd.entrypoints.openai.streaming import prime
from inferd.entrypoints.parsers import ToolCall
from inferd.outputs import CompletionOutput, RequestOutput


async def create_chat_completion(req: ChatCompletionRequest, state: ServerState,
                                 request_id: str) -> dict | AsyncIterator[dict]:
    """The JSON response, or (stream=True) the chunk payloads to send as SSE. A stream is primed:
    an engine refusal surfaces here, before any byte is sent."""
    ctx = await prepare(req, state, request_id)
    outputs = state.engine.generate(ctx.prompt_ids, ctx.params, engine_request_id(request_id),
                                    prompt=ctx.prompt_text, cache_salt=req.cache_salt)
    if req.stream:
        return stream_chunks(ctx, await prime(outputs))
    final: RequestOutput | None = None
    async for out in outputs:
        final = out
    assert final is not None, "the engine ended a request without an output"
    return build_response(ctx, final)


# --- JSON ---------------------------------------------------------------------------------------
def parse_whole(ctx: ChatContext, text: str) -> tuple[str | None, str | None, list[ToolCall]]:
    """(reasoning, content, tool calls) of one finished choice."""
    forced = ctx.forced_calls()
    if forced is not None:
        reasoning = None
        reasoner = ctx.reasoner_before_calls()
        if reasoner is not None:
            reasoning, content = reasoner.extract(text)
            text = content or ""
        forced.feed(text)
        if forced.calls:
            return reasoning, "", forced.calls
        # not valid JSON (e.g. cut by max_tokens): show what there is
        return reasoning, text if text or reasoning is None else None, []
    parser = ctx.output_parser()
    if parser is None:
        return None, text, []
    parsed = parser.parse_full(text)
    return parsed.reasoning, parsed.content, parsed.tool_calls


def tool_call_json(call: ToolCall) -> dict:
    return {"id": call.id, "type": call.type,
            "function": {"name": call.name, "arguments": call.arguments}}


def _choice(ctx: ChatContext, out: CompletionOutput) -> dict:
    req = ctx.request
    reasoning, content, calls = parse_whole(ctx, out.text)
    calls = [c for i, c in enumerate(calls) if ctx.keep_call(i)]
    if not req.include_reasoning:
        reasoning = None
    if ctx.echo_text is not None:
        content = ctx.echo_text + (content or "")
    message = {"role": ctx.role, "content": content, "refusal": None, "annotations": None,
               "audio": None, "function_call": None,
               "tool_calls": [tool_call_json(c) for c in calls],
               "reasoning": reasoning, "reasoning_content": reasoning}
    logprobs = None
    if req.logprobs and out.logprobs is not None:
        logprobs = {"content": chat_logprobs(out.token_ids, out.logprobs, req.top_logprobs or 0,
                                             ctx.token_text)}
    choice = {"index": out.index, "message": message, "logprobs": logprobs,
              "finish_reason": ctx.finish_reason(out.finish_reason, bool(calls)),
              "stop_reason": out.stop_reason}
    if req.return_token_ids:
        choice["token_ids"] = list(out.token_ids)
    return choice


def build_response(ctx: ChatContext, final: RequestOutput) -> dict:
    req = ctx.request
    outs = sorted(final.outputs, key=lambda o: o.index)
    response = {"id": ctx.request_id, "object": "chat.completion", "created": ctx.created,
                "model": ctx.model, "choices": [_choice(ctx, o) for o in outs],
                "usage": ctx.usage(sum(len(o.token_ids) for o in outs), final.num_cached_tokens),
                "system_fingerprint": None,
                "prompt_logprobs": prompt_logprobs_json(final.prompt_logprobs, ctx.token_text)
                if req.prompt_logprobs is not None else None}
    if req.return_token_ids:
        response["prompt_token_ids"] = ctx.prompt_ids
    if req.return_prompt_text:
        response["prompt_text"] = ctx.prompt_text
    return response
