"""Engine liveness: dead (the engine process failed) or stalled (work pending, no step progress).

`EngineHealthMonitor` is a `StatsSink`: every engine step and every finished request counts as
progress. A stall is only meaningful while requests are pending, so the idle time before a
request arrives is never counted: the watchdog (`watch_engine`) refreshes the mark each tick
while the engine is idle.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Callable

from inferd import envs
from inferd.engine.protocol import SchedulerStats
from inferd.engine.stats import FinishedRequestStats

if TYPE_CHECKING:
    from inferd.entrypoints.openai.state import ServerState

logger = logging.getLogger(__name__)

WATCHDOG_INTERVAL_S = 1.0


class EngineHealthMonitor:
    def __init__(self, stall_timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self.stall_timeout_s = stall_timeout_s
        self._clock = clock
        self._last_progress = clock()
        self.last_stats: SchedulerStats | None = None  # the latest step's numbers (queue admission)
        self.last_reason: str | None = None  # what /health last reported, to log only changes

    # StatsSink
    def on_scheduler_stats(self, stats: SchedulerStats) -> None:
        self.last_stats = stats
        self._last_progress = self._clock()

    def on_request_finished(self, stats: FinishedRequestStats) -> None:
        self._last_progress = self._clock()

    def on_request_rejected(self, reason: str) -> None:
        pass

    def stalled(self, num_unfinished: int) -> bool:
        """True when requests are pending and no step has completed for `stall_timeout_s`."""
        now = self._clock()
        if num_unfinished == 0:
            self._last_progress = now
            return False
        return now - self._last_progress > self.stall_timeout_s


async def unhealthy_reason(state: "ServerState") -> str | None:
    """None when the engine is serving; otherwise a short reason for the log."""
    engine = state.engine
    # `errored` rather than `check_health()`: the engine's own stall test counts idle time
    # before a request arrives as no progress; the monitor here does not.
    if engine.errored:
        return "the engine has died"
    if state.health.stalled(engine.num_unfinished_requests()):
        return f"the engine has made no progress for over {state.health.stall_timeout_s:.0f}s"
    return None


async def watch_engine(state: "ServerState", interval_s: float = WATCHDOG_INTERVAL_S) -> None:
    """Runs for the app's lifetime: stops the server (exit code 1) once the engine has died."""
    while True:
        await asyncio.sleep(interval_s)
        if state.engine.errored:
            if envs.INFERD_KEEP_ALIVE_ON_ENGINE_DEATH:
                logger.error("The engine has died; INFERD_KEEP_ALIVE_ON_ENGINE_DEATH keeps the "
                             "server up with /health at 503.")
            else:
                logger.error("The engine has died; shutting down the server.")
                state.request_shutdown(exit_code=1)
            return
        state.health.stalled(state.engine.num_unfinished_requests())  # keep the idle mark fresh
