"""Typed messages across the API-process / engine-process boundary (msgspec, never pickle)."""
from __future__ import annotations

import enum

import msgspec

from inferd.sampling_params import PoolingParams, SamplingParams


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None
    pooling_params: PoolingParams | None
    eos_token_ids: list[int]
    arrival_time: float
    cache_salt: str | None = None


class FinishReason(enum.IntEnum):
    STOP = 0
    LENGTH = 1
    ABORT = 2

    def __str__(self) -> str:
        return ("stop", "length", "abort")[self]


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    # One entry per new token: (token ids, logprobs, ranks); index 0 is the sampled token.
    new_logprobs: list[tuple[list[int], list[float], list[int]]] | None = None
    # One entry per prompt position (first is None): same layout as new_logprobs.
    prompt_logprobs: list[tuple[list[int], list[float], list[int]] | None] | None = None
    pooled: list[float] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    # Monotonic timestamps (engine clock) for latency metrics.
    first_scheduled_time: float | None = None


class SchedulerStats(msgspec.Struct, omit_defaults=True):
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    num_preempted_reqs: int = 0  # waiting because they were preempted
    kv_cache_usage: float = 0.0  # fraction of blocks in use, 0..1
    prefix_cache_queries: int = 0  # tokens looked up this step
    prefix_cache_hits: int = 0  # tokens found this step
    num_preemptions: int = 0  # preemptions this step
    num_prompt_tokens: int = 0  # prompt tokens computed this step
    num_generation_tokens: int = 0  # tokens sampled this step
    step_count: int = 0


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True):
    outputs: list[EngineCoreOutput]
    timestamp: float
    scheduler_stats: SchedulerStats | None = None
    # Set when the engine process fails: the frontend fails every request and reports unhealthy.
    engine_error: str | None = None


class EngineCoreRequestType(enum.IntEnum):
    ADD = 0
    ABORT = 1
    UTILITY = 2
    SHUTDOWN = 3
