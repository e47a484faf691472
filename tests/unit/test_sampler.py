"""Sampler steps against plain per-row references written from the OpenAI / vLLM definitions."""
from __future__ import annotations

import math

import pytest
import torch

from inferd.sample import ops
from inferd.sample.metadata import SamplingMetadata
from inferd.sample.sampler import Sampler
from inferd.sampling_params import SamplingParams

V = 64
CPU = torch.device("cpu")


def build(params, outputs=None, prompts=None, generators=None, eos=None, vocab=V):
    n = len(params)
    return SamplingMetadata.build(
        params, prompts or [[1, 2, 3]] * n, outputs or [[] for _ in range(n)],
        generators or [None] * n, eos or [(0,)] * n, vocab, CPU)


def rand_logits(b: int, seed: int = 0, v: int = V) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def processed(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    return Sampler.process_logits(logits.clone(), meta)


# ---- plain per-row references -------------------------------------------------------------

def ref_penalties(row: torch.Tensor, prompt: list[int], output: list[int], rep: float,
                  freq: float, pres: float) -> torch.Tensor:
    row = row.clone()
    for tok in set(prompt) | set(output):
        row[tok] = row[tok] / rep if row[tok] > 0 else row[tok] * rep
    for tok in set(output):
        count = output.count(tok)
        row[tok] -= freq * count + pres
    return row


def ref_min_p(row: torch.Tensor, min_p: float) -> torch.Tensor:
    probs = row.softmax(-1)
    return torch.where(probs < min_p * probs.max(), -math.inf, row)


def ref_top_k(row: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0:
        return row
    kth = sorted(row.tolist(), reverse=True)[k - 1]
    return torch.where(row < kth, -math.inf, row)


def ref_top_p(row: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens, in order, until their mass reaches p."""
    if p >= 1.0:
        return row
    probs = row.softmax(-1).tolist()
    keep, mass = set(), 0.0
    for tok in sorted(range(len(probs)), key=lambda t: -probs[t]):
        if mass >= p:
            break
        keep.add(tok)
        mass += probs[tok]
    return torch.tensor([x if t in keep else -math.inf for t, x in enumerate(row.tolist())])


# ---- processing steps ---------------------------------------------------------------------

def test_penalties_match_reference():
    params = [SamplingParams(repetition_penalty=1.3, temperature=0.0),
              SamplingParams(frequency_penalty=0.7, presence_penalty=-0.4),
              SamplingParams(repetition_penalty=0.8, frequency_penalty=-1.5, presence_penalty=2.0),
              SamplingParams()]
    prompts = [[1, 2, 5, 5], [3], [7, 8, 9], [1]]
    outputs = [[5, 6, 6], [3, 3, 3, 4], [8, 10, 10, 11], [1, 1]]
    logits = rand_logits(4)
    meta = build(params, outputs, prompts)
    got = processed(logits, meta)
    for i, p in enumerate(params):
        want = ref_penalties(logits[i], prompts[i], outputs[i], p.repetition_penalty,
                             p.frequency_penalty, p.presence_penalty)
        torch.testing.assert_close(got[i], want)


def test_logit_bias_allowed_ids_and_structured_mask():
    params = [SamplingParams(logit_bias={3: 5.0, 10: -100.0}),
              SamplingParams(allowed_token_ids=[4, 7, 9], logit_bias={7: 2.5}),
              SamplingParams()]
    logits = rand_logits(3)
    meta = build(params)
    structured = torch.ones(3, V, dtype=torch.bool)
    structured[2, 20:] = False
    meta.allowed_token_mask = structured
    got = processed(logits, meta)
    want = logits.clone()
    want[0, 3] += 5.0
    want[0, 10] -= 100.0
    keep = torch.full((V,), -math.inf)
    keep[[4, 7, 9]] = logits[1, [4, 7, 9]]
    keep[7] += 2.5
    want[1] = keep
    want[2, 20:] = -math.inf
    torch.testing.assert_close(got, want)


def test_bad_words_ban_last_token_after_matching_prefix():
    words = [[5], [7, 8], [1, 2, 3], [9, 9]]
    params = [SamplingParams(bad_words_token_ids=words) for _ in range(4)]
    outputs = [[], [7], [4, 1, 2], [9]]
    banned_want = [{5}, {5, 8}, {5, 3}, {5, 9}]
    logits = rand_logits(4)
    got = processed(logits, build(params, outputs))
    for i in range(4):
        banned = {t for t in range(V) if got[i, t] == -math.inf}
        assert banned == banned_want[i]


def test_min_tokens_bans_stop_tokens_until_reached():
    params = [SamplingParams(min_tokens=3, stop_token_ids=[11, 12]),
              SamplingParams(min_tokens=3, stop_token_ids=[11]),  # already has 3 outputs
              SamplingParams(min_tokens=2, ignore_eos=True, stop_token_ids=[13]),
              SamplingParams(stop_token_ids=[11])]
    outputs = [[1], [1, 2, 3], [], []]
    eos = [(0, 2), (0,), (0,), (0,)]
    got = processed(rand_logits(4), build(params, outputs, eos=eos))
    banned = [{t for t in range(V) if got[i, t] == -math.inf} for i in range(4)]
    assert banned == [{0, 2, 11, 12}, set(), {13}, set()]


def test_temperature_min_p_top_k_top_p_match_reference():
    params = [SamplingParams(temperature=0.7, min_p=0.05),
              SamplingParams(temperature=1.3, top_k=5),
              SamplingParams(temperature=0.9, top_p=0.6),
              SamplingParams(temperature=1.0, top_k=10, top_p=0.8, min_p=0.01),
              SamplingParams(temperature=0.5)]
    logits = rand_logits(5, seed=3)
    for use_top_p in (True, False):  # with and without top_p: the sort path and the topk path
        ps = params if use_top_p else [p for p in params if p.top_p == 1.0]
        lg = logits[: len(ps)] if use_top_p else logits[[0, 1, 4]]
        meta = build(ps)
        got = lg.clone()
        ops.apply_temperature(got, meta.temperature)
        if meta.min_p is not None:
            ops.apply_min_p(got, meta.min_p)
        ops.apply_top_k_top_p(got, meta.top_k, meta.max_top_k, meta.top_p)
        for i, p in enumerate(ps):
            want = ref_top_p(ref_top_k(ref_min_p(lg[i] / p.temperature, p.min_p), p.top_k), p.top_p)
            torch.testing.assert_close(got[i], want)


# ---- sampling ----------------------------------------------------------------------------

def test_greedy_is_argmax_and_fast_path_leaves_logits_alone():
    logits = rand_logits(6)
    meta = build([SamplingParams(temperature=0.0)] * 6)
    assert meta.temperature is None and not meta.any_penalties and meta.logit_bias is None
    out = Sampler()(logits.clone(), meta)
    assert out.sampled_token_ids.tolist() == logits.argmax(-1).tolist()
    assert out.logprobs is None and out.sampled_ranks is None


def test_greedy_rows_in_mixed_batch_use_processed_argmax():
    logits = rand_logits(4)
    params = [SamplingParams(temperature=0.0, logit_bias={17: 50.0}),
              SamplingParams(temperature=1.0, top_k=3),
              SamplingParams(temperature=0.0, repetition_penalty=2.0),
              SamplingParams(temperature=0.8)]
    outputs = [[], [], [int(logits[2].argmax())], []]
    meta = build(params, outputs, prompts=[[1]] * 4)
    out = Sampler()(logits.clone(), meta).sampled_token_ids
    want2 = ref_penalties(logits[2], [1], outputs[2], 2.0, 0.0, 0.0).argmax()
    assert out[0] == 17 and out[2] == want2
    assert out[1] in logits[1].topk(3).indices.tolist()


def test_seeded_row_same_alone_and_batched():
    steps = [rand_logits(1, seed=100 + s)[0] for s in range(8)]
    params = SamplingParams(temperature=1.5, top_p=0.95, seed=7)

    def run(batched: bool) -> list[int]:
        gen = torch.Generator().manual_seed(7)
        toks = []
        for s, row in enumerate(steps):
            if batched:
                others = rand_logits(3, seed=s)
                lg = torch.cat([others[:1], row[None], others[1:]])
                ps = [SamplingParams(temperature=0.9), params, SamplingParams(temperature=0.0),
                      SamplingParams(temperature=1.2, seed=1)]
                gens = [None, gen, None, torch.Generator().manual_seed(s)]
                out = Sampler()(lg, build(ps, generators=gens)).sampled_token_ids[1]
            else:
                out = Sampler()(row[None].clone(), build([params], generators=[gen])).sampled_token_ids[0]
            toks.append(int(out))
        return toks

    alone = run(False)
    assert alone == run(False)
    assert alone == run(True)
    assert len(set(alone)) > 1  # really random, not collapsed to argmax


def test_sampling_frequencies_follow_tempered_distribution():
    # 4 tokens with fixed logits; temperature 2 flattens them. 20000 draws in one batch.
    base = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n, temp = 20000, 2.0
    torch.manual_seed(1234)
    meta = build([SamplingParams(temperature=temp)] * n, vocab=4, eos=[()] * n)
    toks = Sampler()(base.repeat(n, 1), meta).sampled_token_ids
    freq = torch.bincount(toks, minlength=4).float() / n
    want = (base / temp).softmax(-1)
    # 4 sigma of a binomial proportion at n=20000 is < 0.015.
    torch.testing.assert_close(freq, want, atol=0.015, rtol=0)


@pytest.mark.parametrize("top_k", [-1, 5])
def test_top_p_below_float32_keeps_the_top_token(top_k):
    """1e-300 passes the (0, 1] check but is 0 in float32: the most likely token must still
    stay (it did not: every token was masked and the row sampled garbage)."""
    logits = rand_logits(4, seed=11)
    meta = build([SamplingParams(temperature=1.0, top_p=1e-300, top_k=top_k)] * 4)
    k = torch.full((4,), V if top_k < 0 else top_k)
    out = ops.apply_top_k_top_p(logits.clone(), None if top_k < 0 else k, 5, meta.top_p)
    assert torch.isfinite(out).sum(-1).tolist() == [1] * 4
    assert out.argmax(-1).tolist() == logits.argmax(-1).tolist()
    assert Sampler()(logits.clone(), meta).sampled_token_ids.tolist() == logits.argmax(-1).tolist()


def test_top_k_restricts_samples():
    torch.manual_seed(0)
    logits = rand_logits(1, seed=9).repeat(2000, 1)
    meta = build([SamplingParams(temperature=2.0, top_k=3)] * 2000)
    toks = set(Sampler()(logits.clone(), meta).sampled_token_ids.tolist())
    assert toks == set(logits[0].topk(3).indices.tolist())


def test_logprobs_and_ranks_are_of_raw_logits():
    logits = rand_logits(3, seed=5)
    params = [SamplingParams(temperature=0.0, logprobs=2, logit_bias={40: 100.0}),
              SamplingParams(temperature=0.0, logprobs=0),
              SamplingParams(temperature=0.7, logprobs=4)]
    out = Sampler()(logits.clone(), build(params))
    raw = logits.log_softmax(-1)
    assert out.logprob_token_ids.shape == (3, 5) and out.logprobs.dtype == torch.float32
    assert int(out.sampled_token_ids[0]) == 40
    for i in range(3):
        tok = int(out.sampled_token_ids[i])
        order = raw[i].argsort(descending=True).tolist()
        assert out.logprob_token_ids[i, 0] == tok
        assert out.logprob_token_ids[i, 1:].tolist() == order[:4]
        torch.testing.assert_close(out.logprobs[i], raw[i, out.logprob_token_ids[i]])
        assert int(out.sampled_ranks[i]) == order.index(tok) + 1
    assert int(out.sampled_ranks[1]) == 1


def test_logprobs_whole_vocab():
    logits = rand_logits(2)
    out = Sampler()(logits.clone(), build([SamplingParams(temperature=0.0, logprobs=-1),
                                           SamplingParams(temperature=0.0)]))
    assert out.logprobs.shape == (2, V + 1)
    torch.testing.assert_close(out.logprobs[:, 1:].exp().sum(-1), torch.ones(2))


def test_compute_topk_logprobs_for_given_targets():
    logits = rand_logits(4, seed=11)
    targets = torch.tensor([3, 0, 63, 17])
    ids, lps, ranks = ops.compute_topk_logprobs(logits, targets, 2)
    raw = logits.log_softmax(-1)
    assert ids[:, 0].tolist() == targets.tolist()
    assert ids[:, 1:].tolist() == raw.topk(2).indices.tolist()
    torch.testing.assert_close(lps, raw.gather(1, ids))
    want_ranks = [raw[i].argsort(descending=True).tolist().index(t) + 1 for i, t in enumerate(targets.tolist())]
    assert ranks.tolist() == want_ranks


def test_top_k_only_batch_uses_partial_topk_bound():
    meta = build([SamplingParams(top_k=5), SamplingParams(), SamplingParams(top_k=V + 10)])
    assert meta.max_top_k == 5 and meta.top_k.tolist() == [5, V, V] and meta.top_p is None


def test_out_of_vocab_ids_are_dropped_not_crashing():
    params = [SamplingParams(logit_bias={V + 5: 1.0}, bad_words_token_ids=[[V + 1]])]
    meta = build(params)
    assert meta.logit_bias is None and meta.bad_words_banned is None


@pytest.mark.parametrize("bad", [dict(prompts=[[1], [2]]), dict(generators=[None, None])])
def test_build_rejects_mismatched_lists(bad):
    with pytest.raises(ValueError, match="differ in length"):
        SamplingMetadata.build([SamplingParams()], bad.get("prompts", [[1]]), [[]],
                               bad.get("generators", [None]), [()], V, CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_without_host_syncs():
    cuda = torch.device("cuda")
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.2, logprobs=3),
              SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.02, seed=3,
                             bad_words_token_ids=[[2, 3]], logit_bias={4: 1.0}),
              SamplingParams(temperature=1.1, allowed_token_ids=[1, 5, 9], min_tokens=2,
                             stop_token_ids=[5], frequency_penalty=0.5)]
    prompts, outputs = [[1, 2], [3], [4, 4]], [[7], [2], [9]]
    logits = rand_logits(3)

    def meta_on(device, gen_seed):
        gens = [None, torch.Generator(device=device).manual_seed(gen_seed), None]
        return SamplingMetadata.build(params, prompts, outputs, gens, [(0,)] * 3, V, device)

    cpu_proc = processed(logits, meta_on(CPU, 3))
    meta = meta_on(cuda, 3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu_proc = Sampler.process_logits(logits.to(cuda), meta)
        out = Sampler()(logits.to(cuda), meta)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(gpu_proc.cpu(), cpu_proc)
    assert int(out.sampled_token_ids[0]) == int(cpu_proc[0].argmax())
    assert int(out.sampled_token_ids[2]) in (1, 9)
    assert int(out.sampled_ranks[0]) >= 1
    # Same seed on a fresh generator -> same token on the seeded row.
    again = Sampler()(logits.to(cuda), meta_on(cuda, 3)).sampled_token_ids
    assert int(again[1]) == int(out.sampled_token_ids[1])
