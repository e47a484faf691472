"""/tokenize and /detokenize bodies (vLLM's shapes). Unknown fields are ignored, as vLLM does."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from inferd.entrypoints.openai.chat.schemas import ToolDefinition


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TokenizeCompletionRequest(_Request):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(_Request):
    model: str | None = None
    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ToolDefinition] | None = None  # the chat route's model: both render alike
    mm_processor_kwargs: dict[str, Any] | None = None  # accepted for compatibility; text-only
    media_io_kwargs: dict[str, Any] | None = None
    return_token_strs: bool | None = False


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


def parse_tokenize_request(body: dict[str, Any]) -> TokenizeRequest:
    """The chat form when the body has `messages`, else the completion form. Chosen by key rather
    than by a pydantic union, so a validation error names one form's field, not both forms'."""
    if "messages" in body:
        return TokenizeChatRequest.model_validate(body)
    return TokenizeCompletionRequest.model_validate(body)


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
