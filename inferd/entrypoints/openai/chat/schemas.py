"""The /v1/chat/completions request (OpenAI fields plus vLLM's extras) and its conversion.

Messages stay plain dicts: roles are open-ended (custom roles are allowed) and templates read
arbitrary keys, so `chat_template.render_chat` checks the few things it relies on.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from inferd.entrypoints.openai.common import REASONING_EFFORTS, ModelLimits, SamplingFields, \
    RequestObject, build_sampling_params, check_logprobs_count, resolve_max_tokens
from inferd.entrypoints.openai.errors import BadRequest
from inferd.sampling_params import SamplingParams, StructuredOutputsParams


class FunctionDefinition(RequestObject):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(RequestObject):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(RequestObject):
    name: str


class NamedToolChoice(RequestObject):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    reasoning_effort: str | None = None
    include_reasoning: bool = True
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_prompt_text: bool | None = None

    def check(self, limits: ModelLimits) -> None:
        """Request-level rules, before the template renders."""
        self.check_common()
        if self.top_logprobs is not None:
            if self.top_logprobs > 0 and not self.logprobs:
                raise BadRequest("when using `top_logprobs`, `logprobs` must be set to true.",
                                 param="top_logprobs")
            check_logprobs_count(self.top_logprobs, limits, "top_logprobs")
        check_logprobs_count(self.prompt_logprobs, limits, "prompt_logprobs")
        if self.reasoning_effort is not None and self.reasoning_effort not in REASONING_EFFORTS:
            raise BadRequest(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}",
                             param="reasoning_effort")
        budget = self.requested_max_tokens
        if budget is not None and budget < 1:
            field = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
            raise BadRequest(f"{field} must be at least 1, got {budget}.", param=field)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else \
            self.max_tokens

    @property
    def num_top_logprobs(self) -> int | None:
        """Alternatives per token for the engine: None without logprobs."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def template_kwargs(self, server_defaults: dict[str, Any]) -> dict[str, Any]:
        """Extra template variables: server defaults under the request's chat_template_kwargs."""
        kwargs = {**server_defaults, **(self.chat_template_kwargs or {})}
        if self.reasoning_effort is not None:
            kwargs["reasoning_effort"] = self.reasoning_effort
        return kwargs

    def to_sampling_params(self, prompt_len: int, limits: ModelLimits, tokenizer: Any,
                           structured: StructuredOutputsParams | None) -> SamplingParams:
        max_tokens = resolve_max_tokens(self.requested_max_tokens, prompt_len, limits)
        return build_sampling_params(
            self, max_tokens=max_tokens, logprobs=self.num_top_logprobs,
            prompt_logprobs=self.prompt_logprobs, stream=bool(self.stream), limits=limits,
            tokenizer=tokenizer, structured=structured)
