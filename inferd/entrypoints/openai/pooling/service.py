"""Pooling requests: validate -> tokenize -> one engine request per input, all at once -> shape.

Every input becomes its own `engine.encode` call, awaited together so the engine batches them
into as few forward passes as its token budget allows. If one fails (or the client goes away),
the others are cancelled, which aborts them in the engine.

Which routes a model serves follows its tasks (`engine.supported_tasks`):
- embedding models ("embed", "score"): /v1/embeddings, /pooling, and /score + /rerank by the
  cosine of two embeddings (bi-encoder);
- classifiers ("classify"): /classify, /pooling; one-label classifiers also have "score":
  /score + /rerank run each (query, document) pair through the model (cross-encoder).
Any other route answers 501 naming what the model does support.
"""
from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass
from typing import Any, Awaitable, Sequence, TypeVar

import torch

from inferd.entrypoints.openai.chat_template import render_chat, select_template, special_tokens_of
from inferd.entrypoints.openai.common import engine_request_id, now
from inferd.entrypoints.openai.errors import BadRequest, NotImplementedAPI
from inferd.entrypoints.openai.pooling import schemas as S
from inferd.entrypoints.openai.state import ServerState
from inferd.sampling_params import PoolingParams

MAX_INPUTS = 2048  # inputs (or score pairs) per request, as OpenAI's embeddings API
INLINE_TOKENIZE_CHARS = 8192  # above this, tokenize off the event loop
T = TypeVar("T")

API_TASKS = {"Embeddings": "embed", "Classification": "classify", "Score": "score",
             "Rerank": "score"}


@dataclass
class Prompt:
    """One engine input: token ids, and segment ids for BERT-style pairs."""

    token_ids: list[int]
    token_type_ids: list[int] | None = None


def require_task(state: ServerState, api: str) -> None:
    tasks = state.supported_tasks
    if API_TASKS[api] not in tasks:
        raise NotImplementedAPI(f"The model does not support {api} API (it supports the tasks "
                                f"{', '.join(tasks)}).")


# ---------------------------------------------------------------------------------------------
# Tokenization and length checks
# ---------------------------------------------------------------------------------------------
def truncation_limit(req: S.PoolingFields, max_model_len: int) -> int | None:
    k = req.truncate_prompt_tokens
    if k is None:
        return None
    k = max_model_len if k == -1 else k
    if k > max_model_len:
        raise BadRequest(f"truncate_prompt_tokens value ({k}) is greater than max_model_len "
                         f"({max_model_len}). Please request a smaller truncation size.",
                         param="truncate_prompt_tokens")
    if k < 1:
        raise BadRequest("truncate_prompt_tokens must be -1 or at least 1", param="truncate_prompt_tokens")
    return k


_SIDED_TOKENIZERS: dict[tuple[int, str], Any] = {}


def tokenizer_for(state: ServerState, side: str | None) -> Any:
    """The served tokenizer, or a copy that truncates on the other side (copied once: the
    shared tokenizer is never mutated, so concurrent requests cannot see each other's side)."""
    tok = state.engine.tokenizer
    if side is None or side == tok.truncation_side:
        return tok
    key = (id(tok), side)
    if key not in _SIDED_TOKENIZERS:
        sided = copy.deepcopy(tok)
        sided.truncation_side = side
        _SIDED_TOKENIZERS[key] = sided
    return _SIDED_TOKENIZERS[key]


def check_length(n: int, state: ServerState, operation: str, truncate: int | None) -> None:
    limit = state.max_model_len if truncate is None else truncate
    if n > limit:
        if truncate is not None:  # the special tokens alone exceed the truncation size
            raise BadRequest(f"truncate_prompt_tokens ({truncate}) is smaller than the {n} tokens "
                             "the input keeps after truncation (its special tokens)",
                             param="truncate_prompt_tokens")
        raise BadRequest(f"This model's maximum context length is {state.max_model_len} tokens. "
                         f"However, you requested {n} tokens in the input for {operation}. "
                         "Please reduce the length of the input.", param="input")
    if n == 0:
        raise BadRequest("an input has no tokens", param="input")


