"""Quantized linear layers (`inferd.models.layers.quant`) against float references.

Kernels are checked against x @ W_deq.T, where W_deq is the weight the layer really holds
(the quantizer's output): int4 is weight-only, so only float summation order differs (atol
1e-4); int8 also quantizes activations to 8 bits per call, so its error is bounded by one
activation step per input, |dy[m, n]| <= step_m * sum_k |W_deq[n, k]|, step_m = 2 * max|x_m| / 255.

Whole model: a tiny random Llama quantized vs the same model in fp32. Quantization changes
the numerics, so the criterion is closeness, not equality: teacher-forced top-1 agreement on
>= 90% of positions with small mean KL, and greedy decoding that follows fp32 for its first
tokens (int8; int4 only has to keep its flips to near-ties). Thresholds are set with margin
over measured values, listed beside the test.
"""
from __future__ import annotations

import pytest
import torch
from paged_runner import PagedRunner
from transformers import LlamaConfig

from inferd.models.layers.linear import Embedding, Linear, MergedLinear
from inferd.models.layers.quant import (INT8_QMAX, Int4Linear, Int8Linear, QuantLinear,
                                        quantize_int4_groupwise, quantize_int8_per_channel,
                                        quantize_model)
from inferd.models.llama import LlamaForCausalLM

torch.set_num_threads(1)  # tiny shapes; avoids OpenMP oversubscription on shared machines


