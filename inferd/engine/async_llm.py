"""The API process's engine client: starts the engine process and streams its outputs.

The engine runs in its own process so the step loop never shares a GIL with HTTP handling.
Requests go out over a ZMQ PUSH socket; one asyncio task reads engine outputs, runs them
through the OutputProcessor and wakes each request's queue.
"""
from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from typing import AsyncIterator, Callable

import msgspec
import zmq
import zmq.asyncio

from inferd.config import EngineConfig
from inferd.engine.core_proc import EngineReady, encode_config
from inferd.engine.model_info import read_model_info
from inferd.engine.output_processor import OutputProcessor
from inferd.engine.protocol import EngineCoreOutputs, EngineCoreRequestType, SchedulerStats
from inferd.engine.stats import StatsSink
from inferd.outputs import PoolingRequestOutput, RequestOutput
from inferd.sampling_params import PoolingParams, SamplingParams

logger = logging.getLogger("inferd.engine")

STARTUP_TIMEOUT_S = 600.0
# Work pending but no engine output for this long: the engine is stuck, /health says so.
STALL_TIMEOUT_S = 120.0


class EngineDeadError(RuntimeError):
    pass


class AsyncLLM:
    def __init__(self, config: EngineConfig, stats_sinks: list[StatsSink] = ()):
        self.config = config
        self.stats_sinks = list(stats_sinks)
        self._ipc_dir = tempfile.mkdtemp(prefix="inferd-")
        self._ctx = zmq.asyncio.Context()
        # Sockets never wait for unsent messages: a context garbage-collected with a socket
        # still open (a constructor that raised, a client never shut down) is destroyed, and
        # with ZMQ's default infinite linger that blocked the collecting thread forever once a
        # message was queued for an engine process that had gone.
        self._ctx.setsockopt(zmq.LINGER, 0)
        self._in_addr = f"ipc://{self._ipc_dir}/in"
        self._out_addr = f"ipc://{self._ipc_dir}/out"
        self._ready_addr = f"ipc://{self._ipc_dir}/ready"
        self._to_engine = self._ctx.socket(zmq.PUSH)
        self._to_engine.bind(self._in_addr)
        self._from_engine = self._ctx.socket(zmq.PULL)
        self._from_engine.bind(self._out_addr)
        # The engine process starts first: its imports and weight loading (most of the cold
        # start) overlap with this process reading the model's metadata and tokenizer.
        self._proc = self._spawn_engine()
        try:
            self.info = read_model_info(config.model)
            self.tokenizer = self.info.load_tokenizer()
        except BaseException:
            self._proc.kill()
            self._proc.wait()
            self._close_ipc()
            raise
        self.hf_config = self.info.hf_config
        self.generation_defaults = dict(self.info.generation_defaults)
        try:
            ready = self._wait_ready()
        except BaseException:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._close_ipc()
            raise
        self.max_model_len = ready.max_model_len
        self.num_blocks = ready.num_blocks
        config.model.max_model_len = ready.max_model_len
        self.model_config = config.model
        self.processor = OutputProcessor(self.tokenizer, self.stats_sinks)
        # Called with a request's sequence count just before it is registered; raises to
        # refuse it (the server's --max-num-queued-requests).
        self.admission: Callable[[int], None] | None = None
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(EngineCoreOutputs)
        self._queues: dict[str, asyncio.Queue] = {}
        self._reader: asyncio.Task | None = None
        self._dead: str | None = None
        self.last_stats = SchedulerStats()
        self._last_output = time.monotonic()

    @classmethod
    def from_config(cls, config: EngineConfig, stats_sinks: list[StatsSink] = ()) -> "AsyncLLM":
        return cls(config, stats_sinks)

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        return self.info.supported_tasks

    # --- process management --------------------------------------------------------------------
    def _spawn_engine(self) -> subprocess.Popen:
        env = dict(os.environ)
        if "OMP_WAIT_POLICY" not in env:
            # libgomp's idle threads spin ~300k iterations after each parallel op by default.
            # Here they spin on the cores the API process needs, and each time it runs, an
            # engine thread is descheduled and the next parallel op waits for it. A short spin
            # measured +15-20% embeddings/s over HTTP on 2 cores, batch-1 decode unchanged.
            env.setdefault("GOMP_SPINCOUNT", "10000")
        proc = subprocess.Popen([sys.executable, "-m", "inferd.engine.core_proc", self._in_addr,
                                 self._out_addr, self._ready_addr], stdin=subprocess.PIPE, env=env)
        proc.stdin.write(encode_config(self.config))
        proc.stdin.close()
        return proc

    def _wait_ready(self) -> EngineReady:
        """Block until the engine reports ready on its own handshake socket (or dies)."""
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.PULL)
        sock.bind(self._ready_addr)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not sock.poll(200):
                if self._proc.poll() is not None:
                    raise EngineDeadError(f"the engine process exited with code {self._proc.returncode}"
                                          " during start-up (see its log above)")
                if time.monotonic() > deadline:
                    raise EngineDeadError(f"the engine did not start within {STARTUP_TIMEOUT_S:.0f} s")
            ready = msgspec.msgpack.decode(sock.recv(), type=EngineReady)
        finally:
            sock.close(linger=0)
        if ready.error:
            self._proc.wait(timeout=10)
            raise EngineDeadError(f"engine failed to start: {ready.error}")
        return ready

    async def start(self) -> None:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_outputs())

    async def _read_outputs(self) -> None:
        try:
            while True:
                if await self._from_engine.poll(1000) == 0:
                    if self._proc.poll() is not None:
                        self._fail(f"engine process exited with code {self._proc.returncode}")
                        return
                    continue
                outs = self._dec.decode(await self._from_engine.recv())
                self._last_output = time.monotonic()
                if outs.engine_error:
                    self._fail(f"engine error: {outs.engine_error}")
                    return
                if outs.scheduler_stats is not None:
                    self.last_stats = outs.scheduler_stats
                    for s in self.stats_sinks:
                        s.on_scheduler_stats(outs.scheduler_stats)
                stop = self.processor.process(outs.outputs)
                if stop:
                    await self._send(EngineCoreRequestType.ABORT, stop)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never leave requests hanging on a broken reader
            logger.exception("output reader failed")
            self._fail(f"output reader failed: {e}")

    def _fail(self, why: str) -> None:
        self._dead = why
        logger.error("%s", why)
        for q in self._queues.values():
            q.put_nowait(EngineDeadError(why))

    async def _send(self, kind: EngineCoreRequestType, payload) -> None:
        await self._to_engine.send_multipart([bytes([kind]), self._enc.encode(payload)])

    # --- health ---------------------------------------------------------------------------------
    @property
    def errored(self) -> bool:
        return self._dead is not None or self._proc.poll() is not None

    def stalled(self) -> bool:
        return (self.num_unfinished_requests() > 0
                and time.monotonic() - self._last_output > STALL_TIMEOUT_S)

    async def check_health(self) -> None:
        if self.errored:
            raise EngineDeadError(self._dead or "engine process is not running")
        if self.stalled():
            raise EngineDeadError("engine made no progress while requests are pending")

    def num_unfinished_requests(self) -> int:
        return len(self.processor.parents)

    def num_unfinished_seqs(self) -> int:
        return self.processor.num_unfinished_seqs()

    # --- requests --------------------------------------------------------------------------------
    async def _submit(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                      params: SamplingParams | PoolingParams, cache_salt: str | None) -> asyncio.Queue:
        await self.start()
        if self.errored:
            raise EngineDeadError(self._dead or "engine process is not running")
        if self.admission is not None:
            # Checked and registered with no await between: requests arriving together cannot
            # all see the same free queue.
            self.admission(1 if isinstance(params, PoolingParams) else params.n)
        q: asyncio.Queue = asyncio.Queue()
        if not self.processor.parents:
            self._last_output = time.monotonic()  # idle until now is not a stall
        reqs = self.processor.add_request(request_id, prompt, prompt_token_ids, params,
                                          self.info.eos_token_ids, q.put_nowait, cache_salt)
        self._queues[request_id] = q
        try:
            for r in reqs:
                await self._send(EngineCoreRequestType.ADD, r)
        except BaseException:  # never leave a registered request that the engine never saw
            self._queues.pop(request_id, None)
            await self.abort(request_id)
            raise
        return q

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None, prompt: str | None = None,
                       cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        request_id = request_id or uuid.uuid4().hex
        q = await self._submit(request_id, prompt, prompt_token_ids, params, cache_salt)
        finished = False
        try:
            while True:
                out = await q.get()
                if isinstance(out, Exception):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:  # client went away, or an error: free the engine's blocks
                await self.abort(request_id)

    async def encode(self, prompt_token_ids: list[int], params: PoolingParams,
                     request_id: str | None = None) -> PoolingRequestOutput:
        request_id = request_id or uuid.uuid4().hex
        q = await self._submit(request_id, None, prompt_token_ids, params, None)
        done = False
        try:
            out = await q.get()
            if isinstance(out, Exception):
                raise out
            done = True
            return out
        finally:
            self._queues.pop(request_id, None)
            if not done:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        ids = self.processor.abort(request_id)
        if ids and not self.errored:
            await self._send(EngineCoreRequestType.ABORT, ids)

    def shutdown(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._proc.poll() is None:
            try:
                self._to_engine.send_multipart([bytes([EngineCoreRequestType.SHUTDOWN]), b""],
                                               flags=zmq.NOBLOCK)
            except Exception:
                pass
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._close_ipc()

    def _close_ipc(self) -> None:
        self._to_engine.close(linger=0)
        self._from_engine.close(linger=0)
        self._ctx.term()
        import shutil
        shutil.rmtree(self._ipc_dir, ignore_errors=True)
