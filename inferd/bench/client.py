"""One benchmark request against an OpenAI-compatible endpoint, timed chunk by chunk.

The request body asks for everything that makes the timing exact where the server supports it:
`stream_options.continuous_usage_stats` puts a cumulative token count on every chunk, so a chunk
that carries several tokens is known to (vLLM and inferd send it; others ignore it, and then each
chunk counts as one token). `ignore_eos` and `min_tokens = max_tokens` together make every request
produce exactly `max_tokens` on servers that honour either one.

Two transports send the same requests and parse them with the same code: aiohttp (the default
when installed, as in vLLM's benchmarks) and httpx. The client shares the server's cores, and
httpx spent 2.7x the CPU of aiohttp on workload (ii) here (1.39-1.44 s against 0.52-0.54 s for
64 streamed requests, Zen 4), CPU taken from the server it measures.
"""
from __future__ import annotations

import asyncio
import codecs
import json
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import httpx

from inferd.bench.sse import DONE, SSEParser
from inferd.bench.stats import RequestResult

ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class RequestSpec:
    """The shape every request of a run shares; only the prompt differs."""
    endpoint: str  # "completions" | "chat"
    model: str
    max_tokens: int
    temperature: float = 0.0
    stream: bool = True
    ignore_eos: bool = False
    usage_stats: bool = True  # send stream_options; off for servers that reject the field
    timeout_s: float = 600.0  # per request, end to end

    @property
    def path(self) -> str:
        return ENDPOINT_PATHS[self.endpoint]

    @property
    def max_events(self) -> int:
        """A cap on SSE events per request, so a server that never ends a stream cannot loop us
        forever even inside the time limit (one per token, plus role, usage and finish events)."""
        return 4 * self.max_tokens + 64

    def body(self, prompt: str | list[int]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens,
                                "temperature": self.temperature, "stream": self.stream}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.stream and self.usage_stats:
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        if self.ignore_eos:
            body["ignore_eos"] = True
            body["min_tokens"] = self.max_tokens
        return body


async def send_request(client: httpx.AsyncClient, spec: RequestSpec, prompt: str | list[int],
                       index: int, run_start: float) -> RequestResult:
    """Send one request and measure it; failures become `result.error`, never exceptions."""
    async def go(result: RequestResult, t0: float) -> None:
        if spec.stream:
            await _streamed(client, spec, prompt, result, t0)
        else:
            await _unstreamed(client, spec, prompt, result)
    return await _measured(spec, index, run_start, go, (httpx.HTTPError,))


async def _measured(spec: RequestSpec, index: int, run_start: float,
                    go: Callable[[RequestResult, float], Awaitable[None]],
                    transport_errors: tuple[type[Exception], ...]) -> RequestResult:
    """Run go(result, t0) under the request's time limit; its transport's errors and the
    timeout become `result.error`, and the end-to-end time is set either way."""
    result = RequestResult(index=index)
    t0 = time.perf_counter()
    result.start = t0 - run_start
    try:
        async with asyncio.timeout(spec.timeout_s):
            await go(result, t0)
    except TimeoutError:
        result.error = f"timed out after {spec.timeout_s:g}s"
    except transport_errors as e:
        result.error = f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]
    result.e2e = time.perf_counter() - t0
    return result


async def _unstreamed(client: httpx.AsyncClient, spec: RequestSpec, prompt: str | list[int],
                      result: RequestResult) -> None:
    resp = await client.post(spec.path, json=spec.body(prompt))
    if resp.status_code != 200:
        result.error = _http_error(resp.status_code, resp.text)
        return
    _on_unstreamed(resp.json(), result)


def _on_unstreamed(obj: Any, result: RequestResult) -> None:
    usage = (obj.get("usage") if isinstance(obj, dict) else None) or {}
    if "completion_tokens" in usage:
        result.output_tokens = int(usage["completion_tokens"])
        result.output_tokens_from_usage = True
    result.prompt_tokens = usage.get("prompt_tokens")
    result.chunks = 1


async def _streamed(client: httpx.AsyncClient, spec: RequestSpec, prompt: str | list[int],
                    result: RequestResult, t0: float) -> None:
    async with client.stream("POST", spec.path, json=spec.body(prompt)) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            result.error = _http_error(resp.status_code, text)
            return
        parser = SSEParser()
        tracker = StreamTracker(result, t0, spec.endpoint, spec.max_events)
        async for text in resp.aiter_text():
            # One arrival time for every event in this read: that is when they reached us.
            if tracker.on_events(parser.feed(text), time.perf_counter()):
                break
        else:
            tracker.on_events(parser.close(), time.perf_counter())
        tracker.finish()


