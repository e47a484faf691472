"""What /v1/completions and /v1/chat/completions share: the sampling fields of a request and
their conversion to `SamplingParams`, prompt checks, usage, and logprobs in the OpenAI shapes.

Every check here runs before a request reaches the engine, and every failure is a `BadRequest`
(400) naming the field, so a bad request never fans out into engine work or becomes a 500.
"""
from __future__ import annotations

import asyncio
import functools
import json
import math
import secrets
import time
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from inferd.entrypoints.openai.errors import BadRequest
from inferd.outputs import Logprob, PositionLogprobs
from inferd.sampling_params import MAX_N, MAX_SEED, MAX_STOP_STRINGS, MIN_SEED, OutputKind, \
    ParamError, SamplingParams, StructuredOutputsParams

# JSON has no -inf; OpenAI-compatible servers send this floor instead.
LOGPROB_FLOOR = -9999.0
# At most this many choices (prompts x n engine requests) in one completions request.
MAX_CHOICES = 1024
MAX_ALLOWED_TOKEN_IDS = 1 << 18
# Prompts longer than this (characters) are tokenized in a worker thread.
OFFLOAD_TOKENIZE_CHARS = 16384
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


# --- request fields -----------------------------------------------------------------------------
class RequestObject(BaseModel):
    """Nested request objects: unknown keys are ignored, as at the top level."""
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class StreamOptions(RequestObject):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class StructuredOutputsRequest(RequestObject):
    json_: str | dict | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    def to_params(self) -> StructuredOutputsParams:
        tag = self.structural_tag
        return StructuredOutputsParams(
            json=self.json_, regex=self.regex, choice=self.choice, grammar=self.grammar,
            json_object=self.json_object,
            structural_tag=json.dumps(tag) if isinstance(tag, dict) else tag,
            disable_any_whitespace=self.disable_any_whitespace,
            disable_additional_properties=self.disable_additional_properties,
            whitespace_pattern=self.whitespace_pattern)


class JsonSchemaSpec(RequestObject):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    # structural_tag formats carry their own keys (structures, triggers, format): keep them.
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaSpec | None = None

    def to_params(self) -> StructuredOutputsParams | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.schema_ is None:
                raise BadRequest("response_format.json_schema with a 'schema' is required when "
                                 "type is 'json_schema'", param="response_format")
            return StructuredOutputsParams(json=self.json_schema.schema_)
        tag = json.dumps(self.model_dump(exclude_none=True))
        return StructuredOutputsParams(structural_tag=tag)


@functools.cache
def _non_nullable_fields(cls: type[BaseModel]) -> frozenset[str]:
    """The fields of a request model that have no None value (computed once per class)."""
    def nullable(ann: Any) -> bool:
        return (ann is None or ann is type(None) or ann is Any
                or (typing.get_origin(ann) in (typing.Union, types.UnionType)
                    and type(None) in typing.get_args(ann)))
    return frozenset(name for name, f in cls.model_fields.items() if not nullable(f.annotation))


class SamplingFields(BaseModel):
    """Fields of both APIs. Unknown fields are accepted and ignored (vLLM behaviour)."""
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """OpenAI's schema lets most fields be null (`n=None` from the SDK is sent as null)
        and vLLM accepts them: null in a field that has no None value means its default."""
        if isinstance(data, dict):
            drop = _non_nullable_fields(cls)
            return {k: v for k, v in data.items() if v is not None or k not in drop}
        return data

    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED)
    user: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    prompt_logprobs: int | None = None
    allowed_token_ids: list[int] | None = Field(default=None, max_length=MAX_ALLOWED_TOKEN_IDS)
    bad_words: list[str] | None = Field(default=None, max_length=MAX_STOP_STRINGS)
    structured_outputs: StructuredOutputsRequest | None = None
    response_format: ResponseFormat | None = None
    priority: int = 0
    request_id: str | None = Field(default=None, max_length=256)
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    cache_salt: str | None = None
    vllm_xargs: dict[str, str | int | float | bool] | None = None

    def check_common(self) -> None:
        """Cross-field rules shared by both APIs (vLLM's messages where it has them)."""
        if self.stream_options is not None and not self.stream:
            raise BadRequest("Stream options can only be defined when `stream=True`.",
                             param="stream_options")
        if self.stream and self.prompt_logprobs is not None:
            raise BadRequest("`prompt_logprobs` are not available when `stream=True`.",
                             param="prompt_logprobs")
        if self.use_beam_search:
            raise BadRequest("beam search is not supported", param="use_beam_search")
        if self.priority != 0:
            raise BadRequest("Priority scheduling is not enabled.", param="priority")
        if self.cache_salt is not None and not self.cache_salt:
            raise BadRequest("Parameter 'cache_salt' must be a non-empty string if provided.",
                             param="cache_salt")
        if self.seed is not None and self.seed + self.n - 1 > MAX_SEED:
            # The engine seeds choice i with seed + i; past int64 it cannot carry the value.
            raise BadRequest(f"seed + n - 1 must be at most {MAX_SEED} (choice i is seeded with "
                             "seed + i)", param="seed")
        for key, value in (self.vllm_xargs or {}).items():
            # They cross to the engine as msgpack, whose integers are 64-bit.
            if isinstance(value, int) and not -(2**63) <= value < 2**63:
                raise BadRequest(f"vllm_xargs.{key[:64]} must fit in a 64-bit integer",
                                 param="vllm_xargs")

    def structured_params(self) -> StructuredOutputsParams | None:
        if self.structured_outputs is not None:
            return self.structured_outputs.to_params()
        if self.response_format is not None:
            return self.response_format.to_params()
        return None

    def force_usage(self) -> None:
        """--enable-force-include-usage: a stream reports usage (running and final) whatever
        its stream_options say."""
        if self.stream:
            self.stream_options = StreamOptions(include_usage=True, continuous_usage_stats=True)

    def usage_options(self) -> tuple[bool, bool]:
        """(include_usage, continuous_usage_stats) for a stream."""
        opts = self.stream_options
        include = bool(opts and opts.include_usage)
        return include, include and bool(opts.continuous_usage_stats)


