"""Synchronous engine for the offline API: EngineCore in-process + the output processor."""
from __future__ import annotations

from inferd.config import EngineConfig
from inferd.engine.core import EngineCore
from inferd.engine.model_info import read_model_info
from inferd.engine.output_processor import OutputProcessor
from inferd.engine.stats import StatsSink
from inferd.outputs import PoolingRequestOutput, RequestOutput
from inferd.sampling_params import PoolingParams, SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig, stats_sinks: list[StatsSink] = ()):
        self.config = config
        self.info = read_model_info(config.model)
        self.core = EngineCore(config, self.info)
        self.tokenizer = self.info.load_tokenizer()
        self.processor = OutputProcessor(self.tokenizer, stats_sinks)
        self.max_model_len = self.core.max_model_len
        self._finished: dict[str, RequestOutput | PoolingRequestOutput] = {}

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams | PoolingParams, prompt: str | None = None,
                    cache_salt: str | None = None) -> None:
        def sink(out):
            if out.finished:
                self._finished[out.request_id] = out
        reqs = self.processor.add_request(request_id, prompt, prompt_token_ids, params,
                                          self.info.eos_token_ids, sink, cache_salt)
        for r in reqs:
            early = self.core.add_request(r)
            if early is not None:
                self.processor.process([early])

    def abort(self, request_id: str) -> None:
        self.core.abort(self.processor.abort(request_id))

    def has_unfinished(self) -> bool:
        return bool(self.processor.parents) or self.core.has_unfinished()

    def step(self) -> list[RequestOutput | PoolingRequestOutput]:
        """Run one engine step; returns the client requests that finished in it."""
        if self.core.has_unfinished():
            outs = self.core.step()
            stop = self.processor.process(outs.outputs)
            if stop:
                self.core.abort(stop)
        done = list(self._finished.values())
        self._finished.clear()
        return done
