"""Server-sent events for the OpenAI streaming endpoints, and merging several generations.

Framing (vLLM-compatible): each event is `data: <json>\\n\\n` and the stream ends with
`data: [DONE]\\n\\n`. Once the 200 and the first bytes are out, an error can no longer change
the status, so it goes out as a `data: {"error": {...}}` event followed by `[DONE]`.

Cancellation is the abort path: when the client goes away, Starlette cancels the task that
drives the stream; the CancelledError (or the generator's close) reaches the engine's
`generate` iterator, whose cleanup aborts the request and frees its KV blocks. Nothing here
swallows a CancelledError.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any, TypeVar

from fastapi.responses import StreamingResponse

from inferd.entrypoints.openai.errors import APIError, to_api_error

logger = logging.getLogger("inferd.api")
T = TypeVar("T")

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def error_payload(exc: BaseException, request_id: str) -> dict[str, Any]:
    """The error envelope for an exception raised mid-stream, as `to_api_error` maps it before
    a response starts (an engine that died mid-stream is a 503); unknown ones stay generic."""
    err = to_api_error(exc)
    if err is not None:
        if not isinstance(exc, APIError):
            logger.warning("request %s failed while streaming: %s", request_id, exc)
        return err.body()
    logger.error("request %s failed while streaming", request_id, exc_info=exc)
    return {"error": {"message": "The server failed while generating the response.",
                      "type": "InternalServerError", "param": None, "code": 500}}


async def sse_lines(events: AsyncIterator[dict[str, Any]], request_id: str) -> AsyncIterator[str]:
    """Frame `events` as SSE, turning a failure into an error event; always ends with [DONE]."""
    async with aclosing(events):
        try:
            async for payload in events:
                yield sse_event(payload)
        except Exception as e:  # noqa: BLE001 - the status is already 200; report in-band
            yield sse_event(error_payload(e, request_id))
    yield DONE


def sse_response(events: AsyncIterator[dict[str, Any]], request_id: str) -> StreamingResponse:
    return StreamingResponse(sse_lines(events, request_id), media_type="text/event-stream",
                             headers=SSE_HEADERS)


async def merge_async_iterators(iterators: Sequence[AsyncIterator[T]]
                                ) -> AsyncIterator[tuple[int, T]]:
    """Items of several iterators as they come, tagged with the iterator's position.

    Each iterator runs in its own task; when the consumer stops early (or is cancelled), every
    task is cancelled, which aborts the engine requests behind them.
    """
    if len(iterators) == 1:
        async with aclosing(iterators[0]) as it:  # type: ignore[type-var]
            async for item in it:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    finished = object()

    async def drain(i: int, it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                await queue.put((i, item))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, finished))

    tasks = [asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is finished:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def prime(iterator: AsyncIterator[T]) -> AsyncIterator[T]:
    """Wait for the first item, then return an iterator over all of them.

    A streaming request is refused (queue full, engine down, invalid for the engine) before any
    byte is sent only if that refusal surfaces before the response starts: priming moves it there,
    so it becomes an HTTP status instead of an error event after a 200.
    """
    try:
        first = await anext(iterator)
    except StopAsyncIteration:
        return _empty()
    except BaseException:
        await iterator.aclose()  # type: ignore[attr-defined]
        raise
    return _chain(first, iterator)


async def _empty() -> AsyncIterator[Any]:
    return
    yield  # pragma: no cover - makes this an async generator


async def _chain(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    async with aclosing(rest):  # type: ignore[type-var]
        yield first
        async for item in rest:
            yield item