def int8_reference(w: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_int8_per_channel(w)
    return q.float() * scale[:, None]


def int4_reference(w: torch.Tensor, group: int = 32) -> torch.Tensor:
    q, scale, zero = quantize_int4_groupwise(w, group)
    n, k = w.shape
    return ((q.view(n, k // group, group).float() - 8) * scale[..., None]
            + zero[..., None]).view(n, k)


def int8_bound(x: torch.Tensor, w_deq: torch.Tensor) -> torch.Tensor:
    step = 2 * x.abs().amax(-1, keepdim=True) / 255
    return step * w_deq.abs().sum(1) + 1e-5


# --- quantizers ---------------------------------------------------------------------------------

def test_int8_quantizer_is_symmetric_7bit_per_channel():
    w = torch.randn(40, 96) * torch.logspace(-3, 0, 40)[:, None]  # rows of very different scale
    q, scale = quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and q.abs().max() == INT8_QMAX
    assert (q.abs().amax(1) == INT8_QMAX).all()  # every row uses its full range
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_int4_quantizer_error_and_exact_round_trip_of_q4_grids():
    w = torch.randn(16, 128)
    q, scale, zero = quantize_int4_groupwise(w)
    assert q.max() <= 15 and q.dtype == torch.uint8
    err = (int4_reference(w) - w).view(16, 4, 32).abs()
    assert (err <= scale[..., None] / 2 + 1e-6).all()
    # A GGUF Q4_1-style weight (per group: min + d * q, q in 0..15, both ends used) is
    # representable exactly: re-quantizing it loses nothing.
    d, m = torch.rand(16, 4, 1) * 0.1 + 0.01, torch.randn(16, 4, 1)
    levels = torch.randint(0, 16, (16, 4, 32))
    levels[..., 0], levels[..., 1] = 0, 15
    grid = (m + d * levels).view(16, 128)
    torch.testing.assert_close(int4_reference(grid), grid, atol=1e-6, rtol=0)


# --- layers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 7])  # M = 1 and the row-scaled multi-row path
def test_int8_linear_within_activation_quantization_bound(m):
    torch.manual_seed(0)
    w, b = torch.randn(48, 160) * 0.05, torch.randn(48)
    layer = Int8Linear(w, b)
    x = torch.randn(m, 160) * torch.logspace(-2, 2, m)[:, None]  # rows 10^4 apart in scale
    w_deq = int8_reference(w)
    ref = x @ w_deq.T + b
    err = (layer(x) - ref).abs()
    assert (err <= int8_bound(x, w_deq)).all(), err.max()


def test_int8_linear_does_not_saturate_on_extreme_inputs():
    # fbgemm's AVX2 kernel sums pairs of u8*s8 products in int16: with full 8-bit weights this
    # input would clip to about half the true value.
    w = torch.ones(8, 64)
    x = torch.ones(1, 64)
    x[0, 0] = -1e-3  # forces zero point ~0, so activations quantize to 255
    layer = Int8Linear(w)
    torch.testing.assert_close(layer(x), x @ w.T, atol=float(int8_bound(x, w).max()), rtol=0)


def test_int8_linear_keeps_shape_dtype_and_merged_split():
    torch.manual_seed(1)
    merged = MergedLinear(64, [32, 16, 16], bias=True)
    with torch.no_grad():
        merged.weight.normal_(0, 0.1)
        merged.bias.normal_()
    q = QuantLinear.from_float(merged, "int8")
    x = torch.randn(2, 3, 64).bfloat16()
    y = q(x)
    assert y.shape == (2, 3, 64) and y.dtype == torch.bfloat16
    assert [t.shape[-1] for t in q.split(y)] == [32, 16, 16]
    with pytest.raises(TypeError):
        QuantLinear.from_float(Linear(64, 64), "int8").split(y)


@pytest.mark.parametrize("m", [1, 5])
def test_int4_linear_matches_dequantized_weight(m):
    torch.manual_seed(2)
    w, b = torch.randn(64, 96) * 0.05, torch.randn(64)
    layer = Int4Linear(w, b)
    x = torch.randn(m, 96)
    torch.testing.assert_close(layer(x), x @ int4_reference(w).T + b, atol=1e-4, rtol=1e-4)


def test_int4_rejects_in_features_not_multiple_of_group():
    with pytest.raises(ValueError, match="group size"):
        Int4Linear(torch.randn(16, 40))


# --- whole model --------------------------------------------------------------------------------

VOCAB = 1024


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:  # larger than HF's 0.02: peaked logits, few near-ties
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model.eval()


def greedy(model: torch.nn.Module, prompts: list[list[int]], n: int) -> list[list[int]]:
    """All prompts prefilled in one step, then decoded together (multi-row decode batches)."""
    runner = PagedRunner(model)
    logits = runner.step(list(enumerate(prompts)))
    out = [[int(lg[-1].argmax())] for lg in logits]
    for _ in range(n - 1):
        logits = runner.step([(i, [o[-1]]) for i, o in enumerate(out)])
        for o, lg in zip(out, logits):
            o.append(int(lg[-1].argmax()))
    return out


def prompts(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 14)]


# Thresholds hold with margin over seeds 0-3 (int8: top-1 97-98%, KL ~3e-4, flips only where
# fp32's top two were within 0.07 nats; int4: 67-84%, KL ~0.011, gaps up to 0.62 nats).
@pytest.mark.parametrize("mode, min_top1, max_kl, max_gap", [("int8", 0.9, 0.002, 0.2),
                                                             ("int4", 0.6, 0.03, 1.0)])
def test_quantized_tiny_llama_stays_close_to_fp32(mode, min_top1, max_kl, max_gap):
    fp32, quant = tiny_llama(), tiny_llama()
    assert quantize_model(quant, mode, min_numel=0) == 2 * 4 + 1  # qkv, o, gate_up, down; head
    # Lookups stay float: the tied embedding keeps its table, the head got its own copy.
    assert isinstance(quant.model.embed_tokens, Embedding)
    assert torch.equal(quant.model.embed_tokens.weight, fp32.model.embed_tokens.weight)
    # Teacher forcing: the fp32 model's own continuation, fed to both as one prefill each.
    seqs = [p + g for p, g in zip(prompts(), greedy(fp32, prompts(), 24))]
    ref = torch.cat(PagedRunner(fp32).step(list(enumerate(seqs)))).log_softmax(-1)
    got = torch.cat(PagedRunner(quant).step(list(enumerate(seqs)))).log_softmax(-1)
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean()
    kl = torch.nn.functional.kl_div(got, ref, log_target=True, reduction="batchmean")
    # Where the top-1 token differs, fp32 rated the two choices within max_gap nats.
    gap = (ref.max(-1).values - ref.gather(1, got.argmax(-1, keepdim=True))[:, 0]).max()
    assert top1 >= min_top1 and kl <= max_kl and gap <= max_gap, (float(top1), float(kl),
                                                                   float(gap))
    if mode == "int8":
        # Free-running greedy decode (batched decode steps) follows fp32's first tokens; int4's
        # near-ties make its sequences part within a few tokens on this random model.
        ours, theirs = greedy(quant, prompts(), 8), greedy(fp32, prompts(), 8)
        agree = [next((i for i, (a, b) in enumerate(zip(o, t)) if a != b), 8)
                 for o, t in zip(ours, theirs)]
        assert min(agree) >= 4 and sum(agree) >= 20, agree


def test_quantize_model_skips_small_layers_and_rejects_unknown_modes():
    model = tiny_llama()
    assert quantize_model(model, "int8") == 1  # only the 64x1024 LM head reaches the default size
    assert isinstance(model.lm_head, Int8Linear)
    assert isinstance(model.model.layers[0].mlp.down_proj, Linear)
    with pytest.raises(ValueError, match="int8"):
        quantize_model(tiny_llama(), "fp8")


def test_quantize_model_leaves_non_cpu_models_alone():
    # CUDA is not wired yet: any non-CPU model keeps its float layers (a meta model stands in).
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert quantize_model(model, "int8", min_numel=0) == 0
    assert type(model.lm_head) is Linear


def test_load_model_applies_quantization(tmp_path):
    from transformers import LlamaForCausalLM as HFLlama

    from inferd.models.loader import load_model
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=True)
    HFLlama(cfg).save_pretrained(tmp_path, safe_serialization=True)
    model = load_model(tmp_path, cfg, torch.float32, "cpu", quantization="int8")
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Int8Linear)  # 256 x 512: above the threshold
    assert isinstance(layer.mlp.gate_up_proj, Int8Linear) and isinstance(model.lm_head, Int8Linear)
