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
