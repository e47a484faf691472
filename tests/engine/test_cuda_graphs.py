"""Decode steps through the CUDA-graph path's static buffers, run eagerly on CPU (`capture=False`):
the padding to a captured size, the static metadata and the scratch block are what a captured
graph replays, so the greedy tokens must be those of the plain path.

The capture itself (torch.cuda.CUDAGraph) needs a GPU; CI has none.
"""
from __future__ import annotations

import os

import pytest
import torch

from inferd import LLM, SamplingParams
from inferd.attention.backends import get_attention_backend
from inferd.attention.metadata import build_batch
from inferd.worker.cuda_graphs import DecodeGraphs, capture_sizes

N_TOKENS = 24


def greedy(n: int = N_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_capture_sizes_follow_vllms_flag():
    assert capture_sizes([], 256) == [1, 2, 4] + list(range(8, 257, 8))
    assert capture_sizes([], 20) == [1, 2, 4, 8, 16, 20]  # a full batch still replays
    assert capture_sizes([], 1024)[-1] == 512
    assert capture_sizes([16], 256) == [1, 2, 4, 8, 16]
    assert capture_sizes([3, 1, 64, 3], 32) == [1, 3]
    assert capture_sizes([], 1) == [1]


def staggered(llm: LLM, prompts: list[list[int]], tokens: int) -> dict[str, list[int]]:
    """Requests arrive a step apart and run to different lengths, so the decode batch takes
    every size from 1 up and back down."""
    eng, results = llm.engine, {}
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, greedy(tokens - 2 * i))
        for out in eng.step():
            results[out.request_id] = out
    while eng.has_unfinished():
        for out in eng.step():
            results[out.request_id] = out
    assert eng.core.kv.num_held_blocks() == 0
    return {k: v.outputs[0].token_ids for k, v in results.items()}


@pytest.fixture(scope="module")
def prompts(tiny_llama_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    texts = ["Hello", "The capital of France is", "Once upon a time, in a land far away",
             "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13", "def f(x):", "Paris", "a b c d e"]
    return [tok.encode(t) for t in texts]


def with_static_decodes(llm: LLM, sizes: list[int]) -> list[tuple[int, int]]:
    """Route the engine's decode steps through DecodeGraphs; returns (rows, size) per step."""
    runner = llm.engine.core.runner
    runner.init_decode_graphs(sizes, llm.engine.core.max_model_len, capture=False)
    graphs, calls = runner.decode_graphs, []
    real = graphs.run

    def run(input_ids, positions, meta):
        calls.append((meta.num_seqs, next(s for s in graphs.sizes if s >= meta.num_seqs)))
        return real(input_ids, positions, meta)
    graphs.run = run
    return calls


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_static_decodes_give_the_plain_paths_tokens(tiny_llama_dir, prompts, backend,
                                                    monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton kernel takes CPU tensors only in Triton's interpreter")
        monkeypatch.setenv("INFERD_ATTENTION_BACKEND", "triton")  # its kernel, interpreted
    get_attention_backend.cache_clear()
    try:
        plain = staggered(LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="32MiB", device="cpu"),
                          prompts, N_TOKENS)
        llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="32MiB", device="cpu")
        layer = llm.engine.core.runner.model.attention_layers()[0]
        calls = with_static_decodes(llm, [1, 2, 4, 8])
        assert staggered(llm, prompts, N_TOKENS) == plain
        assert layer._backend.name == ("triton" if backend == "triton" else
                                       get_attention_backend("cpu").name)
    finally:
        get_attention_backend.cache_clear()
    assert calls and any(size > rows for rows, size in calls)  # padded batches ran
    assert {rows for rows, _ in calls} >= {1, 3, 5, 7}


def test_batches_past_the_largest_size_run_the_plain_path(tiny_llama_dir, prompts):
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="32MiB", device="cpu")
    plain = staggered(llm, prompts, N_TOKENS)
    calls = with_static_decodes(llm, [1, 2])
    assert staggered(llm, prompts, N_TOKENS) == plain
    assert calls and max(rows for rows, _ in calls) == 2


def test_padded_rows_touch_only_the_scratch_block(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="32MiB", device="cpu")
    core = llm.engine.core
    runner, bs = core.runner, core.config.cache.block_size
    assert runner.kv_caches[0].shape[1] == core.num_blocks + 1  # the scratch block
    graphs = DecodeGraphs(runner.model, torch.device("cpu"), [8], core.max_model_len, bs,
                          core.num_blocks, capture=False)
    # three decodes at contexts 4, 20 and 9 in blocks 3; 5, 6; 7
    positions, meta = build_batch([4, 20, 9], [1, 1, 1], [[3], [5, 6], [7]], bs)
    caches = [c.clone() for c in runner.kv_caches]
    with torch.inference_mode():
        hidden = graphs.run(torch.tensor([11, 12, 13]), positions, meta)
        expected = runner.model(torch.tensor([11, 12, 13]), positions, meta)
    assert hidden.shape[0] == 3
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-5)
    written = set(meta.slot_mapping.tolist())
    for before, after in zip(caches, runner.kv_caches):
        changed = (before != after).flatten(1, 2).flatten(2).any(-1).any(0)  # per slot
        slots = set(changed.nonzero().flatten().tolist())
        real = {s for s in slots if s // bs != core.num_blocks}
        assert real == written  # the real rows' slots, nothing else outside the scratch block
        assert slots - real  # the five padded rows wrote the scratch block
    assert graphs.seq_lens[3:].tolist() == [1] * 5
    assert graphs.block_tables[3:, 0].tolist() == [core.num_blocks] * 5


def test_flash_backend_sends_a_static_batch_to_the_triton_kernel(monkeypatch):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernel takes CPU tensors only in Triton's interpreter")
    from inferd.attention.backends import flash as flash_module
    from inferd.attention.backends.triton_attn import paged_decode_attention

    def never(*a, **kw):
        raise AssertionError("a captured batch's host lists are stale: no varlen call")
    monkeypatch.setattr(flash_module, "flash_attn_varlen_func", never)
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 9, 16, 2, 32, generator=g).to(torch.bfloat16)
    graphs_meta = DecodeGraphs(torch.nn.Identity(), torch.device("cpu"), [4], 64, 16, 8,
                               capture=False)._meta(4)
    graphs_meta.seq_lens_t.copy_(torch.tensor([3, 17, 40, 1], dtype=torch.int32))
    graphs_meta.block_tables[:, :3].copy_(torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 0],
                                                        [8, 8, 8]], dtype=torch.int32))
    graphs_meta.slot_mapping.copy_(torch.tensor([2, 4 * 16, 7 * 16 + 7, 8 * 16]))
    q, k, v = (torch.randn(4, n, 32, generator=g).to(torch.bfloat16) for n in (4, 2, 2))
    out = flash_module.FlashAttentionBackend().forward(q, k, v, cache, graphs_meta, scale=0.2)
    ref = paged_decode_attention(q, cache, graphs_meta.block_tables, graphs_meta.seq_lens_t, 0.2)
    assert torch.equal(out, ref)
    assert torch.equal(cache.flatten(1, 2)[0][graphs_meta.slot_mapping], k)