# --- limits and conversion ----------------------------------------------------------------------
@dataclass(frozen=True)
class ModelLimits:
    """What a request is checked against; read once per request from the engine and server."""
    max_model_len: int
    vocab_size: int
    max_logprobs: int
    defaults: dict[str, Any]
    report_cached_tokens: bool  # usage.prompt_tokens_details

    @classmethod
    def of(cls, engine: Any, server: Any) -> ModelLimits:
        """`server`: the ServerConfig (max_logprobs, enable_prompt_tokens_details)."""
        # `info` and `config` are AsyncLLM details beyond its documented interface: read them
        # defensively, falling back to the tokenizer's size and "no prefix caching".
        vocab = getattr(getattr(engine, "info", None), "vocab_size", None)
        tok_len = len(engine.tokenizer)
        # An id must both index the embedding and decode: take the smaller of the two.
        vocab = min(vocab, tok_len) if vocab else tok_len
        config = getattr(engine, "config", None)
        caching = bool(getattr(getattr(config, "cache", None), "enable_prefix_caching", False))
        # Cached-token counts are reported whenever prefix caching is on (vLLM: only with
        # --enable-prompt-tokens-details, which here also reports them with caching off).
        return cls(max_model_len=engine.max_model_len, vocab_size=vocab,
                   max_logprobs=server.max_logprobs, defaults=dict(engine.generation_defaults or {}),
                   report_cached_tokens=caching or bool(server.enable_prompt_tokens_details))


def context_error(limits: ModelLimits, prompt_len: int, max_tokens: int) -> BadRequest:
    return BadRequest(
        f"This model's maximum context length is {limits.max_model_len} tokens. However, you "
        f"requested {max_tokens} output tokens and your prompt contains {prompt_len} input tokens, "
        f"for a total of {prompt_len + max_tokens} tokens. Please reduce the length of the input "
        "prompt or the number of requested output tokens.", param="input_tokens")


def resolve_max_tokens(requested: int | None, prompt_len: int, limits: ModelLimits) -> int:
    """The output budget: the request's (checked against the context), else what is left of the
    context; capped by the model's generation_config max_new_tokens as vLLM does."""
    if requested is not None:
        if requested < 0:
            raise BadRequest(f"max_tokens must be at least 0, got {requested}.", param="max_tokens")
        if prompt_len + requested > limits.max_model_len:
            raise context_error(limits, prompt_len, requested)
        budget = requested
    else:
        budget = limits.max_model_len - prompt_len
        if budget < 1:
            raise context_error(limits, prompt_len, 1)
    cap = limits.defaults.get("max_tokens")
    return min(budget, cap) if isinstance(cap, int) and cap > 0 else budget


