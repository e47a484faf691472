"""The offline API, shaped like vLLM's: `LLM(model).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import itertools
from typing import Any, Sequence

from inferd.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from inferd.engine.llm_engine import LLMEngine
from inferd.outputs import PoolingRequestOutput, RequestOutput
from inferd.sampling_params import PoolingParams, SamplingParams

PromptType = str | dict[str, Any] | list[int]


class LLM:
    def __init__(self, model: str | None = None, *, dtype: str = "auto", max_model_len: int | None = None,
                 seed: int = 0, kv_cache_memory: str | None = None, enable_prefix_caching: bool = True,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None, block_size: int = 16,
                 device: str = "auto", num_gpu_blocks_override: int | None = None,
                 revision: str | None = None, download_dir: str | None = None,
                 generation_config: str = "auto", enable_chunked_prefill: bool = True,
                 runner: str = "auto", convert: str = "auto", pooler_config: dict | None = None,
                 quantization: str | None = None, enforce_eager: bool = False,
                 cuda_graph_sizes: list[int] | None = None):
        if model is None:
            from inferd.config import default_model_path
            model = default_model_path()
        config = EngineConfig(
            model=ModelConfig(model=model, dtype=dtype, max_model_len=max_model_len, seed=seed,
                              revision=revision, download_dir=download_dir,
                              generation_config=generation_config, runner=runner, convert=convert,
                              pooler_config=pooler_config, quantization=quantization,
                              enforce_eager=enforce_eager),
            cache=CacheConfig(block_size=block_size, kv_cache_memory=kv_cache_memory,
                              enable_prefix_caching=enable_prefix_caching,
                              num_gpu_blocks_override=num_gpu_blocks_override),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      enable_chunked_prefill=enable_chunked_prefill,
                                      cuda_graph_sizes=list(cuda_graph_sizes or [])),
            device=device)
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        """The model's tokenizer (vLLM's name for it)."""
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.engine.info.generation_defaults)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if isinstance(prompt, dict) and "prompt" in prompt:
            return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"unsupported prompt type {type(prompt).__name__}")

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
                  else [sampling_params] * len(prompts))
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        ids = []
        for prompt, sp in zip(prompts, params):
            text, tokens = self._tokenize(prompt)
            self._check_length(tokens)
            rid = str(next(self._ids))
            ids.append(rid)
            self.engine.add_request(rid, tokens, sp, prompt=text)
        return self._run(ids)

    def _check_length(self, tokens: list[int]) -> None:
        if not tokens:
            raise ValueError("the prompt is empty")
        if len(tokens) >= self.engine.max_model_len:
            raise ValueError(f"the prompt has {len(tokens)} tokens; max_model_len is "
                             f"{self.engine.max_model_len}")

    def _run(self, ids: list[str]) -> list:
        results: dict[str, Any] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                results[out.request_id] = out
        return [results[i] for i in ids]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None, *, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict | None = None, tools: list[dict] | None = None) -> list[RequestOutput]:
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conv in convs:
            text = self.render_chat(conv, chat_template=chat_template, tools=tools,
                                    add_generation_prompt=add_generation_prompt,
                                    continue_final_message=continue_final_message,
                                    **(chat_template_kwargs or {}))
            # The template already holds the BOS token where the model wants one.
            prompts.append({"prompt": text,
                            "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params)

    def render_chat(self, conversation: list[dict], **kwargs) -> str:
        template = kwargs.pop("chat_template", None) or self.engine.info.chat_template
        return self.tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                                  **kwargs)

    def encode(self, prompts: PromptType | Sequence[PromptType],
               pooling_params: PoolingParams | None = None) -> list[PoolingRequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        ids = []
        for prompt in prompts:
            _, tokens = self._tokenize(prompt)
            rid = str(next(self._ids))
            ids.append(rid)
            self.engine.add_request(rid, tokens, pooling_params or PoolingParams())
        return self._run(ids)

    def embed(self, prompts, pooling_params: PoolingParams | None = None) -> list[PoolingRequestOutput]:
        return self.encode(prompts, pooling_params or PoolingParams(task="embed"))
