"""SchedulerOutput: the contract between the scheduler and the model runner."""
from __future__ import annotations

from dataclasses import dataclass, field

from inferd.request import Request


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    """Tokens computed this step: all_token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens]."""
    num_computed_tokens: int
    """Tokens whose K/V are cached before this step (the start position of the new tokens)."""
    block_ids: list[int]

    @property
    def samples(self) -> bool:
        """This step reaches the end of the known tokens, so its last position is sampled."""
        return self.num_computed_tokens + self.num_new_tokens >= self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    """Batch order: decodes (one new token) first, then prefill chunks."""
    finished_ids: list[str] = field(default_factory=list)
    num_preemptions: int = 0

    @property
    def total_num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
