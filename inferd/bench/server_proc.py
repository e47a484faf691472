"""Cold start and memory of a server: launch it, time it to its first healthy answer, and sample
the resident memory of its whole process tree while the benchmark runs.

Memory is summed over the tree because the servers compared here split work across processes
(inferd's engine process, vLLM's engine core and workers): the parent alone would flatter them.
RSS counts pages shared between processes once per process, the same convention the peers' numbers
in BENCHMARKS.md used.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx

HEALTH_POLL_S = 0.1
STOP_GRACE_S = 30.0


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (psutil when installed, else /proc on Linux)."""
    try:
        import psutil
    except ImportError:
        return _proc_tree(pid)
    try:
        root = psutil.Process(pid)
        return [pid] + [c.pid for c in root.children(recursive=True)]
    except psutil.Error:
        return []


def tree_rss_bytes(pid: int) -> int:
    """Resident memory summed over `pid`'s process tree; processes that exit meanwhile count 0."""
    total = 0
    for p in process_tree(pid):
        total += _rss_bytes(p)
    return total


def _rss_bytes(pid: int) -> int:
    try:
        import psutil
    except ImportError:
        with contextlib.suppress(OSError, ValueError, IndexError):
            # statm's second field is resident pages.
            pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE")
        return 0
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def _proc_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name is parenthesised and may hold spaces: fields follow the last ')'.
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo and len(tree) < 100_000:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree if Path(f"/proc/{pid}").exists() else []


class RSSSampler:
    """Samples a process tree's summed RSS on a background thread and keeps the peak.

    A thread, not an asyncio task: the event loop is busy timing streams, and a sample that waits
    for the loop would both miss peaks and add jitter to the measurements.
    """

    def __init__(self, pid: int, interval_s: float = 0.25, max_duration_s: float = 4 * 3600
                 ) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.max_samples = int(max_duration_s / interval_s) + 1
        self.peak_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RSSSampler:
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop sampling; the peak in bytes."""
        self._stop.set()
        self._thread.join(timeout=10)
        return self.peak_bytes

    def _run(self) -> None:
        while self.samples < self.max_samples:
            self.peak_bytes = max(self.peak_bytes, tree_rss_bytes(self.pid))
            self.samples += 1
            if self._stop.wait(self.interval_s):
                break


def split_env_assignments(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading `NAME=value` words as environment, as a shell would take them (BENCHMARKS.md starts
    vLLM as `VLLM_CPU_KVCACHE_SPACE=4 ... python -m ...`); the command runs without a shell."""
    env: dict[str, str] = {}
    for i, word in enumerate(argv):
        name, eq, value = word.partition("=")
        if not eq or not name.replace("_", "a").isalnum() or name[0].isdigit():
            return env, argv[i:]
        env[name] = value
    return env, []


class ServerStartError(RuntimeError):
    """The launched server exited or never answered /health with 200."""


class LaunchedServer:
    """A server command started by the benchmark, in its own process group so that stopping it
    stops its children too. Its output goes to a log file, shown when start-up fails."""

    def __init__(self, command: str) -> None:
        self.env, self.argv = split_env_assignments(shlex.split(command))
        if not self.argv:
            raise ValueError("--measure-cold-start needs a command")
        self.log = tempfile.NamedTemporaryFile(prefix="inferd-bench-server-", suffix=".log",
                                               delete=False)
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     env={**os.environ, **self.env})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_healthy(self, base_url: str, timeout_s: float) -> float:
        """Seconds from launch to the first 200 from /health (from /v1/models on servers that
        have no /health route, such as llama-cpp-python's: a 404 there); raises if it exits
        or times out."""
        deadline = self.started_at + timeout_s
        url = base_url.rstrip("/") + "/health"
        for _ in range(int(timeout_s / HEALTH_POLL_S) + 1):
            if self.proc.poll() is not None:
                raise ServerStartError(f"server exited with {self.proc.returncode} before it was "
                                   f"healthy; its log:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                status = httpx.get(url, timeout=2.0, trust_env=False).status_code
                if status == 404 and url.endswith("/health"):
                    url = base_url.rstrip("/") + "/v1/models"
                    status = httpx.get(url, timeout=2.0, trust_env=False).status_code
                if status == 200:
                    return time.perf_counter() - self.started_at
            if time.perf_counter() >= deadline:
                break
            time.sleep(HEALTH_POLL_S)
        raise ServerStartError(f"server not healthy after {timeout_s:g}s; its log:\n"
                               f"{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def stop(self) -> int | None:
        """SIGTERM the group, wait, then SIGKILL whatever of it is left. The exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_GRACE_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # children that outlived the parent
        code = self.proc.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)  # start-up failures quote it in their error
        return code