async def encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of a prompt; a long text is tokenized off the event loop (other requests keep
    streaming meanwhile)."""
    if len(text) < OFFLOAD_TOKENIZE_CHARS:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=add_special_tokens)


# No tokenizer we serve averages anywhere near this many characters per token (English BPE is
# ~4, long whitespace runs in code vocabularies a few dozen), so a longer text cannot fit.
MAX_CHARS_PER_TOKEN = 100


def check_text_length(text: str, limits: ModelLimits, truncate: int | None) -> None:
    """Refuse a text that cannot fit the context before spending CPU on tokenizing it (a 30 MB
    body took ~19 s of a worker thread). With truncation asked for, any length is fine."""
    if truncate is None and len(text) > MAX_CHARS_PER_TOKEN * limits.max_model_len:
        raise BadRequest(
            f"This model's maximum context length is {limits.max_model_len} tokens. However, "
            f"your prompt contains {len(text)} input characters, more than "
            f"{MAX_CHARS_PER_TOKEN * limits.max_model_len} characters of text can fit in it. "
            "Please reduce the length of the input prompt.", param="input_text")


def check_prompt_ids(ids: list[int], limits: ModelLimits) -> None:
    if not ids:
        raise BadRequest("The decoder prompt cannot be empty", param="prompt")
    low, high = min(ids), max(ids)
    if low < 0 or high >= limits.vocab_size:
        bad = low if low < 0 else high
        raise BadRequest(f"Token id {bad} is out of vocabulary", param="prompt")


def truncate_prompt(ids: list[int], truncate: int | None, limits: ModelLimits) -> list[int]:
    """Keep the last k tokens (-1: the context length), as vLLM's left truncation."""
    if truncate is None:
        return ids
    k = limits.max_model_len if truncate == -1 else truncate
    if k > limits.max_model_len:
        raise BadRequest(f"truncate_prompt_tokens value ({k}) is greater than max_model_len "
                         f"({limits.max_model_len}). Please request a smaller truncation size.",
                         param="truncate_prompt_tokens")
    return ids[-k:] if k else []


def check_logprobs_count(value: int | None, limits: ModelLimits, name: str) -> None:
    if value is None:
        return
    if value < -1:
        raise BadRequest(f"{name} must be -1 or a non-negative integer, got {value}.", param=name)
    cap = limits.max_logprobs
    if cap >= 0 and (value == -1 or value > cap):
        shown = "the whole vocabulary (-1)" if value == -1 else value
        raise BadRequest(f"Requested {name} of {shown}, which is greater than max allowed: {cap}",
                         param=name)


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    if not raw:
        return None
    bias = {}
    for key, value in raw.items():
        try:
            tok = int(key)
        except ValueError:
            raise BadRequest(f"logit_bias keys must be token ids, got {key!r}",
                             param="logit_bias") from None
        if math.isnan(value):
            raise BadRequest("logit_bias values must be numbers", param="logit_bias")
        bias[tok] = min(max(value, -100.0), 100.0)  # clamped, as OpenAI and vLLM do
    return bias


def _bad_words_ids(words: list[str], tokenizer: Any) -> list[list[int]]:
    """Each bad word as token ids, alone and after a space (how it appears mid-sentence)."""
    out: list[list[int]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in out:
                out.append(ids)
    return out


def build_sampling_params(req: SamplingFields, *, max_tokens: int, logprobs: int | None,
                          prompt_logprobs: int | None, stream: bool, limits: ModelLimits,
                          tokenizer: Any,
                          structured: StructuredOutputsParams | None) -> SamplingParams:
    """The engine's parameters; unset sampling knobs take the model's generation_config values."""
    d = limits.defaults

    def pick(value: Any, name: str, fallback: Any) -> Any:
        return value if value is not None else d.get(name, fallback)

    if structured is not None:
        try:
            structured.validate()
        except ValueError as e:
            raise BadRequest(str(e), param="structured_outputs") from None
    try:
        params = SamplingParams(
            n=req.n, presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=pick(req.repetition_penalty, "repetition_penalty", 1.0),
            temperature=pick(req.temperature, "temperature", 1.0),
            top_p=pick(req.top_p, "top_p", 1.0), top_k=pick(req.top_k, "top_k", 0),
            min_p=pick(req.min_p, "min_p", 0.0), seed=req.seed,
            stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []), bad_words=list(req.bad_words or []),
            ignore_eos=req.ignore_eos, max_tokens=max_tokens, min_tokens=req.min_tokens,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens,
            logit_bias=_logit_bias(req.logit_bias), allowed_token_ids=req.allowed_token_ids,
            structured_outputs=structured,
            output_kind=OutputKind.DELTA if stream else OutputKind.FINAL_ONLY,
            extra_args=dict(req.vllm_xargs) if req.vllm_xargs else None)
        params.check_vocab(limits.vocab_size)
    except ParamError as e:
        raise BadRequest(str(e), param=e.param) from None
    except (ValueError, TypeError) as e:
        raise BadRequest(str(e)) from None
    if params.bad_words:
        params.bad_words_token_ids = _bad_words_ids(params.bad_words, tokenizer)
    return params


