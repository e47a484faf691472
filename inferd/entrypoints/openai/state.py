"""What every route handler reads: the engine client and the server's settings.

Built once by `server.py`, stored on `app.state.inferd`, read through `get_state(request)`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from inferd.config import ConfigError
from inferd.entrypoints.openai.errors import BadRequest, ModelNotFound, Overloaded

if TYPE_CHECKING:
    from inferd.engine.async_llm import AsyncLLM
    from inferd.entrypoints.openai.admin.health import EngineHealthMonitor
    from inferd.metrics import PrometheusStatsSink

logger = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    """Interface to listen on."""
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    """Bearer keys accepted on every non-public route; empty means no auth."""
    served_model_names: list[str] = field(default_factory=list)
    chat_template: str | None = None
    """Resolved template text (from --chat-template: a file path or inline Jinja); None: the model's."""
    chat_template_content_format: str = "auto"
    """auto | string | openai"""
    default_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Template variables for every chat request (a request's chat_template_kwargs win), e.g. '{"enable_thinking": false}'."""
    trust_request_chat_template: bool = False
    """Honour a `chat_template` sent in a request (templates run sandboxed, but are still code)."""
    response_role: str = "assistant"
    """Role of the generated message when add_generation_prompt is set."""
    reasoning_parser: str | None = None
    """Split reasoning from content in chat output (e.g. deepseek_r1, qwen3)."""
    enable_auto_tool_choice: bool = False
    """Let the model decide to call tools (tool_choice=auto); needs --tool-call-parser."""
    tool_call_parser: str | None = None
    """How tool calls are read from the output (e.g. hermes, llama3_json, mistral)."""
    exclude_tools_when_tool_choice_none: bool = False
    """Leave `tools` out of the chat template when a request says tool_choice=none (by default the model still sees them)."""
    structured_outputs_config: dict[str, Any] = field(default_factory=dict)
    """vLLM's structured-output settings, as JSON or dotted (--structured-outputs-config.enable_in_reasoning true): backend (auto or xgrammar); enable_in_reasoning (grammars also constrain the reasoning; default false: they start after it)."""
    enable_prompt_tokens_details: bool = False
    """Report usage.prompt_tokens_details.cached_tokens also with prefix caching off (with it on they are always reported)."""
    enable_force_include_usage: bool = False
    """Every stream reports usage, running and final, as if stream_options asked for both."""
    max_logprobs: int = 20
    """Most logprobs / top_logprobs a request may ask for; -1: no limit."""
    max_num_queued_requests: int | None = None
    """Waiting requests allowed before new ones get 429 + Retry-After; None: unbounded."""
    max_request_body_bytes: int = 32 * 2**20
    """Larger request bodies get 413 before they are read."""
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])
    """CORS origins (words or a JSON list)."""
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    """CORS methods."""
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    """CORS headers."""
    allow_credentials: bool = False
    """CORS: allow credentials."""
    root_path: str | None = None
    """Path prefix when served behind a proxy that strips it (FastAPI's root_path)."""
    uvicorn_log_level: str = "info"
    disable_uvicorn_access_log: bool = False
    """No per-request access log lines."""
    enable_log_requests: bool = False
    """Log each request's parameters as it arrives."""
    enable_request_id_headers: bool = False
    """Echo X-Request-Id (the client's, or a fresh one) on every response."""
    enable_server_load_tracking: bool = False
    """Count in-flight generation/pooling requests for GET /load."""
    disable_fastapi_docs: bool = False
    """Remove /docs, /redoc and /openapi.json."""
    ssl_keyfile: str | None = None
    """TLS key file; serve HTTPS together with --ssl-certfile."""
    ssl_certfile: str | None = None
    """TLS certificate file."""
    engine_stall_timeout: float = 120.0
    """Seconds with requests pending and no engine step before /health reports 503."""
    shutdown_timeout: float = 10.0
    """Seconds in-flight requests get to finish after SIGTERM/SIGINT before they are cancelled."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port} must be in 0..65535")
        if self.max_num_queued_requests is not None and self.max_num_queued_requests < 0:
            raise ConfigError(f"--max-num-queued-requests {self.max_num_queued_requests} must be >= 0")
        if self.max_logprobs < -1:
            raise ConfigError(f"--max-logprobs {self.max_logprobs} must be -1 (no limit) or >= 0")
        if self.max_request_body_bytes < 1:
            raise ConfigError("--max-request-body-bytes must be >= 1")
        if self.engine_stall_timeout <= 0 or self.shutdown_timeout < 0:
            raise ConfigError("--engine-stall-timeout must be > 0 and --shutdown-timeout >= 0")
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser NAME (e.g. hermes)")
        from inferd.entrypoints.parsers import UnknownParserError
        from inferd.entrypoints.parsers.reasoning.base import get_reasoning_parser
        from inferd.entrypoints.parsers.tools.base import get_tool_parser
        try:  # at start-up: a typo must not turn every chat request into an error
            if self.reasoning_parser:
                get_reasoning_parser(self.reasoning_parser)
            if self.tool_call_parser:
                get_tool_parser(self.tool_call_parser)
        except UnknownParserError as e:
            raise ConfigError(str(e)) from None
        so = self.structured_outputs_config
        unknown = sorted(set(so) - {"backend", "enable_in_reasoning"})
        if unknown:
            raise ConfigError(f"--structured-outputs-config: unsupported key(s) {unknown}; "
                              "supported: backend, enable_in_reasoning")
        if so.get("backend", "auto") not in ("auto", "xgrammar"):
            raise ConfigError(f"--structured-outputs-config.backend {so['backend']!r}: only auto "
                              "and xgrammar are available")
        if not isinstance(so.get("enable_in_reasoning", False), bool):
            raise ConfigError("--structured-outputs-config.enable_in_reasoning must be true or false")
        if bool(self.ssl_keyfile) != bool(self.ssl_certfile):
            raise ConfigError("--ssl-keyfile and --ssl-certfile must be given together")


@dataclass
class ServerState:
    engine: "AsyncLLM"
    config: ServerConfig
    metrics: "PrometheusStatsSink | None" = None
    health: "EngineHealthMonitor" = field(default_factory=lambda: _default_monitor())
    max_num_seqs: int = 256
    """The engine's batch limit: requests beyond it wait (used to estimate the waiting queue)."""
    server_load: int = 0
    """In-flight requests on load-tracked routes (only counted with --enable-server-load-tracking)."""
    created: int = field(default_factory=lambda: int(time.time()))
    shutdown_hook: Callable[[int], None] | None = None
    """Set by server.py: stop serving and exit with this code (the watchdog calls it)."""

    @property
    def model_name(self) -> str:
        return self.config.served_model_names[0]

    @property
    def max_model_len(self) -> int:
        return int(self.engine.model_config.max_model_len)

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        return tuple(self.engine.supported_tasks)

    def check_model(self, name: str | None) -> str:
        """The served name a request addressed; 404 for any other name."""
        if not name:
            return self.model_name
        if name not in self.config.served_model_names:
            raise ModelNotFound(name)
        return name

    def num_waiting(self) -> int:
        """Requests admitted but not yet running: the larger of the last step's count and the
        overflow beyond max_num_seqs (the step count lags a burst of arrivals)."""
        unfinished = self.engine.num_unfinished_seqs()
        stats = self.health.last_stats
        from_stats = stats.num_waiting_reqs if stats is not None else 0
        return min(unfinished, max(from_stats, unfinished - self.max_num_seqs))

    def check_capacity(self, n: int = 1, param: str = "n") -> None:
        """Refuse (429 + Retry-After) when admitting `n` more sequences (an n-choice request is
        n) would overfill the waiting queue. Called before any byte of the response is produced:
        once per POST up front (cheap, before tokenizing), and by the engine client for each
        request right before it registers it (`AsyncLLM.admission`), which is what makes a
        burst of simultaneous requests see each other."""
        limit = self.config.max_num_queued_requests
        if limit is None:
            return
        if n > self.max_num_seqs + limit:
            # Never admissible, however idle the server: a 429 would have clients retry forever.
            raise BadRequest(f"This request needs {n} sequences at once, more than "
                             f"--max-num-seqs ({self.max_num_seqs}) plus "
                             f"--max-num-queued-requests ({limit}) allow.", param=param)
        unfinished = self.engine.num_unfinished_seqs()
        waiting = self.num_waiting()
        free_slots = max(0, self.max_num_seqs - (unfinished - waiting))
        # FCFS: while anyone waits, a newcomer waits too; otherwise only the overflow waits.
        would_wait = n if waiting > 0 else max(0, n - free_slots)
        if would_wait and waiting + would_wait > limit:
            if self.metrics is not None:
                self.metrics.on_request_rejected("queue_full")
            raise Overloaded(f"The server is at capacity ({waiting} requests waiting, limit "
                             f"--max-num-queued-requests {limit}). Retry later.", retry_after=1)

    def request_shutdown(self, exit_code: int) -> None:
        if self.shutdown_hook is None:
            logger.error("No server to stop (exit code %d requested).", exit_code)
            return
        self.shutdown_hook(exit_code)


def _default_monitor() -> "EngineHealthMonitor":
    # Imported here: admin/ imports this module, so a top-level import would be circular.
    from inferd.entrypoints.openai.admin.health import EngineHealthMonitor
    return EngineHealthMonitor(ServerConfig.engine_stall_timeout)


def get_state(request: Any) -> ServerState:
    return request.app.state.inferd
