"""Pooling routes (thin: parse, hand to the service, encode the answer).

/v1/embeddings, /pooling, /classify, /score, /v1/score, /rerank, /v1/rerank, /v2/rerank.
The app registers this router only for pooling models; a route the loaded model cannot serve
answers 501 (see service.require_task).
"""
from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import Response

from inferd.entrypoints.openai.common import make_request_id
from inferd.entrypoints.openai.disconnect import run_with_disconnect_abort
from inferd.entrypoints.openai.middleware import get_request_id
from inferd.entrypoints.openai.pooling import service
from inferd.entrypoints.openai.pooling.schemas import (ClassificationRequest, EmbeddingRequest,
                                                       PoolingRequest, RerankRequest, ScoreRequest)
from inferd.entrypoints.openai.state import ServerState, get_state

logger = logging.getLogger(__name__)
router = APIRouter()
_encoder = msgspec.json.Encoder()  # a thousand 384-float vectors encode ~10x faster than json


async def _respond(raw_request: Request, prefix: str, body_request_id: str | None,
                   work: Callable[[ServerState, str], Awaitable[dict[str, Any]]]) -> Response:
    header_id = get_request_id(raw_request) if raw_request.headers.get("x-request-id") else None
    request_id = make_request_id(prefix, header_id, body_request_id)
    # A client that goes away cancels the work, which aborts every engine request it made.
    body = await run_with_disconnect_abort(raw_request, work(get_state(raw_request), request_id))
    return Response(_encoder.encode(body), media_type="application/json")


# Handlers shared by the routes and /invocations: (parsed body, raw request) -> response.
async def handle_embeddings(request: EmbeddingRequest, raw_request: Request) -> Response:
    return await _respond(raw_request, "embd", request.request_id,
                          lambda state, rid: service.create_embeddings(request, state, rid))


async def handle_pooling(request: PoolingRequest, raw_request: Request) -> Response:
    return await _respond(raw_request, "pool", request.request_id,
                          lambda state, rid: service.create_pooling(request, state, rid))


async def handle_classify(request: ClassificationRequest, raw_request: Request) -> Response:
    return await _respond(raw_request, "classify", request.request_id,
                          lambda state, rid: service.create_classification(request, state, rid))


async def handle_score(request: ScoreRequest, raw_request: Request) -> Response:
    return await _respond(raw_request, "score", request.request_id,
                          lambda state, rid: service.create_score(request, state, rid))


async def handle_rerank(request: RerankRequest, raw_request: Request) -> Response:
    return await _respond(raw_request, "rerank", request.request_id,
                          lambda state, rid: service.create_rerank(request, state, rid))


@router.post("/v1/embeddings")
async def embeddings(request: EmbeddingRequest, raw_request: Request) -> Response:
    return await handle_embeddings(request, raw_request)


@router.post("/pooling")
async def pooling(request: PoolingRequest, raw_request: Request) -> Response:
    return await handle_pooling(request, raw_request)


@router.post("/classify")
async def classify(request: ClassificationRequest, raw_request: Request) -> Response:
    return await handle_classify(request, raw_request)


@router.post("/score")
async def score(request: ScoreRequest, raw_request: Request) -> Response:
    return await handle_score(request, raw_request)


@router.post("/v1/score")
async def score_v1(request: ScoreRequest, raw_request: Request) -> Response:
    logger.warning("To indicate that Score API is not part of standard OpenAI API, we have "
                   "moved it to /score. /v1/score will be removed in a future release.")
    return await handle_score(request, raw_request)


@router.post("/rerank")
@router.post("/v2/rerank")
async def rerank(request: RerankRequest, raw_request: Request) -> Response:
    return await handle_rerank(request, raw_request)


@router.post("/v1/rerank")
async def rerank_v1(request: RerankRequest, raw_request: Request) -> Response:
    logger.warning("To indicate that the rerank API is not part of the standard OpenAI API, we "
                   "have located it at /rerank. Please update your client accordingly. (Note: "
                   "Conforms to JinaAI rerank API)")
    return await handle_rerank(request, raw_request)
