"""A real `inferd serve` subprocess on a free loopback port, driven over HTTP.

`launch_server(args)` is a context manager: it starts `python -m inferd.cli.main serve MODEL
--host 127.0.0.1 --port <free> ...` in its own process group, waits for /health, yields a
`ServerProcess`, and at exit stops the whole group (server and engine process). Test modules
share one server each through a module-scoped fixture:

    @pytest.fixture(scope="module")
    def server(launch_server):
        with launch_server(["--api-key", KEY]) as s:
            yield s

The model is the session's tiny random Llama (tests/conftest.py `tiny_llama_dir`) with
SmolLM2's real tokenizer and ChatML template, served as `tiny-llama`, with a small KV pool so
start-up stays fast.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import httpx
import pytest

MODEL_NAME = "tiny-llama"
STARTUP_TIMEOUT_S = 240.0
# Flags every test server gets: small and deterministic.
BASE_ARGS = ["--served-model-name", MODEL_NAME, "--dtype", "float32", "--device", "cpu",
             "--seed", "0", "--max-model-len", "512", "--kv-cache-memory", "16MiB",
             "--max-num-seqs", "8"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (Linux)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                # Fields after the parenthesised command: state, ppid, ...
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


class ServerProcess:
    model_name = MODEL_NAME

    def __init__(self, model: str, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.model = model
        self.port = free_port()
        self.log_path = log_path
        self.cmd = [sys.executable, "-m", "inferd.cli.main", "serve", model, "--host", "127.0.0.1",
                    "--port", str(self.port), *BASE_ARGS, *args]
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **(env or {})})

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_for(self, *parts: str) -> str:
        return self.base_url + "/" + "/".join(p.strip("/") for p in parts)

    def engine_pids(self) -> list[int]:
        return [p for p in child_pids(self.proc.pid)
                if b"inferd.engine.core_proc" in Path(f"/proc/{p}/cmdline").read_bytes()]

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during start-up:\n"
                                   f"{self.log_text()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url_for("health"), timeout=2).status_code == 200:
                    return
            time.sleep(0.25)
        raise RuntimeError(f"server not healthy after {timeout:.0f}s:\n{self.log_text()[-4000:]}")

    def client(self, api_key: str = "unused", **kwargs):
        import openai
        return openai.OpenAI(base_url=self.url_for("v1"), api_key=api_key, max_retries=0, **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server, wait for it, then make sure nothing of its group is left."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the engine process, or a hung server
        code = self.proc.wait()
        self._log.close()
        return code


@pytest.fixture(scope="session")
def launch_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Callable[..., contextlib.AbstractContextManager[ServerProcess]]:
    logs = tmp_path_factory.mktemp("server-logs")

    @contextlib.contextmanager
    def launch(args: Sequence[str] = (), env: dict[str, str] | None = None,
               model: str | None = None) -> Iterator[ServerProcess]:
        log_path = logs / f"server-{len(list(logs.iterdir()))}.log"
        server = ServerProcess(model or str(tiny_llama_dir), list(args), log_path, env)
        try:
            server.wait_healthy()
            yield server
        finally:
            server.stop()

    return launch
