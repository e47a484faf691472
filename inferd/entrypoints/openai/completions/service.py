"""/v1/completions: validate → tokenize → one engine request per prompt → JSON or SSE.

Invariant: every check (fields, prompt lengths, vocabulary, structured outputs) runs for every
prompt before the first engine request is made, so a bad prompt in a batch costs no engine work.
Choices are indexed `prompt_index * n + i`, as in vLLM.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from inferd.entrypoints.openai.common import ModelLimits, TokenText, check_prompt_ids, \
    check_structured, check_text_length, completion_logprobs, encode, engine_request_id, now, \
    prompt_logprobs_json, truncate_prompt, usage_json
from inferd.entrypoints.openai.completions.schemas import CompletionRequest
from inferd.entrypoints.openai.state import ServerState
from inferd.entrypoints.openai.streaming import merge_async_iterators, prime
from inferd.outputs import CompletionOutput, RequestOutput
from inferd.sampling_params import SamplingParams


@dataclass
class PreparedPrompt:
    text: str | None  # the prompt as sent, when it was text
    token_ids: list[int]
    params: SamplingParams

    def echo_text(self, tokenizer: Any) -> str:
        return self.text if self.text is not None else tokenizer.decode(self.token_ids)


@dataclass
class CompletionContext:
    """One request's fixed facts, shared by the JSON and SSE builders."""
    request: CompletionRequest
    request_id: str
    model: str
    created: int
    prompts: list[PreparedPrompt]
    tokenizer: Any
    token_text: TokenText
    report_cached_tokens: bool  # usage.prompt_tokens_details
    cached: dict[int, int] = field(default_factory=dict)  # prompt index -> cached tokens
    # Prompt index -> prompt logprobs; a stream gets them once, with the prompt's first output.
    prompt_lps: dict[int, list] = field(default_factory=dict)

    def choice_index(self, prompt_index: int, output: CompletionOutput) -> int:
        return prompt_index * self.request.n + output.index

    def usage(self, completion_tokens: int) -> dict:
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        cached = sum(self.cached.values()) if self.report_cached_tokens else None
        return usage_json(prompt_tokens, completion_tokens, cached)


async def prepare(req: CompletionRequest, state: ServerState, request_id: str) -> CompletionContext:
    engine = state.engine
    limits = ModelLimits.of(engine, state.config)
    model = state.check_model(req.model)
    req.check(limits)
    if state.config.enable_force_include_usage:
        req.force_usage()
    structured = req.structured_params()
    await check_structured(structured, engine.tokenizer)
    prompts = []
    for prompt in req.prompt_list():
        if isinstance(prompt, str):
            check_text_length(prompt, limits, req.truncate_prompt_tokens)
            ids = await encode(engine.tokenizer, prompt, req.add_special_tokens)
            text: str | None = prompt
        else:
            ids, text = list(prompt), None
        ids = truncate_prompt(ids, req.truncate_prompt_tokens, limits)
        check_prompt_ids(ids, limits)
        params = req.to_sampling_params(len(ids), limits, engine.tokenizer, structured)
        prompts.append(PreparedPrompt(text, ids, params))
    return CompletionContext(req, request_id, model, now(), prompts, engine.tokenizer,
                             TokenText(engine.tokenizer, bool(req.return_tokens_as_token_ids)),
                             limits.report_cached_tokens)


def _generators(ctx: CompletionContext, state: ServerState) -> list[AsyncIterator[RequestOutput]]:
    one = len(ctx.prompts) == 1
    base = engine_request_id(ctx.request_id)
    return [state.engine.generate(p.token_ids, p.params, base if one else f"{base}-{i}",
                                  prompt=p.text, cache_salt=ctx.request.cache_salt)
            for i, p in enumerate(ctx.prompts)]


async def create_completion(req: CompletionRequest, state: ServerState,
                            request_id: str) -> dict | AsyncIterator[dict]:
    """The JSON response, or (stream=True) the chunk payloads to send as SSE. A stream is primed:
    an engine refusal surfaces here, before any byte is sent."""
    ctx = await prepare(req, state, request_id)
    merged = merge_async_iterators(_generators(ctx, state))
    if req.stream:
        return stream_chunks(ctx, await prime(merged))
    finals: dict[int, RequestOutput] = {}
    async for i, out in merged:
        finals[i] = out
    return build_response(ctx, finals)


