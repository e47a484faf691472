"""Abort engine work when the HTTP client goes away before a non-streaming response is ready.

A non-streaming handler awaits the whole generation; without this, a client that times out
leaves its request running in the engine until max_tokens. Streaming responses notice the
disconnect on their own (the send fails), so they do not need this.

Usage in a handler, after the body has been parsed (the watcher reads the ASGI receive channel,
so it must not compete with a body read):

    result = await run_with_disconnect_abort(raw_request, service.create(req, request_id),
                                             on_abort=lambda: engine.abort(request_id))

or decorate the handler with `@abort_on_disconnect` when it takes `raw_request: Request`.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from typing import Any, Awaitable, Callable, TypeVar

from starlette.requests import ClientDisconnect, Request

logger = logging.getLogger(__name__)

T = TypeVar("T")
AbortCallback = Callable[[], "Awaitable[Any] | None"]


async def wait_for_disconnect(request: Request) -> None:
    """Returns once the client has disconnected (uvicorn sends `http.disconnect`)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _call_abort(on_abort: AbortCallback | None) -> None:
    if on_abort is None:
        return
    try:
        result = on_abort()
        if inspect.isawaitable(result):
            await result
    except Exception:  # the abort is best effort: the request is gone either way
        logger.exception("on_abort callback failed")


async def run_with_disconnect_abort(request: Request, work: Awaitable[T],
                                    on_abort: AbortCallback | None = None) -> T:
    """Await `work`; if the client disconnects first, cancel it, call `on_abort`, and raise
    `ClientDisconnect` (RequestContextMiddleware treats that as a quiet end, not a 500)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is cancelling us (shutdown): stop the work too
        await _cancel(task, watcher)
        await _call_abort(on_abort)
        raise
    if task.done():
        await _cancel(watcher)
        return task.result()
    await _cancel(task)
    await _call_abort(on_abort)
    raise ClientDisconnect()


async def _cancel(*tasks: asyncio.Future) -> None:
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t


def abort_on_disconnect(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Decorator for a route handler that takes the Starlette request as `raw_request` (or as
    any positional argument). Cancelling the handler's task aborts its engine requests."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        request = kwargs.get("raw_request")
        if request is None:
            request = next((a for a in args if isinstance(a, Request)), None)
        if request is None:
            return await handler(*args, **kwargs)
        return await run_with_disconnect_abort(request, handler(*args, **kwargs))

    return wrapper
