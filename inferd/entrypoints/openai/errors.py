"""Request errors as exceptions; `app.py` maps them to the OpenAI envelope in one place.

Envelope (vLLM-compatible): {"error": {"message", "type", "param", "code"}} with `code` the HTTP status.
Handlers raise; they never build error responses themselves. `to_api_error` decides what a
non-API exception means for the client, so the 4xx/5xx policy lives here and nowhere else.
"""
from __future__ import annotations

from http import HTTPStatus
from typing import Any

from inferd.sampling_params import ParamError


class APIError(Exception):
    status: int = 400
    type: str = "BadRequestError"

    def __init__(self, message: str, param: str | None = None, status: int | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.status)


class BadRequest(APIError):
    status, type = 400, "BadRequestError"


class Unauthorized(APIError):
    status, type = 401, "AuthenticationError"

    def __init__(self, message: str = "Unauthorized"):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class ModelNotFound(APIError):
    status, type = 404, "NotFoundError"

    def __init__(self, model: str):
        super().__init__(f"The model `{model}` does not exist.", param="model")


class PayloadTooLarge(APIError):
    status, type = 413, "RequestEntityTooLarge"


class Overloaded(APIError):
    """Queue full: 429 (or 503) with Retry-After, before any byte of the response is sent."""
    status, type = 429, "RateLimitError"

    def __init__(self, message: str, retry_after: int = 1, status: int = 429):
        super().__init__(message, status=status, headers={"Retry-After": str(retry_after)})


class InternalError(APIError):
    """Never carries the text of the underlying exception: that goes to the log only."""
    status, type = 500, "InternalServerError"


class NotImplementedAPI(APIError):
    status, type = 501, "NotImplementedError"


class EngineUnavailable(APIError):
    status, type = 503, "ServiceUnavailableError"


INTERNAL_ERROR_MESSAGE = "Internal server error. The request id is {request_id}; the server log has the details."


def error_body(message: str, type: str, param: str | None, status: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": status}}


def http_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _is_template_error(exc: BaseException) -> bool:
    # jinja2 is a dependency of the chat path only; import lazily so this leaf stays light.
    try:
        from jinja2 import TemplateError
    except ImportError:  # pragma: no cover - jinja2 is a declared dependency
        return False
    return isinstance(exc, TemplateError)


def _is_engine_dead(exc: BaseException) -> bool:
    # The engine defines EngineDeadError; matching by name keeps this module a leaf that never
    # imports the engine (which imports torch and zmq).
    return any(cls.__name__ == "EngineDeadError" for cls in type(exc).__mro__)


def to_api_error(exc: BaseException) -> APIError | None:
    """The client-facing meaning of an exception, or None for an unexpected one (a 500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ParamError):
        return BadRequest(str(exc), param=exc.param)
    if _is_engine_dead(exc):
        return EngineUnavailable("The engine is not running; the server is shutting down.")
    if isinstance(exc, NotImplementedError):
        return NotImplementedAPI(str(exc) or "This feature is not implemented.")
    # TypeError is deliberately absent: in our code it almost always means a bug, so a 500.
    if isinstance(exc, (ValueError, OverflowError)) or _is_template_error(exc):
        return BadRequest(str(exc), param=getattr(exc, "param", None))
    return None
