"""Cross-cutting HTTP behaviour, as plain ASGI middleware (no BaseHTTPMiddleware: it buffers and
breaks streaming cancellation), plus the per-route dependencies JSON routes share.

Order, outermost first (see `app.build_app`): CORS → RequestContext (request id, last-resort 500)
→ Auth → BodySizeLimit → LoadTracking → FastAPI's exception handlers → router.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import uuid
from typing import Iterable

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferd.entrypoints.openai.errors import (INTERNAL_ERROR_MESSAGE, APIError, BadRequest, InternalError,
                                              PayloadTooLarge, Unauthorized, to_api_error)
from inferd.entrypoints.openai.state import ServerState, get_state

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# A client-chosen request id is echoed in headers and logs: keep it short and printable.
_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,256}$")

PUBLIC_PATHS = frozenset({"/health", "/ping", "/version", "/metrics"})
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})

# Routes that count towards /load (vLLM's "load-aware" set): generation and pooling work.
LOAD_TRACKED_PATHS = frozenset({
    "/v1/chat/completions", "/v1/chat/completions/batch", "/v1/completions", "/v1/responses",
    "/v1/messages", "/v1/audio/transcriptions", "/v1/audio/translations", "/v1/embeddings",
    "/pooling", "/classify", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank",
    "/invocations",
})


def get_request_id(request: Request) -> str:
    """The id RequestContextMiddleware gave this request (the client's X-Request-Id if sent)."""
    rid = request.scope.get("state", {}).get("request_id")
    return rid if rid else uuid.uuid4().hex


def route_path(scope: Scope) -> str:
    """The path a route decision should see: root_path stripped, `//` collapsed, no trailing `/`.

    Mirrors Starlette's own root_path handling so auth and routing agree on the prefix; the
    extra normalisation only ever widens what counts as *protected* (a collapsed path that is
    public never routes to a protected handler: routing is exact and case-sensitive).
    """
    path: str = scope.get("path", "") or "/"
    root: str = scope.get("root_path", "") or ""
    if root and (path == root or path.startswith(root.rstrip("/") + "/")):
        path = path[len(root.rstrip("/")):] or "/"
    path = re.sub(r"/{2,}", "/", path)
    if len(path) > 1:
        path = path.rstrip("/") or "/"
    return path


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


async def send_error(send: Send, err: APIError, extra_headers: Iterable[tuple[str, str]] = ()) -> None:
    body = json.dumps(err.body(), separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1"))
                for k, v in [*err.headers.items(), *extra_headers]]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestContextMiddleware:
    """Gives every request an id, optionally echoes it, and turns an unexpected exception into
    a generic 500 whose text never includes the exception (that goes to the log, with the id)."""

    def __init__(self, app: ASGIApp, echo_request_id: bool = False):
        self.app = app
        self.echo_request_id = echo_request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client_id = _header(scope, REQUEST_ID_HEADER.encode())
        rid = client_id if client_id and _REQUEST_ID_RE.match(client_id) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if self.echo_request_id:
                    message["headers"] = [*message.get("headers", []),
                                          (REQUEST_ID_HEADER.encode(), rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except ClientDisconnect:
            logger.debug("Client disconnected during request %s", rid)
        except Exception as exc:  # the last resort: every known error was mapped inside
            await self._handle(exc, scope, rid, started, send_wrapper)

    async def _handle(self, exc: Exception, scope: Scope, rid: str, started: bool, send: Send) -> None:
        err = to_api_error(exc)
        if started:
            # Headers are out (a stream failed): nothing can be sent, the connection just ends.
            logger.error("Request %s failed after its response started", rid, exc_info=exc)
            return
        if err is None:
            logger.error("Internal error in request %s (%s %s)", rid, scope.get("method"),
                         scope.get("path"), exc_info=exc)
            err = InternalError(INTERNAL_ERROR_MESSAGE.format(request_id=rid))
        await send_error(send, err)


class AuthMiddleware:
    """Deny by default: every route needs `Authorization: Bearer <key>` except the public ones.

    Keys are compared as SHA-256 digests with hmac.compare_digest, always against every key,
    so neither the key length nor which key matched shows in the timing.
    """

    def __init__(self, app: ASGIApp, api_keys: list[str], public_paths: frozenset[str]):
        self.app = app
        self.key_digests = [hashlib.sha256(k.encode()).digest() for k in api_keys]
        self.public_paths = public_paths

    def authorized(self, scope: Scope) -> bool:
        value = _header(scope, b"authorization") or ""
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.strip().encode("latin-1")).digest()
        matched = False
        for key_digest in self.key_digests:
            matched |= hmac.compare_digest(digest, key_digest)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.key_digests:
            await self.app(scope, receive, send)
            return
        # OPTIONS carries no credentials in a CORS preflight; it never reaches a handler body.
        exempt = scope["type"] == "http" and scope.get("method") == "OPTIONS"
        if exempt or route_path(scope) in self.public_paths or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send_error(send, Unauthorized())


class BodyTooLarge(HTTPException):
    """Raised from `receive`: FastAPI lets an HTTPException from a body read through unchanged
    (anything else becomes a 400); app.py renders `api_error` as the 413 envelope."""

    def __init__(self, api_error: PayloadTooLarge):
        super().__init__(api_error.status, api_error.message)
        self.api_error = api_error


class BodySizeLimitMiddleware:
    """413 for bodies over the limit: at once from Content-Length, else as soon as the running
    count of received bytes passes it (chunked uploads), without reading the rest."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"Request body is larger than the limit of {self.max_bytes} bytes.")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            await send_error(send, self._too_large(), [("connection", "close")])
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self._too_large())
            return message

        await self.app(scope, limited_receive, send)


class LoadTrackingMiddleware:
    """Counts in-flight requests on the load-aware routes for /load. The count drops when the
    app returns, i.e. after the last byte of a stream, or at once on an error."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) not in LOAD_TRACKED_PATHS:
            await self.app(scope, receive, send)
            return
        self.state.server_load += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.server_load -= 1


# -- dependencies (added per router in app.build_app) ---------------------------------------------

async def validate_json_request(request: Request) -> None:
    """JSON POST routes accept only `application/json` (parameters such as charset allowed),
    holding only valid Unicode text (see `reject_lone_surrogates`)."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise BadRequest("Unsupported Media Type: Only 'application/json' is allowed")
    reject_lone_surrogates(await request.body())  # the body FastAPI read (and cached) already


# A `\uD800`..`\uDFFF` escape: the only way a JSON text can carry a UTF-16 surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def reject_lone_surrogates(body: bytes) -> None:
    """400 for a JSON body whose strings hold an unpaired surrogate escape such as "\ud800".

    JSON allows the escape, Python decodes it to a str that cannot be encoded as UTF-8, and
    everything downstream fails on it: the tokenizer, the engine's msgspec boundary, the JSON
    response. One check here covers every field of every JSON route. The regex over the raw
    bytes is the fast path: without such an escape no surrogate can be in the parsed body.
    """
    if not _SURROGATE_ESCAPE.search(body):
        return
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return  # not JSON: the route's own parsing reports that
    where = _find_lone_surrogate(value)
    if where is not None:
        where = where[:200]  # a path through client-chosen keys: keep the message short
        raise BadRequest(f"{where or 'body'}: the string holds an unpaired UTF-16 surrogate, "
                         "which is not valid Unicode text", param=where or None)


def _find_lone_surrogate(value: object) -> str | None:
    """The dotted path of the first string (value or key) holding a lone surrogate, else None.
    Iterative: a deeply nested body must not trip the recursion limit."""
    stack: list[tuple[object, str]] = [(value, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            if _LONE_SURROGATE.search(node):
                return path
        elif isinstance(node, dict):
            for key, child in node.items():
                child_path = f"{path}.{key}" if path else str(key)
                if _LONE_SURROGATE.search(key):
                    return path or "body"
                stack.append((child, child_path))
        elif isinstance(node, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(node))
    return None


async def check_queue_capacity(request: Request) -> None:
    """429 + Retry-After when the engine's waiting queue is full; runs before the handler, so
    before any byte of a stream is sent."""
    if request.method == "POST":
        get_state(request).check_capacity(1)


def public_paths(docs_enabled: bool) -> frozenset[str]:
    return PUBLIC_PATHS | DOCS_PATHS if docs_enabled else PUBLIC_PATHS

