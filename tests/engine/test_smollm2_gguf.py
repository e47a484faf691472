"""The default model end to end: SmolLM2-135M-Instruct from its Q4_1 GGUF, chat answers
equal to transformers' greedy answers on the same GGUF (both dequantized to fp32)."""
from __future__ import annotations

import pytest
import torch

from inferd import LLM, SamplingParams

QUESTIONS = ["What is the capital of France?", "Name three primary colors.",
             "Write one sentence about the sea."]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    return LLM(str(smollm2_gguf), dtype="float32", kv_cache_memory="256MiB", max_model_len=1024)


@pytest.fixture(scope="module")
def answers(llm):
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    outs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], sp)
    return [o.outputs[0] for o in outs]


def test_capital_of_france_mentions_paris(answers):
    assert "Paris" in answers[0].text


def test_chat_answers_equal_transformers(llm, answers, smollm2_gguf):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                               dtype=torch.float32).eval()
    tok = llm.tokenizer
    for q, ours in zip(QUESTIONS, answers):
        text = llm.render_chat([{"role": "user", "content": q}], add_generation_prompt=True)
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=MAX_TOKENS, pad_token_id=tok.eos_token_id,
                               eos_token_id=tok.eos_token_id)
        theirs = out[0, ids.shape[1]:].tolist()
        if theirs and theirs[-1] == tok.eos_token_id:
            theirs = theirs[:-1]  # we report EOS as the finish reason, not as a token of text
        got = [t for t in ours.token_ids if t != tok.eos_token_id]
        assert got == theirs, (q, tok.decode(got), tok.decode(theirs))


# --- the default serving configuration: bf16 with inferd's CPU kernels ----------------------
# Greedy bf16 tokens cannot equal fp32 ones for long (a near-tie flips), so each token the bf16
# engine picks is scored under transformers' fp32 forward on the same GGUF instead: it must be
# the reference's argmax or within BF16_MARGIN nats of it. A broken kernel (attention, the
# 4-bit decode matmul, norms) picks tokens the reference finds unlikely within a few steps.
BF16_MARGIN = 1.0
BF16_TOKENS = 48


@pytest.fixture(scope="module")
def llm_bf16(smollm2_gguf):
    return LLM(str(smollm2_gguf), dtype="bfloat16", kv_cache_memory="256MiB", max_model_len=1024)


def test_bf16_decode_path_uses_4bit_blocks_when_the_cpu_has_the_kernel(llm_bf16):
    from inferd.kernels import cpu as kernels
    lib = kernels.load()
    model = llm_bf16.engine.core.runner.model
    n = sum(1 for m in model.modules() if getattr(m, "_q4", None) is not None)
    if lib is None or not lib.inferd_has_gemv_bf16():
        assert n == 0
    else:  # q/k/v, o, gate/up and down of every layer are Q4_1 in this file
        assert n == 4 * model.config.num_hidden_layers
        assert model.lm_head._q8 is not None  # the tied head: the Q8_0 embedding table


@pytest.mark.parametrize("batch", [1, 3, 6])  # skinny 4-bit kernel (1-3 rows with AMX, 1 without), then gemm_q4
def test_bf16_greedy_tokens_are_near_argmax_under_fp32_reference(llm_bf16, smollm2_gguf, batch):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                               dtype=torch.float32).eval()
    sp = SamplingParams(max_tokens=BF16_TOKENS, temperature=0.0, ignore_eos=True)
    questions = (QUESTIONS * 2)[:batch]  # 6: each question twice (shared prefix blocks too)
    convs = [[{"role": "user", "content": q}] for q in questions]
    outs = llm_bf16.chat(convs, sp)
    if batch == 1:
        assert "Paris" in outs[0].outputs[0].text
    tok = llm_bf16.tokenizer
    for conv, out in zip(convs, outs):
        text = llm_bf16.render_chat(conv, add_generation_prompt=True)
        prompt = tok.encode(text, add_special_tokens=False)
        ours = list(out.outputs[0].token_ids)
        assert len(ours) == BF16_TOKENS
        with torch.no_grad():
            logits = ref(torch.tensor([prompt + ours])).logits[0, len(prompt) - 1:-1].float()
        lp = logits.log_softmax(-1)
        chosen = lp[torch.arange(len(ours)), torch.tensor(ours)]
        gap = lp.max(-1).values - chosen
        assert gap.max().item() <= BF16_MARGIN, (tok.decode(ours), gap.tolist())


@pytest.mark.parametrize("batch", [1, 5, 12])
def test_fused_decode_gives_the_layer_by_layer_bits(llm_bf16, batch):
    """All layers in one kernel call (fused_decode.py) against the module-by-module path on the
    same engine: the same kernels in the same order, so the same tokens and logprobs exactly."""
    model = llm_bf16.engine.core.runner.model.model
    fused = model._fused_decode()
    from inferd.kernels import cpu as kernels
    lib = kernels.load()
    if lib is None or not lib.inferd_has_gemv_bf16():
        assert fused is None
        pytest.skip("no 4-bit kernels on this CPU: nothing to fuse")
    assert fused is not None
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
    convs = [[{"role": "user", "content": q}] for q in (QUESTIONS * 4)[:batch]]
    calls = []
    real_run = fused.run

    def counting_run(*a, **kw):
        calls.append(1)
        return real_run(*a, **kw)

    # Both runs must prefill the same rows: a prompt's first run fills the prefix cache and
    # the next recomputes only its last partial block, and a prefill of a different number of
    # rows may take a different matmul kernel (oneDNN against gemm_q4) and round differently.
    llm_bf16.chat(convs, SamplingParams(max_tokens=1))
    fused.run = counting_run
    try:
        with_fused = llm_bf16.chat(convs, sp)
        assert len(calls) >= 23  # every decode step after the first token went through it
        model._fused = None
        layer_by_layer = llm_bf16.chat(convs, sp)
    finally:
        fused.run = real_run
        model._fused = fused
    for a, b in zip(with_fused, layer_by_layer):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        lp_a = [{t: lp.logprob for t, lp in d.items()} for d in a.outputs[0].logprobs]
        lp_b = [{t: lp.logprob for t, lp in d.items()} for d in b.outputs[0].logprobs]
        assert lp_a == lp_b
