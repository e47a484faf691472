"""The /v1/completions request (OpenAI fields plus vLLM's extras) and its conversion.

Responses are built as plain dicts by the service (their shapes are in the reference, §2.2/§2.3);
only the request is a pydantic model, because only the request needs validating.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from inferd.entrypoints.openai.common import MAX_CHOICES, ModelLimits, SamplingFields, \
    build_sampling_params, check_logprobs_count, resolve_max_tokens
from inferd.entrypoints.openai.errors import BadRequest
from inferd.sampling_params import SamplingParams, StructuredOutputsParams

EMPTY_PROMPT_MESSAGE = "Either prompt or prompt_embeds must be provided and non-empty."

Prompt = str | list[int]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    suffix: str | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    add_special_tokens: bool = True
    prompt_embeds: Any = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _has_prompt(self) -> CompletionRequest:
        # Also what tells /invocations that a body without `prompt` is not a completion.
        if self.prompt is None and self.prompt_embeds is None:
            raise ValueError(EMPTY_PROMPT_MESSAGE)
        return self

    def check(self, limits: ModelLimits) -> None:
        """Request-level rules, before any prompt is tokenized."""
        self.check_common()
        if self.prompt_embeds is not None:
            raise BadRequest("prompt_embeds is not supported by this server", param="prompt_embeds")
        if self.suffix is not None:
            raise BadRequest("suffix is not currently supported", param="suffix")
        prompts = self.prompt_list()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise BadRequest(EMPTY_PROMPT_MESSAGE, param="prompt")
        if len(prompts) * self.n > MAX_CHOICES:
            raise BadRequest(f"at most {MAX_CHOICES} choices (prompts x n) per request, got "
                             f"{len(prompts)} x {self.n}", param="prompt")
        check_logprobs_count(self.logprobs, limits, "logprobs")
        check_logprobs_count(self.prompt_logprobs, limits, "prompt_logprobs")
        least = 0 if self.echo else 1  # echo with max_tokens=0 returns just the prompt
        if self.max_tokens is not None and self.max_tokens < least:
            raise BadRequest(f"max_tokens must be at least {least}, got {self.max_tokens}.",
                             param="max_tokens")

    def prompt_list(self) -> list[Prompt]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if p is None:
            return []
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens=0: return the prompt, generate nothing visible."""
        return self.echo and self.max_tokens == 0

    def to_sampling_params(self, prompt_len: int, limits: ModelLimits, tokenizer: Any,
                           structured: StructuredOutputsParams | None) -> SamplingParams:
        max_tokens = resolve_max_tokens(self.max_tokens, prompt_len, limits)
        prompt_lps = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            # Echoed prompt tokens carry logprobs too: ask the engine for prompt logprobs.
            prompt_lps = max(self.logprobs, prompt_lps if prompt_lps is not None else 0)
        # The engine always generates at least one token; an echo-only request drops it.
        return build_sampling_params(
            self, max_tokens=max(max_tokens, 1) if self.echo_only else max_tokens,
            logprobs=self.logprobs, prompt_logprobs=prompt_lps, stream=bool(self.stream),
            limits=limits, tokenizer=tokenizer, structured=structured)
