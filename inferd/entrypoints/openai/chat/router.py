"""POST /v1/chat/completions (thin: parse, hand to the service, frame the answer)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from inferd.entrypoints.openai.chat.schemas import ChatCompletionRequest
from inferd.entrypoints.openai.chat.service import create_chat_completion
from inferd.entrypoints.openai.common import make_request_id
from inferd.entrypoints.openai.disconnect import run_with_disconnect_abort
from inferd.entrypoints.openai.middleware import get_request_id
from inferd.entrypoints.openai.state import get_state
from inferd.entrypoints.openai.streaming import sse_response

router = APIRouter()


async def handle_chat(request: ChatCompletionRequest, raw_request: Request) -> Response:
    """Shared by the route and /invocations."""
    header_id = get_request_id(raw_request) if raw_request.headers.get("x-request-id") else None
    request_id = make_request_id("chatcmpl", header_id, request.request_id)
    # The disconnect watcher covers the whole wait (a stream's is only until its first output);
    # cancelling the work closes the engine iterator, which aborts the engine request.
    result = await run_with_disconnect_abort(
        raw_request, create_chat_completion(request, get_state(raw_request), request_id))
    if isinstance(result, dict):
        return JSONResponse(result)
    return sse_response(result, request_id)


@router.post("/v1/chat/completions")
async def create(request: ChatCompletionRequest, raw_request: Request) -> Response:
    return await handle_chat(request, raw_request)
