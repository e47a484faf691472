"""POST /invocations (SageMaker): one route, dispatched on the shape of the body.

The handlers are tried in registration order and the first request model that validates the
body wins (reference §1.6): chat (a body with `messages`), then completions (`prompt`). Other
endpoint packages add theirs with `register_invocation` (pooling: embeddings, classify, score)
when their routes are enabled for the served model.
"""
from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from inferd.entrypoints.openai.chat.router import handle_chat
from inferd.entrypoints.openai.chat.schemas import ChatCompletionRequest
from inferd.entrypoints.openai.completions.router import handle_completion
from inferd.entrypoints.openai.completions.schemas import CompletionRequest
from inferd.entrypoints.openai.errors import BadRequest
from inferd.entrypoints.openai.state import get_state

Handler = Callable[[BaseModel, Request], Awaitable[Response]]


@dataclass(frozen=True)
class Invocation:
    request_model: type[BaseModel]
    handler: Handler
    task: str  # the engine task it needs ("generate", "embed", "classify", "score")


_INVOCATIONS: list[Invocation] = [
    Invocation(ChatCompletionRequest, handle_chat, "generate"),  # type: ignore[arg-type]
    Invocation(CompletionRequest, handle_completion, "generate"),  # type: ignore[arg-type]
]


def register_invocation(request_model: type[BaseModel], handler: Handler, task: str) -> None:
    """Add a handler after the existing ones (lower priority); re-registering is a no-op."""
    if all(inv.request_model is not request_model for inv in _INVOCATIONS):
        _INVOCATIONS.append(Invocation(request_model, handler, task))


router = APIRouter()


@router.post("/invocations")
async def invocations(raw_request: Request) -> Response:
    try:
        body = json.loads(await raw_request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"JSON decode error: {e}") from None
    except RecursionError:
        raise BadRequest("JSON decode error: the body is nested too deeply") from None
    tasks = set(get_state(raw_request).engine.supported_tasks)
    candidates = [inv for inv in _INVOCATIONS if inv.task in tasks]
    for inv in candidates:
        try:
            request = inv.request_model.model_validate(body)
        except ValidationError:
            continue
        return await inv.handler(request, raw_request)
    names = [inv.request_model.__name__ for inv in candidates]
    raise BadRequest(f"Cannot find suitable handler for request. Expected one of: {names}")
