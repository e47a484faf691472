"""SchedulerOutput -> model forward -> sampled tokens (or pooled vectors) per request."""
from __future__ import annotations

import logging
import math
import mmap
from dataclasses import dataclass, field

import torch

from inferd.attention.metadata import AttentionMetadata, build_batch
from inferd.request import Request
from inferd.scheduler.output import ScheduledRequest, SchedulerOutput
from inferd.worker.cuda_graphs import DecodeGraphs

logger = logging.getLogger(__name__)

LogprobRow = tuple[list[int], list[float], list[int]]  # token ids, logprobs, ranks


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, LogprobRow] = field(default_factory=dict)
    # Prompt logprobs computed this step, per request: one row per prompt position covered.
    prompt_logprobs: dict[str, list[LogprobRow]] = field(default_factory=dict)
    pooled: dict[str, list[float]] = field(default_factory=dict)
    # Requests whose sampled token their grammar rejected: the engine ends them.
    grammar_failed: list[str] = field(default_factory=list)


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros whose pages are committed only when written (CPU): idle RSS stays small.

    Zeros, not `empty`: masked attention still multiplies unused slots by 0, and 0 * NaN
    from stale memory would poison the result. The first write to each page is a page fault,
    which is why the block pool recycles written blocks when it can (`kv_cache/block_pool.py`).

    A plain anonymous mapping, not numpy's zeros: numpy advises transparent huge pages for
    large arrays (MADV_HUGEPAGE), and where THP's defrag is "madvise" (the usual default) a
    fault in an advised range may stop to compact memory for a 2 MiB page. On the 2-core Zen 4
    VM the first 2048-token prefill of a fresh engine spent 1.34 s in `write_kv` that way
    (later ones: ~10 ms); without the advice the first wave of 16 requests ran as fast as the
    ones after it (5.5 against 7.0 s), and sessions 6 and 9 found no steady-state gain from
    the huge pages (decode attention over an engine-sized pool the same either way).
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = itemsize * math.prod(shape)
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # The tensor keeps `buf` alive; the mapping goes when the last view of the cache does.
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 block_size: int, vocab_size: int):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.kv_caches: list[torch.Tensor] = []
        self._logits_buf: torch.Tensor | None = None
        # Encoders (BERT) attend bidirectionally and keep no KV cache.
        self.is_encoder = bool(getattr(model, "is_encoder", False))
        self.generators: dict[str, torch.Generator] = {}
        self.grammar_states: dict[str, object] = {}
        self.grammar_manager = None  # set by the engine when a structured request arrives
        from inferd.sample.sampler import Sampler
        self.sampler = Sampler()
        self.decode_graphs: DecodeGraphs | None = None

    def init_decode_graphs(self, sizes: list[int], max_model_len: int, capture: bool) -> None:
        """Serve decode-only steps of up to max(sizes) sequences from CUDA graphs (`capture`),
        or from the same padded static buffers run eagerly (CPU tests). After init_kv_cache."""
        scratch = self.kv_caches[0].shape[1] - 1
        self.decode_graphs = DecodeGraphs(self.model, self.device, sizes, max_model_len,
                                          self.block_size, scratch, capture)
        self.decode_graphs.capture_all()

    # --- KV cache ------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        layers = self.model.attention_layers()
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return sum(2 * self.block_size * a.num_kv_heads * a.head_dim * itemsize for a in layers)

    def init_kv_cache(self, num_blocks: int) -> None:
        """`num_blocks` for the KV manager plus one scratch block at index `num_blocks`, which
        it never hands out: the padded rows of a captured decode batch write and read there."""
        self.kv_caches = []
        for layer in self.model.attention_layers():
            cache = lazy_zeros((2, num_blocks + 1, self.block_size, layer.num_kv_heads,
                                layer.head_dim), self.dtype, self.device)
            layer.kv_cache = cache
            self.kv_caches.append(cache)

    # --- one step ----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        out = ModelRunnerOutput()
        if sched.is_empty:
            return out
        input_ids, positions, meta = self._prepare_inputs(sched.scheduled)
        extra = {}
        if getattr(self.model, "uses_token_type_ids", False):
            extra["token_type_ids"] = self._token_type_ids(sched.scheduled)
        graphs = self.decode_graphs
        if graphs is not None and not extra and graphs.applies(meta):
            hidden = graphs.run(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, meta, **extra)
        pooling = [s for s in sched.scheduled if s.request.is_pooling]
        if pooling:
            self._pool(hidden, meta, sched.scheduled, out)
            return out
        self._compute_prompt_logprobs(hidden, meta, sched.scheduled, out)
        sampling = [(i, s) for i, s in enumerate(sched.scheduled) if s.samples]
        if not sampling:
            return out
        rows = torch.tensor([meta.query_start_loc[i + 1] - 1 for i, _ in sampling], device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows),
                                           **self._logits_out(len(sampling)))
        self._sample(logits, [s.request for _, s in sampling], out)
        return out

    def _logits_out(self, rows: int) -> dict[str, torch.Tensor]:
        """A reused float32 buffer for the sampled rows' logits (CPU; see to_float_logits),
        as compute_logits' `out`; empty when the model or device does not take one. Nothing
        holds the logits past the step that sampled from them."""
        width = getattr(getattr(self.model, "lm_head", None), "out_features", None)
        if self.device.type != "cpu" or width is None:
            return {}
        buf = self._logits_buf
        if buf is None or buf.shape[0] < rows:
            size = 1 << max(rows - 1, 15).bit_length()  # a power of two: few regrowths
            buf = self._logits_buf = torch.empty(size, width, dtype=torch.float32)
        return {"out": buf[:rows]}

    def _prepare_inputs(self, scheduled: list[ScheduledRequest]
                        ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        tokens: list[int] = []
        for s in scheduled:
            start = s.num_computed_tokens
            tokens.extend(s.request.all_token_ids[start:start + s.num_new_tokens])
        positions, meta = build_batch([s.num_computed_tokens for s in scheduled],
                                      [s.num_new_tokens for s in scheduled],
                                      [s.block_ids for s in scheduled], self.block_size, self.device,
                                      causal=not self.is_encoder)
        input_ids = torch.tensor(tokens, dtype=torch.int64, device=self.device)
        return input_ids, positions, meta

    def _token_type_ids(self, scheduled: list[ScheduledRequest]) -> torch.Tensor | None:
        """BERT segment ids, flat [T]; zeros for requests without them (single texts)."""
        if not any(s.request.pooling_params and s.request.pooling_params.token_type_ids
                   for s in scheduled):
            return None
        ids: list[int] = []
        for s in scheduled:
            tt = s.request.pooling_params.token_type_ids if s.request.pooling_params else None
            start = s.num_computed_tokens
            ids.extend(tt[start:start + s.num_new_tokens] if tt else [0] * s.num_new_tokens)
        return torch.tensor(ids, dtype=torch.int64, device=self.device)

    def _sample(self, logits: torch.Tensor, reqs: list[Request], out: ModelRunnerOutput) -> None:
        from inferd.sample.metadata import SamplingMetadata
        params = [r.sampling_params for r in reqs]
        gens = [self._generator(r) for r in reqs]
        self._apply_grammars(logits, reqs)
        meta = SamplingMetadata.build(params, [r.prompt_token_ids for r in reqs],
                                      [r.output_token_ids for r in reqs], gens,
                                      [r.eos_token_ids for r in reqs], logits.shape[-1], self.device)
        res = self.sampler(logits, meta)
        sampled = res.sampled_token_ids.tolist()
        for r, tok in zip(reqs, sampled):
            out.sampled[r.request_id] = tok
        if res.logprobs is not None:
            ids, lps = res.logprob_token_ids.tolist(), res.logprobs.tolist()
            ranks = res.sampled_ranks.tolist()
            for i, r in enumerate(reqs):
                k = r.sampling_params.logprobs
                if k is None:
                    continue
                k = self.vocab_size if k < 0 else k
                out.logprobs[r.request_id] = (ids[i][: k + 1], lps[i][: k + 1],
                                              [ranks[i]] + list(range(1, k + 1)))
        out.grammar_failed = self._advance_grammars(reqs, sampled)

    def _generator(self, r: Request) -> torch.Generator | None:
        seed = r.sampling_params.seed
        if seed is None or r.sampling_params.greedy:
            return None
        g = self.generators.get(r.request_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
            self.generators[r.request_id] = g
        return g

    def _compute_prompt_logprobs(self, hidden, meta, scheduled, out) -> None:
        from inferd.sample.ops import compute_topk_logprobs
        for i, s in enumerate(scheduled):
            r = s.request
            k = r.sampling_params.prompt_logprobs if r.sampling_params else None
            if k is None or s.num_computed_tokens >= r.num_prompt_tokens:
                continue
            start = meta.query_start_loc[i]
            # Position p predicts prompt token p+1; the last prompt position predicts an output.
            n = min(s.num_new_tokens, r.num_prompt_tokens - 1 - s.num_computed_tokens)
            if n <= 0:
                out.prompt_logprobs.setdefault(r.request_id, [])
                continue
            logits = self.model.compute_logits(hidden[start:start + n])
            targets = torch.tensor(r.prompt_token_ids[s.num_computed_tokens + 1:
                                                      s.num_computed_tokens + 1 + n], device=self.device)
            k = self.vocab_size if k < 0 else k
            ids, lps, ranks = compute_topk_logprobs(logits, targets, k)
            ids, lps, ranks = ids.tolist(), lps.tolist(), ranks.tolist()
            out.prompt_logprobs[r.request_id] = [
                (ids[j], lps[j], [ranks[j]] + list(range(1, k + 1))) for j in range(n)]

    def _pool(self, hidden, meta, scheduled, out) -> None:
        params = [s.request.pooling_params for s in scheduled]
        vectors = self.model.pool(hidden, meta, params)
        for s, v in zip(scheduled, vectors):
            if s.samples:
                out.pooled[s.request.request_id] = v.float().tolist()

    # --- structured outputs ----------------------------------------------------------------
    def _apply_grammars(self, logits: torch.Tensor, reqs: list[Request]) -> None:
        states = self.grammar_states
        rows = [i for i, r in enumerate(reqs)
                if r.request_id in states and states[r.request_id].active]
        if not rows:
            return
        from inferd.structured import apply_bitmask
        bitmask = self.grammar_manager.allocate_bitmask(len(reqs))
        for i in rows:
            self.grammar_states[reqs[i].request_id].fill_bitmask(bitmask, i)
        apply_bitmask(logits, bitmask, rows)

    def _advance_grammars(self, reqs: list[Request], sampled: list[int]) -> list[str]:
        failed = []
        for r, tok in zip(reqs, sampled):
            g = self.grammar_states.get(r.request_id)
            if g is not None and not g.accept(tok) and tok not in r.eos_token_ids:
                logger.warning("request %s: grammar rejected token %d", r.request_id, tok)
                failed.append(r.request_id)
        return failed

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)
        self.grammar_states.pop(request_id, None)
