"""Tokenization with the served model's tokenizer and chat template."""
from __future__ import annotations

import asyncio
from typing import Any, Callable, TypeVar

from inferd.entrypoints.openai.chat_template import render_chat, select_template, \
    special_tokens_of, tools_for_template
from inferd.entrypoints.openai.errors import BadRequest
from inferd.entrypoints.openai.state import ServerState
from inferd.entrypoints.openai.tokenize.schemas import (DetokenizeRequest, DetokenizeResponse,
                                                        TokenizeChatRequest, TokenizeRequest,
                                                        TokenizeResponse)

# Above this many characters, tokenizing moves off the event loop so other requests keep flowing.
INLINE_TOKENIZE_CHARS = 8192
T = TypeVar("T")


async def _maybe_in_thread(size: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    if size > INLINE_TOKENIZE_CHARS:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def render_chat_prompt(state: ServerState, req: TokenizeChatRequest) -> str:
    """The prompt text the chat endpoint would build for these messages."""
    config, tokenizer = state.config, state.engine.tokenizer
    template = select_template(config.chat_template, req.chat_template,
                               config.trust_request_chat_template, tokenizer)
    kwargs = {**config.default_chat_template_kwargs, **(req.chat_template_kwargs or {})}
    return render_chat(req.messages, template=template, special_tokens=special_tokens_of(tokenizer),
                       tools=tools_for_template(req.tools),
                       add_generation_prompt=req.add_generation_prompt,
                       continue_final_message=req.continue_final_message,
                       content_format=config.chat_template_content_format, template_kwargs=kwargs)


async def tokenize(state: ServerState, req: TokenizeRequest) -> TokenizeResponse:
    state.check_model(req.model)
    tokenizer = state.engine.tokenizer
    text = render_chat_prompt(state, req) if isinstance(req, TokenizeChatRequest) else req.prompt
    ids: list[int] = await _maybe_in_thread(len(text), tokenizer.encode, text,
                                            add_special_tokens=req.add_special_tokens)
    strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids,
                            token_strs=strs)


async def detokenize(state: ServerState, req: DetokenizeRequest) -> DetokenizeResponse:
    state.check_model(req.model)
    tokenizer = state.engine.tokenizer
    vocab = len(tokenizer)
    bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise BadRequest(f"Token id {bad} is out of vocabulary (the vocabulary has {vocab} tokens)",
                         param="tokens")
    text = await _maybe_in_thread(len(req.tokens), tokenizer.decode, req.tokens)
    return DetokenizeResponse(prompt=text)
