"""Frontend-side request statistics, handed to metric sinks (Prometheus lives in inferd/metrics.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from inferd.engine.protocol import SchedulerStats


@dataclass
class FinishedRequestStats:
    finish_reason: str  # stop | length | abort | error
    num_prompt_tokens: int
    num_generation_tokens: int
    max_tokens_param: int | None
    n_param: int
    e2e_latency: float  # arrival -> finish, seconds
    queued_time: float  # arrival -> first scheduled
    prefill_time: float  # first scheduled -> first token
    decode_time: float  # first token -> last token
    inference_time: float  # first scheduled -> last token
    ttft: float | None  # arrival -> first token
    inter_token_latencies: list[float] = field(default_factory=list)
    is_pooling: bool = False
    num_cached_tokens: int = 0  # prompt tokens read from the prefix cache
    # The most tokens any of the parent request's n choices generated; set on its last child.
    max_num_generation_tokens: int | None = None


class StatsSink(Protocol):
    """Implemented by inferd.metrics.PrometheusStatsSink; the engine client calls it."""

    def on_scheduler_stats(self, stats: SchedulerStats) -> None: ...

    def on_request_finished(self, stats: FinishedRequestStats) -> None: ...

    def on_request_rejected(self, reason: str) -> None: ...
