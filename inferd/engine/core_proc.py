"""The engine process: EngineCore's step loop behind two ZMQ sockets.

Started by `AsyncLLM` as `python -m inferd.engine.core_proc IN_ADDR OUT_ADDR`, with the
EngineConfig as JSON on stdin. Messages are msgspec-encoded structs; nothing is pickled.
Inputs: [type byte, payload]. Outputs: an EngineReady handshake, then EngineCoreOutputs.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time

import msgspec
import zmq

from inferd.config import EngineConfig
from inferd.engine.protocol import (EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest,
                                    EngineCoreRequestType, FinishReason)

logger = logging.getLogger("inferd.engine")


class EngineReady(msgspec.Struct):
    max_model_len: int
    num_blocks: int
    block_size: int
    pid: int
    error: str | None = None


def encode_config(config: EngineConfig) -> bytes:
    return msgspec.json.encode(config)


def decode_config(data: bytes) -> EngineConfig:
    return msgspec.json.decode(data, type=EngineConfig)


class EngineCoreProc:
    def __init__(self, config: EngineConfig, in_addr: str, out_addr: str, ready_addr: str):
        self.ctx = zmq.Context()
        self.ctx.setsockopt(zmq.LINGER, 0)  # never block exit on unsent outputs (async_llm.py)
        self.inp = self.ctx.socket(zmq.PULL)
        self.inp.connect(in_addr)
        self.out = self.ctx.socket(zmq.PUSH)
        self.out.connect(out_addr)
        self.enc = msgspec.msgpack.Encoder()
        self.add_dec = msgspec.msgpack.Decoder(EngineCoreRequest)
        self.abort_dec = msgspec.msgpack.Decoder(list[str])
        ready = self.ctx.socket(zmq.PUSH)
        ready.connect(ready_addr)
        try:
            try:
                from inferd.engine.core import EngineCore
                self.core = EngineCore(config)
            except Exception as e:  # report start-up failures (bad flags, bad model) to the frontend
                logger.error("engine failed to start: %s", e)
                ready.send(msgspec.msgpack.encode(EngineReady(0, 0, 0, os.getpid(), error=str(e))))
                raise SystemExit(1)
            ready.send(msgspec.msgpack.encode(EngineReady(
                self.core.max_model_len, self.core.num_blocks, config.cache.block_size, os.getpid())))
        finally:
            ready.close(linger=2000)
        self.running = True
        self.aborted = False  # an abort arrived since the last output

    def _handle(self, frames: list[bytes]) -> list:
        """Apply one message. A bad message fails only its own request, never the loop."""
        early: list[EngineCoreOutput] = []
        try:
            kind = EngineCoreRequestType(frames[0][0])
            if kind == EngineCoreRequestType.ADD:
                req = self.add_dec.decode(frames[1])
                try:
                    out = self.core.add_request(req)
                except Exception:
                    logger.exception("request %s could not be added", req.request_id)
                    out = EngineCoreOutput(req.request_id, [], finish_reason=FinishReason.ABORT)
                if out is not None:
                    early.append(out)
            elif kind == EngineCoreRequestType.ABORT:
                self.core.abort(self.abort_dec.decode(frames[1]))
                self.aborted = True
            elif kind == EngineCoreRequestType.SHUTDOWN:
                self.running = False
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, IndexError) as e:
            logger.error("dropped a malformed engine message: %s", e)
        return early

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.inp, zmq.POLLIN)
        while self.running:
            # Block while idle; while busy, only drain what has already arrived.
            timeout = 0 if self.core.has_unfinished() else 1000
            early = []
            while poller.poll(timeout):
                early += self._handle(self.inp.recv_multipart())
                timeout = 0
                if not self.running:
                    return
            if self.core.has_unfinished():
                outs = self.core.step()
                outs.outputs = early + outs.outputs
                self.out.send(self.enc.encode(outs))
            elif early or self.aborted:
                # Nothing to step, but gauges must still drop to idle after aborts.
                self.out.send(self.enc.encode(EngineCoreOutputs(
                    early, time.monotonic(), self.core.scheduler.make_stats())))
            self.aborted = False

    def close(self) -> None:
        self.inp.close(linger=0)
        self.out.close(linger=0)
        self.ctx.term()


def _exit_with_parent() -> None:
    """If the API server dies without shutting us down (SIGKILL), don't linger as an orphan."""
    import threading
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main() -> None:
    from inferd import envs
    logging.basicConfig(level=envs.INFERD_LOGGING_LEVEL,
                        format="(EngineCore pid=%(process)d) %(levelname)s %(asctime)s %(message)s",
                        datefmt="%m-%d %H:%M:%S")
    in_addr, out_addr, ready_addr = sys.argv[1], sys.argv[2], sys.argv[3]
    config = decode_config(sys.stdin.buffer.read())
    # The API server owns shutdown; Ctrl-C in a terminal must not kill the engine mid-step first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _exit_with_parent()
    proc = EngineCoreProc(config, in_addr, out_addr, ready_addr)
    try:
        proc.run()
    except Exception as e:
        logger.exception("engine loop failed")
        proc.out.send(proc.enc.encode(EngineCoreOutputs([], time.monotonic(), engine_error=str(e))))
        raise SystemExit(1)
    finally:
        proc.close()


if __name__ == "__main__":
    main()
