"""API-process side of generation: detokenize, stop strings, logprobs, n > 1, request metrics.

Engine outputs carry token ids; this turns them into `RequestOutput`s. A stop string ends a
request here, so the processor reports which engine requests to abort.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from inferd.engine.protocol import EngineCoreOutput, EngineCoreRequest, FinishReason
from inferd.engine.stats import FinishedRequestStats, StatsSink
from inferd.outputs import CompletionOutput, Logprob, PositionLogprobs, PoolingOutput, \
    PoolingRequestOutput, RequestOutput
from inferd.sampling_params import OutputKind, PoolingParams, SamplingParams


@dataclass
class ChildState:
    """One engine request: one choice of a client request."""
    index: int
    engine_id: str
    params: SamplingParams | None
    detok: object | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # What has been sent already (DELTA mode).
    sent_tokens: int = 0
    sent_logprobs: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    first_scheduled_time: float | None = None
    itl: list[float] = field(default_factory=list)
    num_cached_tokens: int = 0
    # Text released by the detokenizer's flush at finish, not yet handed out as a delta.
    flushed: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams | PoolingParams
    children: list[ChildState]
    arrival_time: float
    sink: Callable[[RequestOutput | PoolingRequestOutput], None]
    prompt_logprobs: list | None = None
    prompt_logprobs_sent: bool = False
    num_cached_tokens: int = 0
    pooled: list[float] | None = None

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.children)


class OutputProcessor:
    def __init__(self, tokenizer, stats_sinks: list[StatsSink] = ()):
        self.tokenizer = tokenizer
        self.stats_sinks = list(stats_sinks)
        self.parents: dict[str, ParentState] = {}
        self.child_to_parent: dict[str, tuple[ParentState, ChildState]] = {}

    # --- requests in --------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams | PoolingParams, eos_token_ids: list[int],
                    sink: Callable, cache_salt: str | None = None) -> list[EngineCoreRequest]:
        """Register a client request; returns the engine requests to send (n of them)."""
        if request_id in self.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        now = time.monotonic()
        is_pool = isinstance(params, PoolingParams)
        n = 1 if is_pool else params.n
        children, engine_reqs = [], []
        for i in range(n):
            eid = request_id if n == 1 else f"{i}_{request_id}"
            cp = None
            if not is_pool:
                cp = params if n == 1 else self._child_params(params, i)
            detok = None
            if cp is not None and cp.detokenize:
                from inferd.engine.detokenizer import IncrementalDetokenizer
                detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, cp)
            children.append(ChildState(i, eid, cp, detok,
                                       logprobs=[] if cp is not None and cp.logprobs is not None else None,
                                       cumulative_logprob=0.0 if cp is not None and cp.logprobs is not None else None))
            engine_reqs.append(EngineCoreRequest(eid, prompt_token_ids, cp, params if is_pool else None,
                                                 list(eos_token_ids), now, cache_salt))
        parent = ParentState(request_id, prompt, prompt_token_ids, params, children, now, sink)
        self.parents[request_id] = parent
        for c in children:
            self.child_to_parent[c.engine_id] = (parent, c)
        return engine_reqs

    @staticmethod
    def _child_params(params: SamplingParams, i: int) -> SamplingParams:
        cp = params.clone()
        cp.n = 1
        if cp.seed is not None:
            # Distinct, reproducible streams per choice, wrapped to stay a valid int64.
            cp.seed = (cp.seed + i + 2**63) % 2**64 - 2**63
        return cp

    def num_unfinished_seqs(self) -> int:
        """Engine sequences still running or waiting: an n-choice request counts n."""
        return sum(not c.finished for p in self.parents.values() for c in p.children)

    def engine_ids(self, request_id: str) -> list[str]:
        p = self.parents.get(request_id)
        return [c.engine_id for c in p.children if not c.finished] if p else []

    def abort(self, request_id: str) -> list[str]:
        """Forget a client request; returns its unfinished engine ids (to abort in the engine)."""
        p = self.parents.pop(request_id, None)
        if p is None:
            return []
        ids = []
        for c in p.children:
            self.child_to_parent.pop(c.engine_id, None)
            if not c.finished:
                ids.append(c.engine_id)
                c.finish_reason = "abort"
                self._record_finished(p, c)
        return ids

    # --- engine outputs in --------------------------------------------------------------------
    def process(self, outputs: list[EngineCoreOutput], now: float | None = None) -> list[str]:
        """Apply one step's outputs; returns engine ids to abort (stop strings matched)."""
        now = time.monotonic() if now is None else now
        to_abort: list[str] = []
        touched: dict[str, tuple[ParentState, list[ChildState]]] = {}
        for o in outputs:
            pc = self.child_to_parent.get(o.request_id)
            if pc is None:
                continue  # aborted by the client meanwhile
            parent, child = pc
            if self._apply(parent, child, o, now):
                to_abort.append(child.engine_id)
            touched.setdefault(parent.request_id, (parent, []))[1].append(child)
        for parent, children in touched.values():
            self._emit(parent, children)
            if parent.finished:
                self.parents.pop(parent.request_id, None)
                for c in parent.children:
                    self.child_to_parent.pop(c.engine_id, None)
        return to_abort

    def _apply(self, parent: ParentState, child: ChildState, o: EngineCoreOutput, now: float) -> bool:
        """Update one child; True when a stop string ended it (the engine must abort it)."""
        if child.finished:  # stopped by a stop string; the engine's abort is in flight
            return False
        if o.first_scheduled_time is not None and child.first_scheduled_time is None:
            child.first_scheduled_time = o.first_scheduled_time
        parent.num_cached_tokens = max(parent.num_cached_tokens, o.num_cached_tokens)
        child.num_cached_tokens = max(child.num_cached_tokens, o.num_cached_tokens)
        if o.prompt_logprobs is not None and parent.prompt_logprobs is None:
            parent.prompt_logprobs = [None if row is None else self._position(row)
                                      for row in o.prompt_logprobs]
        if o.pooled is not None:
            parent.pooled = o.pooled
        if o.new_token_ids:
            if child.first_token_time is None:
                child.first_token_time = now
            elif child.last_token_time is not None:
                child.itl.append(now - child.last_token_time)
            child.last_token_time = now
            child.token_ids.extend(o.new_token_ids)
            if child.logprobs is not None and o.new_logprobs:
                for row in o.new_logprobs:
                    pos = self._position(row)
                    child.logprobs.append(pos)
                    child.cumulative_logprob += row[1][0]
        stopped = False
        if child.detok is not None and o.new_token_ids:
            # A stop token's own text is left out, as vLLM does (EOS is special and skipped anyway).
            stop = child.detok.update(o.new_token_ids,
                                      stop_terminated=o.finish_reason == FinishReason.STOP)
            if stop is not None:
                child.finish_reason, child.stop_reason = "stop", stop
                stopped = o.finish_reason is None
        if o.finish_reason is not None and child.finish_reason is None:
            child.finish_reason = str(o.finish_reason)
            child.stop_reason = o.stop_reason
        if child.finished:
            if child.detok is not None and not isinstance(child.stop_reason, str):
                # No stop string can match any more: release held-back text into the last delta.
                child.flushed += child.detok.flush()
            self._record_finished(parent, child)
        return stopped

    def _position(self, row) -> PositionLogprobs:
        from inferd.engine.detokenizer import decode_token_for_logprobs
        ids, lps, ranks = row
        pos: PositionLogprobs = {}
        for tid, lp, rank in zip(ids, lps, ranks):
            if tid not in pos:
                pos[tid] = Logprob(lp, rank, decode_token_for_logprobs(self.tokenizer, tid))
        return pos

    # --- outputs out ----------------------------------------------------------------------------
    def _emit(self, parent: ParentState, children: list[ChildState]) -> None:
        if isinstance(parent.params, PoolingParams):
            if parent.finished:
                parent.sink(PoolingRequestOutput(parent.request_id, parent.prompt_token_ids,
                                                 PoolingOutput(parent.pooled or [])))
            return
        kind = parent.params.output_kind
        if kind == OutputKind.FINAL_ONLY and not parent.finished:
            return
        if kind == OutputKind.DELTA:
            outs = [self._completion(c, delta=True) for c in children]
            outs = [o for o in outs if o is not None]
            if not outs and not parent.finished:
                return
        else:
            outs = [self._completion(c, delta=False) for c in parent.children]
        prompt_lps = parent.prompt_logprobs
        if kind == OutputKind.DELTA and parent.prompt_logprobs_sent:
            prompt_lps = None
        parent.prompt_logprobs_sent = prompt_lps is not None or parent.prompt_logprobs_sent
        parent.sink(RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, outs,
                                  finished=parent.finished, prompt_logprobs=prompt_lps,
                                  num_cached_tokens=parent.num_cached_tokens))

    def _completion(self, c: ChildState, delta: bool) -> CompletionOutput | None:
        if delta:
            text = c.flushed + (c.detok.get_delta_text() if c.detok is not None else "")
            c.flushed = ""
            toks = c.token_ids[c.sent_tokens:]
            lps = c.logprobs[c.sent_logprobs:] if c.logprobs is not None else None
            if not text and not toks and not c.finished:
                return None
            if c.finished and c.sent_tokens == -1:
                return None  # finish already sent
            c.sent_tokens = len(c.token_ids) if not c.finished else -1
            c.sent_logprobs = len(c.logprobs) if c.logprobs is not None else 0
        else:
            text = c.detok.output_text if c.detok is not None else ""
            toks, lps = list(c.token_ids), (list(c.logprobs) if c.logprobs is not None else None)
        return CompletionOutput(c.index, text, toks, c.cumulative_logprob, lps,
                                c.finish_reason, c.stop_reason)

    def _record_finished(self, parent: ParentState, c: ChildState) -> None:
        if not self.stats_sinks:
            return
        now = time.monotonic()
        sched = c.first_scheduled_time or parent.arrival_time
        first = c.first_token_time
        last = c.last_token_time or now
        sp = c.params
        st = FinishedRequestStats(
            finish_reason=c.finish_reason or "abort", num_prompt_tokens=len(parent.prompt_token_ids),
            num_generation_tokens=len(c.token_ids),
            max_tokens_param=sp.max_tokens if sp is not None else None,
            n_param=getattr(parent.params, "n", 1), e2e_latency=now - parent.arrival_time,
            queued_time=max(0.0, sched - parent.arrival_time),
            prefill_time=max(0.0, (first or now) - sched), decode_time=max(0.0, last - (first or last)),
            inference_time=max(0.0, last - sched),
            ttft=(first - parent.arrival_time) if first is not None else None,
            inter_token_latencies=c.itl, is_pooling=isinstance(parent.params, PoolingParams),
            num_cached_tokens=c.num_cached_tokens,
            max_num_generation_tokens=(max(len(x.token_ids) for x in parent.children)
                                       if parent.finished else None))
        for s in self.stats_sinks:
            s.on_request_finished(st)
