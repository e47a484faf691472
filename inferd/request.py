"""Per-request engine state, read by the scheduler, the KV manager and the model runner.

A leaf module: it imports nothing from the rest of the engine.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from inferd.sampling_params import PoolingParams, SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                RequestStatus.FINISHED_ABORTED: "abort"}.get(self)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None
    eos_token_ids: tuple[int, ...] = ()
    pooling_params: PoolingParams | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    # Salts the first block hash so tenants cannot probe each other's prefix cache.
    cache_salt: str | None = None
    # Requests created by n > 1 fan-out share the prompt's KV blocks through the prefix cache.
    parent_id: str | None = None

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Invariant: tokens [0, num_computed_tokens) of all_token_ids have their K/V in the cache.
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prompt tokens found in the prefix cache at first schedule
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    # Per-step timings for metrics (monotonic seconds).
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.block_hashes: list[bytes] = []
        self.num_cached_blocks = 0  # leading blocks already published to the prefix cache

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_prefill_done(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens

    @property
    def is_pooling(self) -> bool:
        return self.pooling_params is not None

    @property
    def max_tokens(self) -> int:
        sp = self.sampling_params
        return 0 if sp is None or sp.max_tokens is None else sp.max_tokens

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def is_finished(self) -> bool:
        return self.status.finished