async def _maybe_in_thread(size: int, fn: Any, *args: Any, **kwargs: Any) -> Any:
    if size > INLINE_TOKENIZE_CHARS:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def _as_items(value: S.Input) -> list[str] | list[list[int]]:
    """`input` as a list of texts or a list of token-id lists."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [list(value)]  # one prompt of token ids
    return list(value)


def render_messages(state: ServerState, req: S.ChatFields) -> str:
    config, tokenizer = state.config, state.engine.tokenizer
    template = select_template(config.chat_template, req.chat_template,
                               config.trust_request_chat_template, tokenizer)
    kwargs = {**config.default_chat_template_kwargs, **(req.chat_template_kwargs or {})}
    return render_chat(req.messages or [], template=template,
                       special_tokens=special_tokens_of(tokenizer),
                       add_generation_prompt=req.add_generation_prompt,
                       continue_final_message=req.continue_final_message,
                       content_format=config.chat_template_content_format, template_kwargs=kwargs)


async def tokenize_inputs(state: ServerState, req: S.InputRequest, operation: str) -> list[Prompt]:
    """`input` (texts or token ids) or `messages`, as checked prompts."""
    truncate = truncation_limit(req, state.max_model_len)
    if req.messages is not None:
        texts, add_special = [render_messages(state, req)], bool(req.add_special_tokens)
    else:
        items = _as_items(req.input)
        if not items:
            raise BadRequest("input must not be empty", param="input")
        if len(items) > MAX_INPUTS:
            raise BadRequest(f"input holds {len(items)} items; at most {MAX_INPUTS} are allowed",
                             param="input")
        if not isinstance(items[0], str):
            return [_checked_ids(state, ids, req, truncate, operation) for ids in items]
        if any(not t for t in items):
            raise BadRequest("input must not contain empty strings", param="input")
        texts, add_special = items, req.add_special_tokens is not False
    tok = tokenizer_for(state, req.truncation_side)
    enc = await _maybe_in_thread(sum(map(len, texts)), tok, texts, add_special_tokens=add_special,
                                 truncation=truncate is not None, max_length=truncate)
    prompts = [Prompt(ids) for ids in enc["input_ids"]]
    for p in prompts:
        check_length(len(p.token_ids), state, operation, truncate)
    return prompts


def _checked_ids(state: ServerState, ids: list[int], req: S.PoolingFields, truncate: int | None,
                 operation: str) -> Prompt:
    if not ids:
        raise BadRequest("input must not contain empty token lists", param="input")
    vocab = len(state.engine.tokenizer)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise BadRequest(f"Token id {bad} is out of vocabulary (size {vocab})", param="input")
    if truncate is not None and len(ids) > truncate:
        side = req.truncation_side or state.engine.tokenizer.truncation_side
        ids = ids[-truncate:] if side == "left" else ids[:truncate]
    check_length(len(ids), state, operation, None)
    return Prompt(list(ids))


async def tokenize_pairs(state: ServerState, pairs: list[tuple[str, str]], req: S.PoolingFields,
                         ) -> list[Prompt]:
    """(query, document) pairs joined the way the tokenizer joins sentence pairs
    ([CLS] q [SEP] d [SEP] with segment ids 0/1 for BERT; <s> q </s></s> d </s> for XLM-R)."""
    truncate = truncation_limit(req, state.max_model_len)
    tok = tokenizer_for(state, req.truncation_side)
    size = sum(len(q) + len(d) for q, d in pairs)
    enc = await _maybe_in_thread(size, tok, [q for q, _ in pairs], [d for _, d in pairs],
                                 add_special_tokens=req.add_special_tokens is not False,
                                 truncation=truncate is not None, max_length=truncate)
    types = enc.get("token_type_ids")
    prompts = []
    for i, ids in enumerate(enc["input_ids"]):
        check_length(len(ids), state, "score", truncate)
        tt = types[i] if types is not None and any(types[i]) else None
        prompts.append(Prompt(ids, tt))
    return prompts


# ---------------------------------------------------------------------------------------------
# Engine calls
# ---------------------------------------------------------------------------------------------
async def gather_all(aws: Sequence[Awaitable[T]]) -> list[T]:
    """Await all; on the first failure cancel the rest (aborting their engine requests)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()


