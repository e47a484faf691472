"""The CUDA path, end to end through the engine core: our models on the GPU, decodes replayed
from captured CUDA graphs, against transformers on the same tiny checkpoints, and against the
eager path. Needs a GPU: skipped on CI, run by `benchmarks/device_check.sh` when one is lent.
"""
from __future__ import annotations

import time

import pytest
import torch

from inferd.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from inferd.engine.core import EngineCore
from inferd.engine.protocol import EngineCoreRequest
from inferd.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (the device tool); CI has none")

NEW_TOKENS = 24
PROMPT_LENS = [5, 9, 13, 3, 17]


def prompts_for(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def run_core(path, dtype: str, eager: bool, prompts: list[list[int]]) -> tuple[list[list[int]], EngineCore]:
    """Requests arrive a step apart, so decode batches take sizes 1..5 (padded to 1, 2, 4, 8)."""
    core = EngineCore(EngineConfig(
        model=ModelConfig(model=str(path), dtype=dtype, enforce_eager=eager),
        cache=CacheConfig(num_gpu_blocks_override=512),
        scheduler=SchedulerConfig(max_num_seqs=8, cuda_graph_sizes=[1, 2, 4, 8]), device="cuda"))
    tokens: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    while pending or core.has_unfinished():
        if pending:
            i, p = pending.pop(0)
            sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
            core.add_request(EngineCoreRequest(f"r{i}", p, sp, None, [], time.monotonic()))
        for out in core.step().outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert core.kv.num_held_blocks() == 0
    return [tokens[f"r{i}"] for i in range(len(prompts))], core


def test_greedy_on_cuda_with_graphs_matches_transformers(tiny_decoder):
    prompts = prompts_for(tiny_decoder.vocab_size)
    ours, core = run_core(tiny_decoder.path, "float32", False, prompts)
    graphs = core.runner.decode_graphs
    assert graphs is not None and sorted(graphs.graphs) == [1, 2, 4, 8]
    for p, toks in zip(prompts, ours):
        with torch.no_grad():
            ref = tiny_decoder.hf_model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS,
                                                 min_new_tokens=NEW_TOKENS, do_sample=False)
        assert toks == ref[0, len(p):].tolist()


def test_graphs_give_the_eager_tokens_in_bf16(tiny_decoder):
    prompts = prompts_for(tiny_decoder.vocab_size)
    graphed, core = run_core(tiny_decoder.path, "bfloat16", False, prompts)
    eager, eager_core = run_core(tiny_decoder.path, "bfloat16", True, prompts)
    assert core.runner.decode_graphs is not None and eager_core.runner.decode_graphs is None
    assert graphed == eager