class StreamTracker:
    """Turns a stream's events into TTFT, ITL and token counts on a `RequestResult`.

    With continuous usage a chunk carries as many tokens as the cumulative count rose; without it,
    a chunk with text carries one. Chunks with no choices (the final usage-only chunk) update the
    totals but are not timed: they carry no token of their own.
    """

    def __init__(self, result: RequestResult, t0: float, endpoint: str, max_events: int) -> None:
        self.result = result
        self.max_events = max_events
        self.events = 0
        self.t0 = t0
        self.endpoint = endpoint
        self.last_time: float | None = None
        self.counted_tokens = 0  # tokens attributed to chunks so far (from usage, else 1 a chunk)
        self.usage_tokens: int | None = None  # latest completion_tokens from any usage
        self.done = False

    def on_events(self, payloads: list[str], now: float) -> bool:
        """Handle the events of one read; True when the stream is over or hit the event cap."""
        for payload in payloads:
            self.events += 1
            if self.on_event(payload, now):
                return True
            if self.events >= self.max_events:
                self.result.error = f"stream exceeded {self.max_events} events"
                return True
        return False

    def on_event(self, payload: str, now: float) -> bool:
        """Handle one event's data; True when the stream is over ([DONE] or an error)."""
        if payload.strip() == DONE:
            self.done = True
            return True
        try:
            obj = json.loads(payload)
        except json.JSONDecodeError:
            self.result.error = f"unparseable event: {payload[:MAX_ERROR_CHARS]!r}"
            return True
        if not isinstance(obj, dict):
            return False
        if obj.get("error"):  # in-band error after the 200 (vLLM's and inferd's framing)
            err = obj["error"]
            msg = err.get("message", err) if isinstance(err, dict) else err
            self.result.error = f"stream error: {msg}"[:MAX_ERROR_CHARS]
            return True
        self._on_chunk(obj, now)
        return False

    def _on_chunk(self, obj: dict[str, Any], now: float) -> None:
        usage = obj.get("usage") or {}
        if usage.get("prompt_tokens") is not None:
            self.result.prompt_tokens = int(usage["prompt_tokens"])
        total = usage.get("completion_tokens")
        if total is not None:
            self.usage_tokens = int(total)
        choices = obj.get("choices") or []
        if not choices:
            return
        if total is not None:
            # Cumulative count: this chunk carries whatever it adds beyond what we attributed.
            tokens = max(int(total) - self.counted_tokens, 0)
            self.counted_tokens = max(self.counted_tokens, int(total))
        else:
            tokens = 1 if _choice_text(choices[0], self.endpoint) else 0
            self.counted_tokens += tokens
        # A chunk that adds no token (role announcement, empty finish, text the detokenizer
        # held back for tokens already counted) is not a token arrival: it is not timed.
        if tokens:
            self._on_output(now, tokens)

    def _on_output(self, now: float, tokens: int) -> None:
        r = self.result
        if self.last_time is None:
            r.ttft = now - self.t0
        else:
            gap = (now - self.last_time) / tokens
            r.itl.extend([gap] * tokens)
        self.last_time = now
        r.chunks += 1

    def finish(self) -> None:
        r = self.result
        if self.usage_tokens is not None:
            r.output_tokens, r.output_tokens_from_usage = self.usage_tokens, True
        else:
            r.output_tokens = self.counted_tokens  # one per text chunk: right for most servers
        if r.error is None and not self.done:
            r.error = "stream ended without [DONE]"


def _choice_text(choice: dict[str, Any], endpoint: str) -> str:
    if endpoint == "completions":
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    # Reasoning models stream their thinking in a separate field; those are output tokens too.
    return (delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
            or "")


async def send_request_aiohttp(session: Any, base_url: str, spec: RequestSpec,
                               prompt: str | list[int], index: int, run_start: float
                               ) -> RequestResult:
    """As send_request, over an aiohttp.ClientSession, to base_url (no trailing slash)."""
    import aiohttp

    async def go(result: RequestResult, t0: float) -> None:
        async with session.post(base_url + spec.path, json=spec.body(prompt)) as resp:
            if resp.status != 200:
                result.error = _http_error(resp.status, (await resp.read()).decode(errors="replace"))
            elif not spec.stream:
                _on_unstreamed(json.loads(await resp.read()), result)
            else:
                await _streamed_aiohttp(resp, spec, result, t0)
    # ValueError: a body that is not JSON, or a stream that is not UTF-8
    return await _measured(spec, index, run_start, go, (aiohttp.ClientError, ValueError))


async def _streamed_aiohttp(resp: Any, spec: RequestSpec, result: RequestResult,
                            t0: float) -> None:
    parser = SSEParser()
    decoder = codecs.getincrementaldecoder("utf-8")()  # reads split characters; strict
    tracker = StreamTracker(result, t0, spec.endpoint, spec.max_events)
    async for chunk in resp.content.iter_any():
        if tracker.on_events(parser.feed(decoder.decode(chunk)), time.perf_counter()):
            break
    else:
        tracker.on_events(parser.feed(decoder.decode(b"", final=True)) + parser.close(),
                          time.perf_counter())
    tracker.finish()


def _http_error(status: int, text: str) -> str:
    try:
        err = json.loads(text).get("error")
        msg = err.get("message") if isinstance(err, dict) else err or text
    except (json.JSONDecodeError, AttributeError):
        msg = text
    return f"HTTP {status}: {str(msg).strip()}"[:MAX_ERROR_CHARS]