async def encode_all(state: ServerState, prompts: list[Prompt], params: list[PoolingParams],
                     request_id: str) -> list[list[float]]:
    state.check_capacity(len(prompts), param="input")
    engine, base = state.engine, engine_request_id(request_id)
    outs = await gather_all([engine.encode(p.token_ids, pp, f"{base}-{i}")
                             for i, (p, pp) in enumerate(zip(prompts, params))])
    return [o.outputs.data for o in outs]


def _params(task: str, req: S.PoolingFields, prompt: Prompt, **kw: Any) -> PoolingParams:
    return PoolingParams(task=task, use_activation=req.use_activation,
                         token_type_ids=prompt.token_type_ids, **kw)


def check_dimensions(state: ServerState, dimensions: int | None) -> None:
    """Matryoshka truncation only where the model was trained for it (vLLM's rule)."""
    if dimensions is None:
        return
    name = state.model_name
    if dimensions < 1:
        raise BadRequest("Dimensions must be greater than 0", param="dimensions")
    cfg = state.engine.hf_config
    overrides = getattr(state.engine.model_config, "pooler_config", None) or {}
    allowed = overrides.get("matryoshka_dimensions") or getattr(cfg, "matryoshka_dimensions", None)
    matryoshka = bool(allowed or overrides.get("is_matryoshka") or getattr(cfg, "is_matryoshka", False))
    if not matryoshka:
        raise BadRequest(f'Model "{name}" does not support matryoshka representation, changing '
                         "output dimensions will lead to poor results.", param="dimensions")
    if allowed and dimensions not in allowed:
        raise BadRequest(f'Model "{name}" only supports {list(allowed)} matryoshka dimensions, '
                         "use other output dimensions will lead to poor results.", param="dimensions")
    hidden = getattr(cfg, "hidden_size", None)
    if hidden and dimensions > hidden:
        raise BadRequest(f"dimensions ({dimensions}) exceeds the model's {hidden}", param="dimensions")


def _check_common(state: ServerState, req: S.PoolingFields) -> str:
    if req.priority != 0:
        raise BadRequest("Priority scheduling is not enabled.", param="priority")
    return state.check_model(req.model)


# ---------------------------------------------------------------------------------------------
# The routes' logic
# ---------------------------------------------------------------------------------------------
async def create_embeddings(req: S.EmbeddingRequest, state: ServerState, request_id: str) -> dict:
    model = _check_common(state, req)
    require_task(state, "Embeddings")
    check_dimensions(state, req.dimensions)
    S.check_encoding(req)
    prompts = await tokenize_inputs(state, req, "embedding generation")
    normalize = req.normalize if req.normalize is not None else req.use_activation
    params = [PoolingParams(task="embed", dimensions=req.dimensions, normalize=normalize)
              for _ in prompts]
    vectors = await encode_all(state, prompts, params, request_id)
    data = [S.embedding_item(i, S.encode_vector(v, req)) for i, v in enumerate(vectors)]
    return S.list_response(request_id, model, now(), data, _num_tokens(prompts))


async def create_pooling(req: S.PoolingRequest, state: ServerState, request_id: str) -> dict:
    model = _check_common(state, req)
    tasks = state.supported_tasks
    task = {"token_embed": "encode"}.get(req.task or "", req.task) or (
        "embed" if "embed" in tasks else "classify")
    if task not in tasks and not (task == "encode" and "embed" in tasks):
        raise BadRequest(f"task {req.task!r} is not supported by this model (its tasks: "
                         f"{', '.join(tasks)})", param="task")
    check_dimensions(state, req.dimensions)
    S.check_encoding(req)
    prompts = await tokenize_inputs(state, req, "pooling")
    normalize = req.normalize if req.normalize is not None else (
        req.use_activation if task in ("embed", "encode") else None)
    params = [_params(task, req, p, dimensions=req.dimensions, normalize=normalize) for p in prompts]
    outputs = await encode_all(state, prompts, params, request_id)
    if task == "encode":  # per-token vectors arrive flat: [L * dims] -> L rows
        outputs = [_rows(v, len(p.token_ids)) for v, p in zip(outputs, prompts)]
    data = [S.pooling_item(i, S.encode_vector(v, req)) for i, v in enumerate(outputs)]
    return S.list_response(request_id, model, now(), data, _num_tokens(prompts))


