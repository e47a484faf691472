"""`inferd serve`: flags → configs → engine → app → uvicorn, with vLLM's startup log.

Lifecycle: the engine starts first (its process loads the weights); the app is built around
it; uvicorn serves until SIGTERM/SIGINT (in-flight requests get `--shutdown-timeout` seconds)
or until the watchdog sees the engine die (exit code 1). The engine is shut down on every path.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from inferd import envs
from inferd.cli.args import engine_config_from_args, server_config_from_args
from inferd.config import DEFAULT_MODEL_NAME, ConfigError, EngineConfig, default_model_path
from inferd.engine.protocol import SchedulerStats
from inferd.engine.stats import FinishedRequestStats, StatsSink
from inferd.entrypoints.openai.state import ServerConfig, ServerState
from inferd.version import __version__

logger = logging.getLogger("inferd.entrypoints.openai.server")

LOG_FORMAT = "(APIServer pid=%(process)d) %(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"


def configure_logging() -> None:
    """inferd's loggers print to stdout in vLLM's layout; uvicorn keeps its own handlers."""
    root = logging.getLogger("inferd")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%m-%d %H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(envs.INFERD_LOGGING_LEVEL)


def resolve_model(ns: argparse.Namespace) -> tuple[str, list[str]]:
    """(model path or id, served names): the positional wins over --model; no model means the
    bundled SmolLM2, served as `SmolLM2-135M-Instruct`."""
    model = ns.model_tag or ns.model
    names = list(ns.served_model_name or [])
    if model is None:
        return default_model_path(), names or [DEFAULT_MODEL_NAME]
    return model, names or [model]


def load_chat_template(value: str | None) -> str | None:
    """--chat-template is inline Jinja when it has braces or a newline, else a file path."""
    if value is None:
        return None
    if any(c in value for c in "{}\n"):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"--chat-template {value!r}: no such file (pass a template file, "
                          "or the template text itself)")
    return path.read_text()


def build_configs(ns: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    model, names = resolve_model(ns)
    ns.served_model_name = names
    if not ns.api_key and envs.INFERD_API_KEY:
        ns.api_key = [k.strip() for k in envs.INFERD_API_KEY.split(",") if k.strip()]
    engine_config = engine_config_from_args(ns, model)
    server_config = server_config_from_args(ns)
    server_config.chat_template = load_chat_template(server_config.chat_template)
    return engine_config, server_config


class LateSink:
    """Handed to the engine before the Prometheus sink exists: its histogram buckets need the
    max_model_len the engine resolves at start-up. No request (hence no stat) precedes that."""

    def __init__(self) -> None:
        self.target: StatsSink | None = None

    def on_scheduler_stats(self, stats: SchedulerStats) -> None:
        if self.target is not None:
            self.target.on_scheduler_stats(stats)

    def on_request_finished(self, stats: FinishedRequestStats) -> None:
        if self.target is not None:
            self.target.on_request_finished(stats)

    def on_request_rejected(self, reason: str) -> None:
        if self.target is not None:
            self.target.on_request_rejected(reason)


def warn_unmarked_reasoning(parser_name: str | None, tokenizer: Any) -> None:
    """A reasoning parser on a tokenizer without a single token for its end marker (a model not
    trained to reason, as a rule): grammars wait for the marker's token sequence, and a model
    that never writes it that way leaves structured outputs and forced tool calls unconstrained.
    vLLM refuses such a pairing; the text-level split still works, so this is a warning."""
    if parser_name is None:
        return
    from inferd.entrypoints.parsers import get_reasoning_parser
    marker = get_reasoning_parser(parser_name)().grammar_start_marker()
    if marker and len(tokenizer.encode(marker, add_special_tokens=False)) != 1:
        logger.warning("--reasoning-parser %s: the tokenizer has no single token for %r; "
                       "structured outputs and forced tool calls start only after the model "
                       "writes it (enable_in_reasoning in --structured-outputs-config applies "
                       "them from the first token)", parser_name, marker)


def start_engine(engine_config: EngineConfig, server_config: ServerConfig) -> ServerState:
    from inferd.engine.async_llm import AsyncLLM
    from inferd.entrypoints.openai.admin.health import EngineHealthMonitor
    from inferd.metrics import PrometheusStatsSink

    health = EngineHealthMonitor(server_config.engine_stall_timeout)
    late = LateSink()
    engine = AsyncLLM.from_config(engine_config, stats_sinks=[health, late])
    metrics = PrometheusStatsSink(
        server_config.served_model_names[0], max_model_len=engine.model_config.max_model_len,
        max_num_batched_tokens=engine_config.scheduler.max_num_batched_tokens or 2048)
    metrics.set_cache_config_info(engine_config.cache, num_gpu_blocks=getattr(engine, "num_blocks", None))
    late.target = metrics
    if server_config.chat_template is None:
        server_config.chat_template = getattr(getattr(engine, "info", None), "chat_template", None)
    warn_unmarked_reasoning(server_config.reasoning_parser, engine.tokenizer)
    if engine.generation_defaults:
        logger.info("Default sampling parameters have been overridden by the model's generation "
                    "config: %s. If this is not intended, relaunch with --generation-config vllm.",
                    engine.generation_defaults)
    state = ServerState(engine=engine, config=server_config, metrics=metrics, health=health,
                        max_num_seqs=engine_config.scheduler.max_num_seqs)
    engine.admission = state.check_capacity
    return state


def server_url(config: ServerConfig) -> str:
    scheme = "https" if config.ssl_certfile else "http"
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"{scheme}://{host}:{config.port}"


def app_routes(app: Any) -> list[Any]:
    """Every route with its path and methods. FastAPI >= 0.16x keeps included routers as
    lazy entries in `app.routes`; `iter_route_contexts` resolves them (older ones don't need to)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:
        return list(app.routes)
    return list(iter_route_contexts(app.routes))


def log_routes(app: Any) -> None:
    logger.info("Available routes are:")
    for route in app_routes(app):
        methods = getattr(route, "methods", None)
        if methods:
            logger.info("Route: %s, Methods: %s", route.path, ", ".join(sorted(methods)))
        else:
            logger.info("Route: %s, Endpoint: %s", route.path, getattr(route, "name", "?"))


async def serve_http(state: ServerState) -> int:
    """Run uvicorn until a signal or the watchdog stops it; returns the process exit code."""
    import uvicorn

    from inferd.entrypoints.openai.app import build_app

    config = state.config
    app = build_app(state)
    logger.info("Starting inferd API server on %s", server_url(config))
    log_routes(app)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.uvicorn_log_level,
        access_log=not config.disable_uvicorn_access_log, ssl_keyfile=config.ssl_keyfile,
        ssl_certfile=config.ssl_certfile, timeout_graceful_shutdown=int(config.shutdown_timeout),
        # h11 even where httptools is installed (uvicorn would pick it): uvicorn caps an h11
        # request's headers (h11_max_incomplete_event_size, 16 KiB) and answers 400 past it;
        # its httptools protocol buffers headers of any size (a 20 MB header was read whole and
        # served). httptools took ~10% less API CPU under load; uvloop ~3%, so neither is used.
        http="h11", timeout_keep_alive=5))
    exit_code = 0

    def stop(code: int) -> None:
        nonlocal exit_code
        exit_code = code
        server.should_exit = True

    state.shutdown_hook = stop
    # uvicorn re-raises the signal that stopped it once it is done; with the default handlers
    # that would kill us before the engine is shut down, so the handlers only note it.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)
    await server.serve()
    if not server.started:
        return 1  # e.g. the port was taken: uvicorn logged why
    return exit_code


def run_server(args: argparse.Namespace, non_default_args: dict[str, Any] | None = None) -> int:
    """Serve until stopped; the return value is the process exit code. ConfigError propagates
    (the CLI prints it as a usage error)."""
    configure_logging()
    engine_config, server_config = build_configs(args)
    logger.info("inferd server version %s, serving model %s", __version__, engine_config.model.model)
    logger.info("non-default args: %s", non_default_args or {})
    from inferd.engine.async_llm import EngineDeadError
    state = None
    try:
        state = start_engine(engine_config, server_config)
        logger.info("Supported tasks: %s", list(state.supported_tasks))
        return asyncio.run(serve_http(state))
    except EngineDeadError as e:  # the engine process failed to start (its log says why)
        logger.error("%s", e)
        return 1
    finally:
        if state is not None:
            state.engine.shutdown()
            logger.info("Engine stopped.")
