"""Continuous batching with chunked prefill, prefix caching and preemption by recompute."""
from __future__ import annotations

import time
from collections import deque

from inferd.config import SchedulerConfig
from inferd.engine.protocol import FinishReason, SchedulerStats
from inferd.kv_cache.manager import KVCacheManager
from inferd.request import Request, RequestStatus
from inferd.scheduler.output import ScheduledRequest, SchedulerOutput


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 max_num_batched_tokens: int):
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.token_budget = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        # Insertion-ordered, so iteration is oldest first and removal is O(1).
        self.running: dict[str, Request] = {}
        self.requests: dict[str, Request] = {}
        self.num_preemptions_since_stats = 0
        self.num_prompt_tokens_since_stats = 0
        self.num_gen_tokens_since_stats = 0
        self.step_count = 0

    # --- requests in and out -------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_ids: list[str]) -> list[Request]:
        """Finish the named requests (those still known) as aborted; every block they hold is freed."""
        aborted = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            self._finish(req, RequestStatus.FINISHED_ABORTED)
            aborted.append(req)
        return aborted

    def _finish(self, req: Request, status: RequestStatus) -> None:
        if req.status == RequestStatus.RUNNING:
            del self.running[req.request_id]
        else:  # waiting or preempted; aborts are rare, so a linear remove is fine here
            self.waiting.remove(req)
        req.status = status
        self.kv.free(req)
        self.requests.pop(req.request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens.

        There is no prefill phase and no decode phase: each request has `num_computed_tokens`
        that catch up with `num_tokens` (prompt + outputs so far). A step gives running
        requests their missing tokens first, oldest first, then admits waiting requests while
        the token budget and the KV pool allow. Prefix-cache hits start a request with
        tokens already computed; a prompt longer than the budget is computed in chunks.
        When the pool runs dry the newest running request is preempted (its blocks freed,
        recomputed later), so the oldest request always makes progress.
        """
        budget = self.token_budget
        scheduled: list[ScheduledRequest] = []
        preemptions = 0
        for req in list(self.running.values()):
            if budget <= 0:
                break
            if req.status != RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:
                continue
            while not self.kv.allocate_slots(req, n):
                victim = next(reversed(self.running.values()))
                self._preempt(victim, scheduled)
                preemptions += 1
                if victim is req:
                    break
            else:
                scheduled.append(self._scheduled(req, n))
                budget -= n
        if not preemptions:
            budget = self._admit_waiting(budget, scheduled)
        self.num_preemptions_since_stats += preemptions
        # Decodes first: the attention backend batches them as one op.
        scheduled.sort(key=lambda s: s.num_new_tokens != 1)
        for s in scheduled:
            if s.request.first_scheduled_time is None:
                s.request.first_scheduled_time = time.monotonic()
            if s.num_computed_tokens < s.request.num_prompt_tokens:
                self.num_prompt_tokens_since_stats += min(
                    s.num_new_tokens, s.request.num_prompt_tokens - s.num_computed_tokens)
        self.step_count += 1
        return SchedulerOutput(scheduled, num_preemptions=preemptions)

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hits, num_hit = self.kv.get_computed_blocks(req)
            n = req.num_tokens - num_hit
            if n > budget:
                if not self.config.enable_chunked_prefill or req.is_pooling:
                    break
                n = budget
            if not self.kv.allocate_slots(req, n, hits):
                break
            self.waiting.popleft()
            req.num_computed_tokens = num_hit
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
                self.kv.record_prefix_lookup(req.num_tokens, num_hit)
            req.status = RequestStatus.RUNNING
            self.running[req.request_id] = req
            scheduled.append(self._scheduled(req, n))
            budget -= n
        return budget

    def _scheduled(self, req: Request, n: int) -> ScheduledRequest:
        return ScheduledRequest(req, n, req.num_computed_tokens, self.kv.block_ids(req.request_id))

    def _preempt(self, req: Request, scheduled: list[ScheduledRequest]) -> None:
        del self.running[req.request_id]
        for j, s in enumerate(scheduled):
            if s.request is req:
                del scheduled[j]
                break
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_cached_blocks = 0
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed tokens, append sampled tokens, and finish requests that stop.

        Returns the requests that finished this step (their blocks are already freed).
        """
        finished = []
        for s in out.scheduled:
            req = s.request
            if req.is_finished:  # aborted while the step ran
                continue
            req.num_computed_tokens = s.num_computed_tokens + s.num_new_tokens
            tok = sampled.get(req.request_id)
            if tok is None:
                if req.is_pooling and s.samples:
                    self._finish(req, RequestStatus.FINISHED_STOPPED)
                    finished.append(req)
                continue
            req.append_output_token(tok)
            self.num_gen_tokens_since_stats += 1
            status = self._check_stop(req, tok)
            if status is not None:
                self._finish(req, status)
                finished.append(req)
        return finished

    def _check_stop(self, req: Request, tok: int) -> RequestStatus | None:
        sp = req.sampling_params
        assert sp is not None
        n_out = req.num_output_tokens
        if n_out >= sp.min_tokens:
            if not sp.ignore_eos and tok in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if tok in sp.stop_token_ids:
                req.stop_reason = tok
                return RequestStatus.FINISHED_STOPPED
        if sp.max_tokens is not None and n_out >= sp.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def make_stats(self) -> SchedulerStats:
        q, h = self.kv.take_stats()
        stats = SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            num_preempted_reqs=sum(1 for r in self.waiting if r.status == RequestStatus.PREEMPTED),
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=q,
            prefix_cache_hits=h,
            num_preemptions=self.num_preemptions_since_stats,
            num_prompt_tokens=self.num_prompt_tokens_since_stats,
            num_generation_tokens=self.num_gen_tokens_since_stats,
            step_count=self.step_count,
        )
        self.num_preemptions_since_stats = 0
        self.num_prompt_tokens_since_stats = 0
        self.num_gen_tokens_since_stats = 0
        return stats


def finish_reason_of(req: Request) -> FinishReason | None:
    return {RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
            RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
            RequestStatus.FINISHED_ABORTED: FinishReason.ABORT}.get(req.status)
