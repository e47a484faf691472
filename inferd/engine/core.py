"""EngineCore.step(): schedule -> execute -> update -> outputs. Runs in its own process
(`core_proc.py`) behind the API server, or in-process for the offline `LLM`."""
from __future__ import annotations

import logging
import os
import time

import torch

from inferd.config import ConfigError, EngineConfig, parse_bytes, resolve_device, resolve_dtype
from inferd.engine.model_info import ModelInfo, read_model_info
from inferd.engine.protocol import (EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest,
                                    FinishReason)
from inferd.kv_cache.manager import KVCacheManager
from inferd.request import Request
from inferd.scheduler.scheduler import Scheduler, finish_reason_of
from inferd.worker.model_runner import ModelRunner

logger = logging.getLogger("inferd.engine")

DEFAULT_CPU_KV_BYTES = 4 * 2**30
DEFAULT_BATCHED_TOKENS = 2048


class EngineCore:
    def __init__(self, config: EngineConfig, info: ModelInfo | None = None):
        self.config = config
        self.info = info or read_model_info(config.model)
        config.device = resolve_device(config.device)
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.model.dtype, config.device)
        if self.device.type == "cpu":
            from inferd import envs
            torch.set_num_threads(envs.INFERD_CPU_THREADS or max(1, len(os.sched_getaffinity(0))))
        torch.manual_seed(config.model.seed)
        self.runner = self._init_runner()
        self.num_blocks, self.max_model_len = self._init_kv_cache()
        self._init_cuda_graphs()
        self.kv = KVCacheManager(self.num_blocks, config.cache.block_size,
                                 config.cache.enable_prefix_caching and not self.info.is_pooling)
        budget = config.scheduler.max_num_batched_tokens or max(DEFAULT_BATCHED_TOKENS, 0)
        if self.info.is_pooling:
            budget = max(budget, self.max_model_len)  # pooling prompts are never chunked
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len, budget)
        # Prompt logprobs gathered chunk by chunk, sent with the request's first token.
        self._prompt_logprobs: dict[str, list] = {}

    def _init_runner(self) -> ModelRunner:
        from inferd.models.layers.linear import num_parameters
        from inferd.models.loader import load_model
        t0 = time.perf_counter()
        build = None
        if self.info.is_pooling:
            from inferd.models.adapters import build_pooling_model, pooling_model_class
            mc = self.config.model
            cls = pooling_model_class(self.info.hf_config, mc.convert, mc.runner)
            build = lambda: build_pooling_model(cls, self.info.hf_config, self.dtype,  # noqa: E731
                                                self.info.path, mc.pooler_config)
        model = load_model(self.info.path, self.info.hf_config, self.dtype, self.device, build=build,
                           quantization=self.config.model.quantization)
        n_params = num_parameters(model)
        logger.info("Loaded %s (%s, %.1fM parameters, %s on %s) in %.2f s", self.info.path.name,
                    self.info.architecture, n_params / 1e6, str(self.dtype).removeprefix("torch."),
                    self.device, time.perf_counter() - t0)
        return ModelRunner(model, self.device, self.dtype, self.config.cache.block_size,
                           self.info.vocab_size)

    def _pool_bytes(self) -> int:
        cc = self.config.cache
        if cc.kv_cache_memory:  # an explicit size wins on either device (vLLM's
            return parse_bytes(cc.kv_cache_memory)  # --kv-cache-memory-bytes does the same)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            return max(0, int(total * cc.gpu_memory_utilization) - used - 2**30)
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return min(DEFAULT_CPU_KV_BYTES, avail // 4)

    def _init_kv_cache(self) -> tuple[int, int]:
        """Size the block pool and fit max_model_len to it; refuse a length that can never fit."""
        cc, mc = self.config.cache, self.config.model
        model_max = self.info.max_position_embeddings
        if mc.max_model_len is not None and mc.max_model_len > model_max:
            raise ConfigError(f"--max-model-len {mc.max_model_len} exceeds the model's limit of "
                              f"{model_max} tokens (max_position_embeddings); pass at most {model_max}")
        if self.info.is_pooling:
            max_len = mc.max_model_len or model_max
            # Pooling requests keep no KV: the pool is bookkeeping only, no tensors behind it.
            return (max_len // cc.block_size + 1) * 4 + self.config.scheduler.max_num_seqs, max_len
        per_block = self.runner.kv_bytes_per_block()
        num_blocks = cc.num_gpu_blocks_override or self._pool_bytes() // per_block
        capacity = num_blocks * cc.block_size
        if mc.max_model_len is not None and mc.max_model_len > capacity:
            need = -(-mc.max_model_len // cc.block_size) * per_block
            raise ConfigError(
                f"--max-model-len {mc.max_model_len} needs {need / 2**30:.2f} GiB of KV cache "
                f"({-(-mc.max_model_len // cc.block_size)} blocks), but the pool holds {num_blocks} "
                f"blocks ({capacity} tokens). Lower --max-model-len to at most {capacity}, or raise "
                f"--kv-cache-memory (CPU) / --gpu-memory-utilization (GPU).")
        if num_blocks < 1:
            raise ConfigError("no memory left for the KV cache; raise --kv-cache-memory or "
                              "--gpu-memory-utilization")
        max_len = mc.max_model_len or min(model_max, capacity)
        self.runner.init_kv_cache(num_blocks)
        logger.info("Using max model len %d", max_len)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB, %d tokens); maximum concurrency "
                    "for %d tokens per request: %.2fx", num_blocks, cc.block_size,
                    num_blocks * per_block / 2**30, capacity, max_len, capacity / max_len)
        return num_blocks, max_len

    def _init_cuda_graphs(self) -> None:
        if (self.device.type != "cuda" or self.config.model.enforce_eager
                or self.info.is_pooling):
            return
        from inferd.attention.backends import get_attention_backend
        from inferd.attention.backends.triton_attn import HAS_TRITON
        from inferd.worker.cuda_graphs import capture_sizes
        backend = get_attention_backend(self.config.device).name
        # Captured decodes read the cache with the Triton kernel; SDPA's padded gather would
        # copy every row's whole max_model_len of K/V in each layer.
        if not HAS_TRITON or backend not in ("triton", "flash_attn"):
            logger.warning("CUDA graphs need triton and the triton or flash_attn attention "
                           "backend (have: %s, triton %s); running eagerly", backend,
                           "installed" if HAS_TRITON else "missing")
            return
        sc = self.config.scheduler
        sizes = capture_sizes(sc.cuda_graph_sizes, sc.max_num_seqs)
        self.runner.init_decode_graphs(sizes, self.max_model_len, capture=True)

    # --- requests --------------------------------------------------------------------------
    def add_request(self, r: EngineCoreRequest) -> EngineCoreOutput | None:
        """Admit a request; a malformed one finishes at once (returned) and never reaches a step."""
        problem = self._check_request(r)
        if problem:
            logger.warning("request %s refused by the engine: %s", r.request_id, problem)
            return EngineCoreOutput(r.request_id, [], finish_reason=FinishReason.ABORT)
        req = Request(r.request_id, list(r.prompt_token_ids), r.sampling_params,
                      eos_token_ids=tuple(r.eos_token_ids), pooling_params=r.pooling_params,
                      arrival_time=r.arrival_time, cache_salt=r.cache_salt)
        sp = r.sampling_params
        if sp is not None and sp.structured_outputs is not None:
            try:
                self._grammar_manager()
                self.runner.grammar_states[r.request_id] = (
                    self.runner.grammar_manager.new_state(sp.structured_outputs))
            except Exception as e:  # a bad grammar must never take the engine down
                logger.warning("request %s: grammar failed to compile: %s", r.request_id, e)
                return EngineCoreOutput(r.request_id, [], finish_reason=FinishReason.ABORT)
        self.scheduler.add_request(req)
        return None

    def _check_request(self, r: EngineCoreRequest) -> str | None:
        n = len(r.prompt_token_ids)
        if n == 0:
            return "empty prompt"
        if n >= self.max_model_len and r.pooling_params is None or n > self.max_model_len:
            return f"prompt of {n} tokens does not fit max_model_len {self.max_model_len}"
        if max(r.prompt_token_ids) >= self.info.vocab_size or min(r.prompt_token_ids) < 0:
            return "prompt token id out of vocabulary"
        if r.request_id in self.scheduler.requests:
            return "duplicate request id"
        return None

    def _grammar_manager(self):
        if self.runner.grammar_manager is None:
            from inferd.structured import GrammarManager
            self.runner.grammar_manager = GrammarManager(self.info.load_tokenizer(), self.info.vocab_size,
                                                         stop_token_ids=self.info.eos_token_ids or None)
        return self.runner.grammar_manager

    def abort(self, request_ids: list[str]) -> None:
        for req in self.scheduler.abort(request_ids):
            self.runner.release(req.request_id)
            self._prompt_logprobs.pop(req.request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- the loop body --------------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        sched = self.scheduler.schedule()
        result = self.runner.execute(sched)
        finished = {r.request_id for r in self.scheduler.update_from_output(sched, result.sampled)}
        if result.grammar_failed:  # end those requests; the rest of the batch goes on
            finished.update(r.request_id for r in self.scheduler.abort(result.grammar_failed))
        outputs = []
        for s in sched.scheduled:
            req, rid = s.request, s.request.request_id
            if rid in result.prompt_logprobs:
                self._prompt_logprobs.setdefault(rid, [None]).extend(result.prompt_logprobs[rid])
            tok = result.sampled.get(rid)
            if tok is None and rid not in finished:
                continue
            out = EngineCoreOutput(rid, [tok] if tok is not None else [],
                                   num_cached_tokens=max(req.num_cached_tokens, 0),
                                   first_scheduled_time=req.first_scheduled_time)
            if rid in result.logprobs:
                out.new_logprobs = [result.logprobs[rid]]
            if req.num_output_tokens == 1 and rid in self._prompt_logprobs:
                out.prompt_logprobs = self._prompt_logprobs.pop(rid)
            if rid in result.pooled:
                out.pooled = result.pooled[rid]
            if rid in finished:
                out.finish_reason = finish_reason_of(req)
                out.stop_reason = req.stop_reason
                self.runner.release(rid)
                self._prompt_logprobs.pop(rid, None)
            outputs.append(out)
        return EngineCoreOutputs(outputs, time.monotonic(), self.scheduler.make_stats())