# --- JSON ---------------------------------------------------------------------------------------
def _visible(ctx: CompletionContext, pi: int, out: CompletionOutput, echo: bool
             ) -> tuple[str, list[int], list]:
    """A choice's text and the tokens (with logprob positions) behind it; when echoing, the
    prompt comes first, its first token without a logprob."""
    req, prompt = ctx.request, ctx.prompts[pi]
    if req.echo_only:
        text, ids, positions = "", [], []
    else:
        text, ids, positions = out.text, list(out.token_ids), list(out.logprobs or [])
    if echo:
        prompt_lps = ctx.prompt_lps.get(pi) or [None] * len(prompt.token_ids)
        text = prompt.echo_text(ctx.tokenizer) + text
        ids, positions = prompt.token_ids + ids, list(prompt_lps) + positions
    return text, ids, positions


def build_response(ctx: CompletionContext, finals: dict[int, RequestOutput]) -> dict:
    req = ctx.request
    choices, completion_tokens = [], 0
    for pi, prompt in enumerate(ctx.prompts):
        res = finals[pi]
        ctx.cached[pi] = res.num_cached_tokens
        if res.prompt_logprobs is not None:
            ctx.prompt_lps[pi] = res.prompt_logprobs
        for out in sorted(res.outputs, key=lambda o: o.index):
            choices.append(_choice(ctx, pi, out))
            completion_tokens += 0 if req.echo_only else len(out.token_ids)
    choices.sort(key=lambda c: c["index"])
    return {"id": ctx.request_id, "object": "text_completion", "created": ctx.created,
            "model": ctx.model, "choices": choices, "usage": ctx.usage(completion_tokens),
            "system_fingerprint": None}


def _choice(ctx: CompletionContext, pi: int, out: CompletionOutput) -> dict:
    req, prompt = ctx.request, ctx.prompts[pi]
    text, ids, positions = _visible(ctx, pi, out, req.echo)
    logprobs = None
    if req.logprobs is not None:
        logprobs, _ = completion_logprobs(ids, positions, ctx.token_text, 0)
    prompt_lps = None
    if req.prompt_logprobs is not None:
        prompt_lps = prompt_logprobs_json(ctx.prompt_lps.get(pi), ctx.token_text)
    choice = {"index": ctx.choice_index(pi, out), "text": text, "logprobs": logprobs,
              "finish_reason": out.finish_reason, "stop_reason": out.stop_reason,
              "prompt_logprobs": prompt_lps}
    if req.return_token_ids:
        choice["prompt_token_ids"] = prompt.token_ids
        choice["token_ids"] = [] if req.echo_only else list(out.token_ids)
    return choice


# --- SSE ----------------------------------------------------------------------------------------
@dataclass
class _ChoiceStream:
    started: bool = False
    offset: int = 0  # text offset for logprobs
    tokens: int = 0


async def stream_chunks(ctx: CompletionContext,
                        outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[dict]:
    req = ctx.request
    include_usage, continuous = req.usage_options()
    states: dict[int, _ChoiceStream] = {}
    # Closing this stream early (client gone) closes the engine iterators now, not at GC.
    async with aclosing(outputs):  # type: ignore[type-var]
        async for pi, res in outputs:
            ctx.cached[pi] = max(ctx.cached.get(pi, 0), res.num_cached_tokens)
            if res.prompt_logprobs is not None:
                ctx.prompt_lps[pi] = res.prompt_logprobs
            for out in res.outputs:
                index = ctx.choice_index(pi, out)
                st = states.setdefault(index, _ChoiceStream())
                choice = _delta_choice(ctx, pi, out, st, index)
                if choice is None:
                    continue
                chunk = {"id": ctx.request_id, "object": "text_completion",
                         "created": ctx.created, "model": ctx.model, "choices": [choice]}
                if continuous:
                    chunk["usage"] = usage_json(len(ctx.prompts[pi].token_ids), st.tokens, None)
                yield chunk
    if include_usage:
        yield {"id": ctx.request_id, "object": "text_completion", "created": ctx.created,
               "model": ctx.model, "choices": [],
               "usage": ctx.usage(sum(s.tokens for s in states.values()))}


def _delta_choice(ctx: CompletionContext, pi: int, out: CompletionOutput, st: _ChoiceStream,
                  index: int) -> dict | None:
    req = ctx.request
    first, st.started = not st.started, True
    if not req.echo_only:
        st.tokens += len(out.token_ids)
    text, ids, positions = _visible(ctx, pi, out, echo=req.echo and first)
    if not text and not ids and out.finish_reason is None:
        return None  # nothing new (the detokenizer is holding text back)
    logprobs = None
    if req.logprobs is not None:
        logprobs, st.offset = completion_logprobs(ids, positions, ctx.token_text, st.offset)
    choice = {"index": index, "text": text, "logprobs": logprobs,
              "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}
    if req.return_token_ids:
        if first:
            choice["prompt_token_ids"] = ctx.prompts[pi].token_ids
        choice["token_ids"] = [] if req.echo_only else list(out.token_ids)
    return choice
