"""Per-request generation parameters, validated with explicit bounds.

A `SamplingParams` crosses the API/engine process boundary as a msgspec-encoded
dataclass, so every field is a plain type.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

# Bounds shared by the HTTP layer and the offline API.
MAX_N = 128
MAX_LOGPROBS_DEFAULT = 20
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_LEN = 1024
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_SEED = 2**63 - 1
MIN_SEED = -(2**63)
GREEDY_EPS = 1e-5


class OutputKind(enum.IntEnum):
    CUMULATIVE = 0  # every output carries the whole text so far
    DELTA = 1  # every output carries only what is new
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass
class StructuredOutputsParams:
    """Exactly one constraint is set; checked by `validate`."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    start_after: list[int] | None = None
    """Set by the server, never by a request: the grammar engages only once these token ids
    have been generated (a reasoning model's `</think>`), so it constrains the answer and not
    the thinking before it, as vLLM does with a reasoning parser."""

    def kinds(self) -> list[str]:
        return [k for k in ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
                if getattr(self, k) not in (None, False)]

    def validate(self) -> None:
        kinds = self.kinds()
        if len(kinds) != 1:
            raise ValueError("structured_outputs must set exactly one of json, regex, choice, "
                             f"grammar, json_object, structural_tag (got {kinds or 'none'})")
        if self.choice is not None and not self.choice:
            raise ValueError("structured_outputs.choice must be a non-empty list")
        if self.grammar is not None and not self.grammar.strip():
            raise ValueError("structured_outputs.grammar must not be empty")


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    bad_words: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None  # top-k alternatives per sampled token (-1: whole vocab)
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    output_kind: OutputKind = OutputKind.CUMULATIVE
    detokenize: bool = True
    # Filled by the input processor: token ids of `bad_words`, one list per word.
    bad_words_token_ids: list[list[int]] | None = None
    extra_args: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.bad_words is None:
            self.bad_words = []
        if self.seed == -1:
            self.seed = None
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self.validate()
        if self.temperature < GREEDY_EPS:
            # Greedy: the truncation knobs have no effect; reset so batching stays cheap.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    def validate(self, max_logprobs: int = -1) -> None:
        """Raise ValueError naming the field; `max_logprobs` < 0 skips that check."""

        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ParamError(name, f"{name} {msg}")

        check(isinstance(self.n, int) and 1 <= self.n <= MAX_N, "n", f"must be in [1, {MAX_N}], got {self.n}")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
              f"must be in [-2, 2], got {self.presence_penalty}")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
              f"must be in [-2, 2], got {self.frequency_penalty}")
        check(0.0 < self.repetition_penalty <= 2.0, "repetition_penalty",
              f"must be in (0, 2], got {self.repetition_penalty}")
        check(0.0 <= self.temperature <= 2.0 + 1e-9, "temperature",
              f"must be in [0, 2], got {self.temperature}")
        check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(isinstance(self.top_k, int) and 0 <= self.top_k <= 1 << 20, "top_k",
              f"must be -1, 0 (off) or a positive int, got {self.top_k}")
        check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            check(MIN_SEED <= self.seed <= MAX_SEED, "seed", "must fit in int64")
        check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"may hold at most {MAX_STOP_STRINGS} strings")
        for s in self.stop:
            check(isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_LEN, "stop",
                  f"strings must be non-empty and at most {MAX_STOP_STRING_LEN} characters")
        check(len(self.stop_token_ids) <= MAX_STOP_STRINGS, "stop_token_ids",
              f"may hold at most {MAX_STOP_STRINGS} ids")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
              "must be non-negative ints")
        if self.max_tokens is not None:
            check(isinstance(self.max_tokens, int) and self.max_tokens >= 0, "max_tokens",
                  f"must be >= 0, got {self.max_tokens}")
            check(self.min_tokens <= self.max_tokens, "min_tokens",
                  f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        check(self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None:
                check(isinstance(v, int) and v >= -1, name, f"must be -1 or >= 0, got {v}")
                if max_logprobs >= 0:
                    check(0 <= v <= max_logprobs, name,
                          f"must be at most {max_logprobs} (--max-logprobs), got {v}")
        if self.logit_bias:
            check(len(self.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES, "logit_bias",
                  f"may hold at most {MAX_LOGIT_BIAS_ENTRIES} entries")
            for tok, bias in self.logit_bias.items():
                check(tok >= 0, "logit_bias", f"token id {tok} is negative")
                check(-100.0 <= bias <= 100.0, "logit_bias", f"values must be in [-100, 100], got {bias}")
        if self.allowed_token_ids is not None:
            check(len(self.allowed_token_ids) > 0, "allowed_token_ids", "must not be empty")
            check(all(isinstance(t, int) and t >= 0 for t in self.allowed_token_ids),
                  "allowed_token_ids", "must be non-negative ints")
        if self.structured_outputs is not None:
            self.structured_outputs.validate()

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids in the params must exist in the model's vocabulary."""
        for name, ids in (("logit_bias", list(self.logit_bias or ())),
                          ("allowed_token_ids", self.allowed_token_ids or []),
                          ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ParamError(name, f"{name} holds token id {bad[0]}, out of vocabulary (size {vocab_size})")

    def clone(self) -> "SamplingParams":
        from copy import deepcopy
        return deepcopy(self)


class ParamError(ValueError):
    """A request parameter is out of bounds; `param` names it for the error envelope."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class PoolingParams:
    """Parameters of a pooling (embedding/classification/score) request."""

    task: str = "embed"  # embed | classify | score | encode
    dimensions: int | None = None  # Matryoshka truncation
    normalize: bool | None = None  # None: the model's pooler config decides
    use_activation: bool | None = None  # softmax/sigmoid for classify/score
    truncate_prompt_tokens: int | None = None
    # Segment ids for BERT-style pair inputs (cross-encoders); None means all zeros.
    token_type_ids: list[int] | None = None
