"""Engine-level invariance: the same greedy tokens however requests are batched, chunked,
cached or preempted; seeded sampling independent of the batch; parity with transformers."""
from __future__ import annotations

import pytest
import torch

from inferd import LLM, SamplingParams

N_TOKENS = 32


def prompts_of(tokenizer) -> list[list[int]]:
    texts = ["Hello", "The capital of France is", "Once upon a time, in a land far away, there lived",
             "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23"]
    return [tokenizer.encode(t) for t in texts]


def greedy(max_tokens: int = N_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def run(llm: LLM, prompts: list[list[int]], sp: SamplingParams) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="64MiB")


@pytest.fixture(scope="module")
def prompts(llm):
    return prompts_of(llm.tokenizer)


@pytest.fixture(scope="module")
def alone(llm, prompts):
    return [run(llm, [p], greedy())[0] for p in prompts]


def test_greedy_matches_transformers(tiny_llama_dir, prompts, alone):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    for p, ours in zip(prompts, alone):
        ids = torch.tensor([p])
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=N_TOKENS, min_new_tokens=N_TOKENS, pad_token_id=0)
        assert ours == out[0, len(p):].tolist()


def test_batched_equals_alone(llm, prompts, alone):
    assert run(llm, prompts, greedy()) == alone


def test_batch_of_32_with_requests_joining_mid_flight(llm, prompts, alone):
    eng = llm.engine
    results = {}
    for i in range(32):
        eng.add_request(f"join-{i}", prompts[i % len(prompts)], greedy())
        # A few steps between arrivals: requests join while others decode.
        for _ in range(i % 3):
            for out in eng.step():
                results[out.request_id] = out
    while eng.has_unfinished():
        for out in eng.step():
            results[out.request_id] = out
    for i in range(32):
        assert results[f"join-{i}"].outputs[0].token_ids == alone[i % len(prompts)]
    assert eng.core.kv.num_held_blocks() == 0


def test_prefix_caching_on_and_off(tiny_llama_dir, prompts, alone, llm):
    # Second run of the same prompts hits the prefix cache.
    again = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy())
    assert [o.outputs[0].token_ids for o in again] == alone
    assert any(o.num_cached_tokens > 0 for o in again)
    off = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="64MiB", enable_prefix_caching=False)
    outs = off.generate([{"prompt_token_ids": p} for p in prompts], greedy())
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert all(o.num_cached_tokens == 0 for o in outs)


def test_chunked_prefill_tiny_budget(tiny_llama_dir, prompts, alone):
    small = LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory="64MiB", max_num_batched_tokens=16)
    assert run(small, prompts, greedy()) == alone


def test_preemption_with_tiny_pool(tiny_llama_dir, prompts, alone):
    # 12 blocks x 16 tokens = 192 slots; the four sequences need ~211 together.
    tiny = LLM(str(tiny_llama_dir), dtype="float32", num_gpu_blocks_override=12, max_model_len=128)
    assert run(tiny, prompts, greedy()) == alone
    assert tiny.engine.core.kv.num_held_blocks() == 0


def test_seeded_sampling_alone_vs_batch(llm, prompts):
    sp = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = run(llm, [prompts[1]], sp)[0]
    noisy = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": prompts[0]}, {"prompt_token_ids": prompts[1]},
                         {"prompt_token_ids": prompts[2]}], [noisy, sp, noisy])
    assert outs[1].outputs[0].token_ids == alone
    again = run(llm, [prompts[1]], sp)[0]
    assert again == alone


def test_n_samples_share_prompt_blocks(llm, prompts):
    sp = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompts[2] * 3}], sp)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert llm.engine.core.kv.num_held_blocks() == 0


def test_logprobs_match_transformers(tiny_llama_dir, llm, prompts):
    """Top-5 logprobs of the first generated token vs transformers' log_softmax; fp32, atol 1e-4."""
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    for p in prompts:
        out = llm.generate([{"prompt_token_ids": p}], greedy(max_tokens=1, logprobs=5))[0].outputs[0]
        with torch.no_grad():
            lp = torch.log_softmax(ref(torch.tensor([p])).logits[0, -1].float(), -1)
        top = torch.topk(lp, 5)
        got = out.logprobs[0]
        for tid, val in zip(top.indices.tolist(), top.values.tolist()):
            assert tid in got and abs(got[tid].logprob - val) < 1e-4


def test_stop_strings_and_max_tokens(llm, prompts, alone):
    text = llm.tokenizer.decode(alone[2])
    stop = text[5:9]
    if not stop.strip():
        pytest.skip("degenerate random text")
    out = llm.generate([{"prompt_token_ids": prompts[2]}], greedy(stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert stop not in out.text and text.startswith(out.text)
    out = llm.generate([{"prompt_token_ids": prompts[2]}], greedy(max_tokens=3))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3