async def create_classification(req: S.ClassificationRequest, state: ServerState,
                                request_id: str) -> dict:
    model = _check_common(state, req)
    require_task(state, "Classification")
    prompts = await tokenize_inputs(state, req, "classification")
    probs = await encode_all(state, prompts, [_params("classify", req, p) for p in prompts],
                             request_id)
    id2label = getattr(state.engine.hf_config, "id2label", None) or {}
    data = [S.classification_item(i, p, id2label) for i, p in enumerate(probs)]
    return S.list_response(request_id, model, now(), data, _num_tokens(prompts))


async def create_score(req: S.ScoreRequest, state: ServerState, request_id: str) -> dict:
    model = _check_common(state, req)
    require_task(state, "Score")
    left, right = req.sides()
    scores, tokens = await score_pairs(state, _pair_up(left, right), req, request_id)
    data = [S.score_item(i, s) for i, s in enumerate(scores)]
    return S.list_response(request_id, model, now(), data, tokens)


async def create_rerank(req: S.RerankRequest, state: ServerState, request_id: str) -> dict:
    model = _check_common(state, req)
    require_task(state, "Rerank")
    docs = req.document_texts()
    if not docs:
        raise BadRequest("documents must not be empty", param="documents")
    scores, tokens = await score_pairs(state, [(req.query, d) for d in docs], req, request_id)
    order = sorted(range(len(docs)), key=lambda i: scores[i], reverse=True)
    top_n = req.top_n if req.top_n and req.top_n > 0 else len(docs)
    results = [S.rerank_item(i, scores[i], docs[i] if req.return_documents else None)
               for i in order[:top_n]]
    return S.rerank_response(request_id, model, results, tokens)


def _pair_up(left: list[str], right: list[str]) -> list[tuple[str, str]]:
    if not left or not right:
        raise BadRequest("both sides of a score request must hold at least one text", param="text_1")
    if len(left) == 1:
        return [(left[0], r) for r in right]
    if len(left) != len(right):
        raise BadRequest(f"Input lengths must be either 1:1, 1:N or N:N (got {len(left)}:"
                         f"{len(right)})", param="text_2")
    return list(zip(left, right))


async def score_pairs(state: ServerState, pairs: list[tuple[str, str]], req: S.PoolingFields,
                      request_id: str) -> tuple[list[float], int]:
    """One score per (query, document) pair, and the prompt tokens it took."""
    if len(pairs) > MAX_INPUTS:
        raise BadRequest(f"{len(pairs)} pairs to score; at most {MAX_INPUTS} are allowed")
    if any(not q or not d for q, d in pairs):
        raise BadRequest("texts to score must not be empty", param="text_1")
    if "embed" in state.supported_tasks:
        return await _bi_encoder_scores(state, pairs, req, request_id)
    prompts = await tokenize_pairs(state, pairs, req)
    outs = await encode_all(state, prompts, [_params("score", req, p) for p in prompts], request_id)
    return [o[0] for o in outs], _num_tokens(prompts)


async def _bi_encoder_scores(state: ServerState, pairs: list[tuple[str, str]],
                             req: S.PoolingFields, request_id: str) -> tuple[list[float], int]:
    """Cosine similarity of the two texts' embeddings; each distinct text is embedded once."""
    texts = list(dict.fromkeys(t for pair in pairs for t in pair))
    sub = S.EmbeddingRequest(input=texts, truncate_prompt_tokens=req.truncate_prompt_tokens,
                             truncation_side=req.truncation_side,
                             add_special_tokens=req.add_special_tokens)
    prompts = await tokenize_inputs(state, sub, "score")
    vectors = await encode_all(state, prompts, [PoolingParams(task="embed") for _ in prompts],
                               request_id)
    emb = dict(zip(texts, torch.tensor(vectors, dtype=torch.float32)))
    a = torch.stack([emb[q] for q, _ in pairs])
    b = torch.stack([emb[d] for _, d in pairs])
    scores = torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()
    return scores, _num_tokens(prompts)


def _rows(flat: list[float], n: int) -> list[list[float]]:
    width = len(flat) // n
    return [flat[i * width:(i + 1) * width] for i in range(n)]


def _num_tokens(prompts: list[Prompt]) -> int:
    return sum(len(p.token_ids) for p in prompts)