async def check_structured(so: StructuredOutputsParams | None, tokenizer: Any) -> None:
    """Reject an invalid schema, regex or grammar with a 400 before the engine compiles it.
    The compile blocks for milliseconds to seconds, so it runs off the event loop."""
    if so is None:
        return
    try:
        so.validate()
    except ValueError as e:
        raise BadRequest(str(e), param="structured_outputs") from None
    from inferd.structured import validate_structured_outputs
    try:
        await asyncio.to_thread(validate_structured_outputs, so, tokenizer)
    except (ValueError, TypeError) as e:
        raise BadRequest(str(e), param="structured_outputs") from None
    if isinstance(so.json, dict):
        # The schema crosses to the engine as text: a parsed one may hold numbers msgpack cannot
        # carry (an int past 64 bits in a `description` passes validation), and text is cheaper.
        so.json = json.dumps(so.json, ensure_ascii=False, separators=(",", ":"))


# --- ids, usage ---------------------------------------------------------------------------------
def make_request_id(prefix: str, header_id: str | None, body_id: str | None) -> str:
    """`<prefix>-<id>`: the X-Request-Id header wins, then the body's request_id, else random."""
    base = header_id or body_id or secrets.token_hex(16)
    return f"{prefix}-{base}"


def engine_request_id(request_id: str) -> str:
    """The id the engine tracks: the client's id plus a random suffix, so two requests sent
    with the same X-Request-Id or request_id (retries, proxies that pin one) both run, as in
    vLLM. Responses keep the client's id."""
    return f"{request_id}-{secrets.token_hex(4)}"


def now() -> int:
    return int(time.time())


def usage_json(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None) -> dict:
    usage: dict[str, Any] = {"prompt_tokens": prompt_tokens,
                             "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return usage


# --- logprobs -----------------------------------------------------------------------------------
def _clamp(lp: float) -> float:
    return lp if lp > LOGPROB_FLOOR else LOGPROB_FLOOR  # also maps -inf and nan to the floor


class TokenText:
    """How a token is shown in logprobs: its decoded text, or `token_id:N` on request."""

    def __init__(self, tokenizer: Any, as_ids: bool):
        self.tokenizer, self.as_ids = tokenizer, as_ids

    def __call__(self, token_id: int, entry: Logprob | None = None) -> str:
        if self.as_ids:
            return f"token_id:{token_id}"
        if entry is not None and entry.decoded_token is not None:
            return entry.decoded_token
        return self.tokenizer.decode([token_id])


def completion_logprobs(token_ids: list[int], positions: list[PositionLogprobs | None],
                        text: TokenText, offset: int) -> tuple[dict, int]:
    """The completions `logprobs` object for these tokens, text offsets starting at `offset`;
    returns it with the offset after the last token. A None position (the first prompt token)
    has no logprob."""
    out: dict[str, list] = {"text_offset": [], "token_logprobs": [], "tokens": [],
                            "top_logprobs": []}
    for tid, pos in zip(token_ids, positions):
        entry = pos.get(tid) if pos else None
        token = text(tid, entry)
        out["tokens"].append(token)
        out["text_offset"].append(offset)
        out["token_logprobs"].append(_clamp(entry.logprob) if entry else None)
        out["top_logprobs"].append(
            {text(k, v): _clamp(v.logprob) for k, v in pos.items()} if pos else None)
        offset += len(token)
    return out, offset


def _chat_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": _clamp(logprob), "bytes": list(token.encode("utf-8"))}


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], top_n: int,
                  text: TokenText) -> list[dict]:
    """`choices[i].logprobs.content` entries; `top_n` best alternatives by rank per token."""
    content = []
    for tid, pos in zip(token_ids, positions):
        entry = pos.get(tid)
        ranked = sorted(pos.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 0)
        top = [_chat_entry(text(k, v), v.logprob) for k, v in ranked[:max(top_n, 0)]]
        content.append({**_chat_entry(text(tid, entry), entry.logprob if entry else LOGPROB_FLOOR),
                        "top_logprobs": top})
    return content


def prompt_logprobs_json(positions: list[PositionLogprobs | None] | None,
                         text: TokenText) -> list[dict | None] | None:
    """vLLM's `prompt_logprobs`: per prompt position, token id -> {logprob, rank, decoded_token}."""
    if positions is None:
        return None
    return [None if pos is None else
            {str(k): {"logprob": _clamp(v.logprob), "rank": v.rank,
                      "decoded_token": text(k, v)} for k, v in pos.items()}
            for pos in positions]
