"""The app factory: middleware, exception handlers, lifespan and the route table.

`build_app(state)` is the only place routers are registered. Each endpoint family is a package
exposing `router: APIRouter`; ROUTE_TABLE says when it is registered (by the engine's supported
tasks) and which shared dependencies its routes get (JSON content type, queue admission), so
the packages themselves stay free of that wiring.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from inferd.entrypoints.openai.admin.health import watch_engine
from inferd.entrypoints.openai.errors import APIError, BadRequest, http_phrase, to_api_error
from inferd.entrypoints.openai.middleware import (AuthMiddleware, BodySizeLimitMiddleware,
                                                  LoadTrackingMiddleware, RequestContextMiddleware,
                                                  check_queue_capacity, public_paths,
                                                  validate_json_request)
from inferd.entrypoints.openai.state import ServerState
from inferd.version import __version__

logger = logging.getLogger(__name__)

GENERATE_TASKS = frozenset({"generate"})
POOLING_TASKS = frozenset({"embed", "classify", "score", "token_embed", "token_classify"})


@dataclass(frozen=True)
class RouterSpec:
    module: str
    attr: str = "router"
    tasks: frozenset[str] | None = None
    """Register only when the engine supports one of these tasks; None: always."""
    json_body: bool = True
    """Its POST routes take application/json (other content types get a 400)."""
    admission: bool = False
    """Its POST routes create engine work: refuse with 429 when the waiting queue is full."""


_OPENAI = "inferd.entrypoints.openai"
# In vLLM's registration order, which is also the order of the startup log's route list.
ROUTE_TABLE: tuple[RouterSpec, ...] = (
    RouterSpec(f"{_OPENAI}.tokenize"),
    RouterSpec(f"{_OPENAI}.admin", json_body=False),
    RouterSpec(f"{_OPENAI}.invocations", tasks=GENERATE_TASKS | POOLING_TASKS, admission=True),
    RouterSpec(f"{_OPENAI}.chat", tasks=GENERATE_TASKS, admission=True),
    RouterSpec(f"{_OPENAI}.responses", tasks=GENERATE_TASKS, admission=True),
    RouterSpec(f"{_OPENAI}.completions", tasks=GENERATE_TASKS, admission=True),
    RouterSpec(f"{_OPENAI}.admin", attr="scaling_router", tasks=GENERATE_TASKS, json_body=False),
    RouterSpec(f"{_OPENAI}.pooling", tasks=POOLING_TASKS, admission=True),
)


def _load_router(spec: RouterSpec) -> Any | None:
    try:
        module = importlib.import_module(spec.module)
    except ModuleNotFoundError as e:
        # Only a family that does not exist (yet) is skipped; a broken import inside one fails loudly.
        if e.name != spec.module:
            raise
        logger.debug("%s is not available; its routes are not registered", spec.module)
        return None
    return getattr(module, spec.attr)


def register_routers(app: FastAPI, supported_tasks: tuple[str, ...]) -> None:
    tasks = set(supported_tasks)
    for spec in ROUTE_TABLE:
        if spec.tasks is not None and not tasks & spec.tasks:
            continue
        router = _load_router(spec)
        if router is None:
            continue
        deps = [Depends(validate_json_request)] if spec.json_body else []
        if spec.admission:
            deps.append(Depends(check_queue_capacity))
        app.include_router(router, dependencies=deps)


# -- errors: one place maps every exception to the envelope --------------------------------------

def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers or None)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def _union_tag(part: Any) -> bool:
    """Pydantic names the union member it tried in `loc` ("literal['none','auto']", "int",
    "NamedToolChoice", "function-after[...]"): not a field a client sent."""
    if not isinstance(part, str):
        return False
    return "[" in part or part in _TYPE_TAGS or part[:1].isupper()


def describe_errors(errors: Any) -> tuple[str, str | None]:
    """A pydantic error list as (message, param); `param` is the first field's dotted path."""
    parts: list[str] = []
    param: str | None = None
    for error in errors:
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", "")
            parts.append(f"JSON decode error: {detail}" if detail else "JSON decode error")
            continue
        loc = [p for p in error.get("loc", ()) if p != "body" and not _union_tag(p)]
        field = ".".join(str(p) for p in loc)
        param = param or field or None
        parts.append(f"{field}: {error.get('msg')}" if field else str(error.get("msg")))
    return "; ".join(parts) or "Invalid request", param


async def _validation_error(request: Request, exc: RequestValidationError | ValidationError) -> JSONResponse:
    # 400, never FastAPI's 422; the type is the HTTP phrase, as vLLM sends for schema errors.
    message, param = describe_errors(exc.errors())
    return error_response(BadRequest(message, param=param, type=http_phrase(400)))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    err = getattr(exc, "api_error", None)
    if err is None:
        err = APIError(str(exc.detail), status=exc.status_code, type=http_phrase(exc.status_code),
                       headers=dict(exc.headers or {}))
    return error_response(err)


async def _known_error(request: Request, exc: Exception) -> JSONResponse:
    err = to_api_error(exc)
    if err is None:  # not ours to map: RequestContextMiddleware logs it and sends the 500
        raise exc
    return error_response(err)


def _exception_handlers() -> dict[Any, Any]:
    from jinja2 import TemplateError

    from inferd.engine.async_llm import EngineDeadError
    known = (APIError, ValueError, OverflowError, NotImplementedError, TemplateError, EngineDeadError)
    handlers: dict[Any, Any] = {cls: _known_error for cls in known}
    handlers.update({RequestValidationError: _validation_error, ValidationError: _validation_error,
                     HTTPException: _http_error})
    return handlers


# -- app --------------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServerState = app.state.inferd
    await state.engine.start()
    watchdog = asyncio.create_task(watch_engine(state), name="inferd-engine-watchdog")
    try:
        yield
    finally:
        logger.info("Shutting down FastAPI HTTP server.")
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog


def _middleware(state: ServerState) -> list[Middleware]:
    cfg = state.config
    stack = [
        # Outermost, so preflights are answered before auth and every error carries CORS headers.
        Middleware(CORSMiddleware, allow_origins=cfg.allowed_origins, allow_methods=cfg.allowed_methods,
                   allow_headers=cfg.allowed_headers, allow_credentials=cfg.allow_credentials),
        Middleware(RequestContextMiddleware, echo_request_id=cfg.enable_request_id_headers),
        Middleware(AuthMiddleware, api_keys=cfg.api_keys,
                   public_paths=public_paths(not cfg.disable_fastapi_docs)),
        Middleware(BodySizeLimitMiddleware, max_bytes=cfg.max_request_body_bytes),
    ]
    if cfg.enable_server_load_tracking:
        stack.append(Middleware(LoadTrackingMiddleware, state=state))
    return stack


def build_app(state: ServerState) -> FastAPI:
    docs = not state.config.disable_fastapi_docs
    app = FastAPI(
        title="inferd", version=__version__, root_path=state.config.root_path or "",
        openapi_url="/openapi.json" if docs else None, docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None, swagger_ui_oauth2_redirect_url="/docs/oauth2-redirect",
        lifespan=lifespan, middleware=_middleware(state), exception_handlers=_exception_handlers())
    app.state.inferd = state
    register_routers(app, state.supported_tasks)
    if state.metrics is not None:
        state.metrics.instrument_http(app)
    return app
