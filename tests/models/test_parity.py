"""Our models vs transformers on the same tiny random checkpoints (float32).

(a) prompts of different lengths as ONE flat batch over a paged cache == HF per sequence;
(b) greedy decoding with staggered arrivals (steps mix batched decodes with prefills) == HF
    `generate` token for token, top-5 logprobs close;
(c) chunked prefill (chunks of 5) == one-shot prefill.
Tolerances (fp32): logits atol 1e-4 vs HF (different op order and fused projections give
~1e-6 differences); chunked vs whole prefill atol 1e-5 (same ops, different batching).
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from inferd.models.loader import load_model

LOGIT_ATOL = 1e-4
PROMPT_LENS = [5, 11, 17, 23]


def _ours(tiny):
    return load_model(tiny.path, AutoConfig.from_pretrained(tiny.path), torch.float32, "cpu")


def _prompts(vocab: int, lens: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def test_flat_batch_prefill_matches_hf(tiny_decoder, paged_runner):
    tiny = tiny_decoder
    runner = paged_runner(_ours(tiny))
    prompts = _prompts(tiny.vocab_size, PROMPT_LENS)
    logits = runner.step(list(enumerate(prompts)))
    with torch.no_grad():
        for prompt, ours in zip(prompts, logits):
            ref = tiny.hf_model(torch.tensor([prompt])).logits[0].float()
            # every position, not just the last: all of them went through the paged cache path
            torch.testing.assert_close(ours, ref, atol=LOGIT_ATOL, rtol=0)


def test_greedy_decode_matches_hf_generate(tiny_decoder, paged_runner):
    tiny = tiny_decoder
    runner = paged_runner(_ours(tiny))
    prompts = _prompts(tiny.vocab_size, [6, 9, 13], seed=1)
    new_tokens = 32
    outputs: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    step_logits: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(prompts))}
    # sequence i arrives at step 2 * i, so steps mix batched decodes with a prefill
    for step in range(2 * (len(prompts) - 1) + new_tokens):
        decodes = [(i, [outputs[i][-1]]) for i in outputs
                   if outputs[i] and len(outputs[i]) < new_tokens]
        prefills = [(i, prompts[i]) for i in outputs if step == 2 * i]
        if not decodes and not prefills:
            continue
        chunks = decodes + prefills
        for (sid, _), logits in zip(chunks, runner.step(chunks)):
            step_logits[sid].append(logits[-1])
            outputs[sid].append(int(logits[-1].argmax()))
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = tiny.hf_model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens, do_sample=False,
                                         output_logits=True, return_dict_in_generate=True)
        assert outputs[i] == ref.sequences[0, len(prompt):].tolist(), f"sequence {i}"
        for ours, theirs in zip(step_logits[i], ref.logits):
            ours_lp = torch.log_softmax(ours, -1)
            ref_lp = torch.log_softmax(theirs[0].float(), -1)
            top = ref_lp.topk(5)
            torch.testing.assert_close(ours_lp[top.indices], top.values, atol=LOGIT_ATOL, rtol=0)
            assert ours_lp.topk(5).indices.tolist() == top.indices.tolist()


def test_chunked_prefill_matches_whole(tiny_decoder, paged_runner):
    tiny = tiny_decoder
    model = _ours(tiny)
    prompt = _prompts(tiny.vocab_size, [23], seed=2)[0]
    whole = paged_runner(model).step([(0, prompt)])[0]
    chunked_runner = paged_runner(model)  # rebinds fresh caches
    # a decoding neighbour (a 1-token prompt) shares every chunk's step
    chunked_runner.step([(1, prompt[:3])])
    pieces = []
    for start in range(0, len(prompt), 5):
        chunk = prompt[start:start + 5]
        pieces.append(chunked_runner.step([(1, [7]), (0, chunk)])[1])
    torch.testing.assert_close(torch.cat(pieces), whole, atol=1e-5, rtol=0)


ROPE_CASES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope_frequencies_match_hf(case):
    """Real-size head dim and context, where the scaled bands differ from the tiny models'."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from inferd.models.layers.rotary import compute_inv_freq, rope_parameters

    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                         rope_parameters={**ROPE_CASES[case], "rope_theta": 500000.0})
    ref_freq, ref_scale = ROPE_INIT_FUNCTIONS[case](config, "cpu")
    freq, scale = compute_inv_freq(128, rope_parameters(config), config.max_position_embeddings)
    torch.testing.assert_close(freq, ref_freq.float(), atol=0, rtol=1e-6)
    assert scale == pytest.approx(ref_scale)


def test_rope_parameters_from_older_config_fields():
    """transformers 4.x configs: rope_theta + rope_scaling ("type" or "rope_type"), and Gemma 3's
    rope_local_base_freq for its sliding layers."""
    from types import SimpleNamespace

    from inferd.models.layers.rotary import compute_inv_freq, rope_parameters

    old = SimpleNamespace(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 8.0},
                          rope_local_base_freq=10000.0)
    assert rope_parameters(old) == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert rope_parameters(old, "full_attention")["rope_theta"] == 1e6
    assert rope_parameters(old, "sliding_attention") == {"rope_type": "default",
                                                         "rope_theta": 10000.0}
    assert rope_parameters(SimpleNamespace(rope_theta=5e5, rope_scaling=None)) == {
        "rope_type": "default", "rope_theta": 5e5}
    with pytest.raises(ValueError, match="dynamic"):
        compute_inv_freq(64, {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, 2048)
