"""Admin routes. Thin: each reads ServerState and answers; errors are raised, never built here."""
from __future__ import annotations

import json
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from inferd.entrypoints.openai.admin.health import unhealthy_reason
from inferd.entrypoints.openai.admin.schemas import ModelCard, ModelList, ScaleElasticEPRequest
from inferd.entrypoints.openai.errors import BadRequest, NotImplementedAPI
from inferd.entrypoints.openai.state import get_state
from inferd.metrics import CONTENT_TYPE
from inferd.version import __version__

logger = logging.getLogger(__name__)

router = APIRouter()
scaling_router = APIRouter()


@router.get("/load")
async def load(raw_request: Request) -> dict[str, int]:
    return {"server_load": get_state(raw_request).server_load}


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


async def _health(raw_request: Request) -> Response:
    state = get_state(raw_request)
    reason = await unhealthy_reason(state)
    if reason != state.health.last_reason:  # log changes, not every probe
        if reason:
            logger.warning("Health check failing: %s", reason)
        elif state.health.last_reason:
            logger.info("Health check passing again.")
        state.health.last_reason = reason
    return Response(status_code=503 if reason else 200)


@router.get("/health", response_class=Response)
async def health(raw_request: Request) -> Response:
    """200 with an empty body while the engine serves; 503 when it is dead or stalled."""
    return await _health(raw_request)


# One route per method: a route with several methods gives them one OpenAPI operationId.
@router.api_route("/metrics/", methods=["GET", "HEAD"], response_class=Response, include_in_schema=False)
@router.api_route("/metrics", methods=["HEAD"], response_class=Response, include_in_schema=False)
@router.get("/metrics", response_class=Response)
async def metrics(raw_request: Request) -> Response:
    """Prometheus text (vLLM serves `/metrics/` too, without a redirect a scraper may not follow)."""
    sink = get_state(raw_request).metrics
    if sink is None:
        return Response(content=b"", media_type=CONTENT_TYPE)
    body, headers = sink.exposition(raw_request.headers.get("accept", ""),
                                    raw_request.headers.get("accept-encoding", ""))
    return Response(content=body, headers=headers)


@router.get("/v1/models", response_model=ModelList)
async def show_available_models(raw_request: Request) -> ModelList:
    state = get_state(raw_request)
    root = str(state.engine.model_config.model)
    cards = [ModelCard(id=name, created=state.created, root=root, max_model_len=state.max_model_len)
             for name in state.config.served_model_names]
    return ModelList(data=cards)


@router.post("/ping", response_class=Response)
@router.get("/ping", response_class=Response)  # innermost: registered (and logged) first
async def ping(raw_request: Request) -> Response:
    """SageMaker's health check: the same answer as /health."""
    return await _health(raw_request)


@scaling_router.post("/scale_elastic_ep")
async def scale_elastic_ep(raw_request: Request) -> JSONResponse:
    """vLLM's validation, then 501: rescaling needs data-parallel engines, which we don't run."""
    try:
        body = json.loads(await raw_request.body())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise BadRequest("Invalid JSON format") from None
    if not isinstance(body, dict):
        raise BadRequest("Invalid JSON format: the body must be an object")
    ScaleElasticEPRequest.model_validate(body)  # 400 naming the field when invalid
    raise NotImplementedAPI("Scaling requires data parallel serving (--data-parallel-size > 1 with "
                            "--enable-elastic-ep), which this server does not run.")


@scaling_router.post("/is_scaling_elastic_ep")
async def is_scaling_elastic_ep() -> dict[str, bool]:
    return {"is_scaling_elastic_ep": False}
