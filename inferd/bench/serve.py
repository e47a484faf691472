"""Serving benchmark: an asyncio load generator for any OpenAI-compatible server.

    python benchmarks/serve.py --workload ii [--base-url http://127.0.0.1:8000] [--json-out r.json]
    inferd bench serve --num-requests 64 --concurrency 16 --input-len 128 --output-len 128 \\
        --ignore-eos
    python benchmarks/serve.py --workload i --base-url http://127.0.0.1:8000 \\
        --measure-cold-start "inferd serve SmolLM2 --host 127.0.0.1 --port 8000"

A fixed number of requests is run by `--concurrency` workers, each sending its next request as soon
as its last one ends (a closed loop, as in BENCHMARKS.md's workloads). Every request streams, and
is timed chunk by chunk (inferd/bench/client.py); the report gives throughput over the run's wall
time and TTFT / TPOT / ITL distributions (inferd/bench/stats.py). All traffic goes to --base-url.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Awaitable, Callable, Sequence

import httpx

from inferd.bench import prompts as prompt_gen
from inferd.bench.client import ENDPOINT_PATHS, RequestSpec, send_request, send_request_aiohttp
from inferd.bench.report import format_report, plot, write_json
from inferd.bench.server_proc import LaunchedServer, RSSSampler, ServerStartError
from inferd.bench.stats import RequestResult, summarize


@dataclass(frozen=True)
class Workload:
    num_requests: int
    concurrency: int
    input_len: int
    output_len: int


# BENCHMARKS.md: (i) latency, (ii) and (iii) throughput. Explicit flags override a preset's fields.
WORKLOADS = {"i": Workload(8, 1, 128, 128), "ii": Workload(64, 16, 128, 128),
             "iii": Workload(128, 64, 256, 64)}
DEFAULT_WORKLOAD = WORKLOADS["i"]
WARMUP_OUTPUT_LEN = 16  # enough to take every code path once, short enough to be cheap


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inferd bench serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--base-url", default="http://127.0.0.1:8000", help="The server; all traffic goes here.")
    add("--model", help="Model name to request (default: the first id from /v1/models).")
    add("--endpoint", choices=sorted(ENDPOINT_PATHS), default="completions")
    add("--workload", choices=sorted(WORKLOADS),
        help="A BENCHMARKS.md preset: (i) 8 req, conc 1, 128/128; (ii) 64 req, conc 16, 128/128; "
             "(iii) 128 req, conc 64, 256/64. Implies --ignore-eos.")
    add("--num-requests", type=int, help=f"default {DEFAULT_WORKLOAD.num_requests}")
    add("--concurrency", type=int, help=f"default {DEFAULT_WORKLOAD.concurrency}")
    add("--input-len", type=int, help=f"prompt tokens; default {DEFAULT_WORKLOAD.input_len}")
    add("--output-len", type=int, help=f"max_tokens; default {DEFAULT_WORKLOAD.output_len}")
    add("--stream", action=argparse.BooleanOptionalAction, default=True)
    add("--token-prompts", action=argparse.BooleanOptionalAction, default=None,
        help="Send prompts as token-id lists (exact length; default for completions) or as random "
             "words fitted with the server's /tokenize (--no-token-prompts; always for chat).")
    add("--token-id-range", type=int, nargs=2, default=(1000, 30000), metavar=("LO", "HI"))
    add("--tokenizer", help="Local tokenizer (HF dir or .gguf) to fit word prompts when the server "
                            "has no tokenize endpoint.")
    add("--temperature", type=float, default=0.0)
    add("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
        help="Send ignore_eos and min_tokens = max_tokens, so every request yields exactly "
             "--output-len tokens (default: on with --workload, else off).")
    add("--usage-stats", action=argparse.BooleanOptionalAction, default=True,
        help="Send stream_options {include_usage, continuous_usage_stats}.")
    add("--api-key", help="Sent as 'Authorization: Bearer KEY'.")
    add("--seed", type=int, default=None,
        help="Seed for the random prompts (reported). Default: a fresh one per run, since a "
             "rerun of the same prompts against the same server is served partly from its "
             "prefix cache; pass the reported seed to repeat a run exactly.")
    add("--warmup", type=int, default=1, help="Unmeasured requests sent first.")
    add("--http-client", choices=("aiohttp", "httpx"), default=None,
        help="Transport for the measured requests (default: aiohttp when installed; it takes "
             "~1/3 of httpx's CPU, which the client shares with the server it measures).")
    add("--request-timeout", type=float, default=600.0, help="Seconds, per request, end to end.")
    add("--max-duration", type=float, default=3600.0,
        help="Seconds for the measured run; requests not started by then are not sent.")
    add("--json-out", metavar="FILE", help="Write settings, summary and every request's timings.")
    add("--plot", metavar="FILE.png",
        help="TTFT / ITL histograms and a timeline (needs matplotlib).")
    add("--label", help="A name for this run in the table and the JSON.")
    add("--matmul-probe", action=argparse.BooleanOptionalAction, default=True,
        help="Time a 1024^3 fp32 matmul first: the machines are noisy, so record their speed.")
    add("--measure-cold-start", metavar="CMD",
        help="Launch this server command (no shell; leading NAME=value words set its environment), "
             "time it to /health 200, benchmark it, then stop its process group.")
    add("--cold-start-timeout", type=float, default=900.0)
    add("--server-pid", type=int, help="Sample the peak RSS of this running server's process tree.")
    add("--rss-interval", type=float, default=0.25, help="Seconds between RSS samples.")
    return p


def resolve_args(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fill the workload fields from the preset (or the defaults) and check the combination."""
    preset = WORKLOADS[ns.workload] if ns.workload else DEFAULT_WORKLOAD
    for name in ("num_requests", "concurrency", "input_len", "output_len"):
        if getattr(ns, name) is None:
            setattr(ns, name, getattr(preset, name))
        if getattr(ns, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(ns, name)}")
    if ns.ignore_eos is None:
        ns.ignore_eos = ns.workload is not None
    if ns.seed is None:  # a fresh one per run (see --seed); reported with the run
        ns.seed = random.SystemRandom().randrange(1 << 31)
    if ns.http_client is None:
        ns.http_client = "aiohttp" if _has_aiohttp() else "httpx"
    if ns.token_prompts is None:
        ns.token_prompts = ns.endpoint == "completions"
    if ns.token_prompts and ns.endpoint == "chat":
        parser.error("--token-prompts needs --endpoint completions: chat messages are text")
    lo, hi = ns.token_id_range
    if not 0 <= lo < hi:
        parser.error(f"--token-id-range needs 0 <= LO < HI, got {lo} {hi}")
    if ns.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {ns.warmup}")
    if ns.measure_cold_start and ns.server_pid:
        parser.error("--measure-cold-start and --server-pid are exclusive: the first launches the "
                     "server whose tree is measured")
    return ns


def _has_aiohttp() -> bool:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return False
    return True


def matmul_gflops() -> float | None:
    """fp32 GFLOP/s of a 1024^3 matmul, the best of five; None without numpy."""
    try:
        import numpy as np
    except ImportError:
        return None
    a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
    a @ a  # first call pays for thread start-up
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * 1024**3 / best / 1e9


async def resolve_model(client: httpx.AsyncClient, model: str | None) -> tuple[str, int | None]:
    """The model to request and the server's max_model_len when /v1/models tells it."""
    try:
        resp = await client.get("/v1/models")
        cards = resp.json().get("data", []) if resp.status_code == 200 else []
    except (httpx.HTTPError, ValueError):
        cards = []
    card = next((c for c in cards if model is None or c.get("id") == model), None)
    if model is None and card is None:
        raise SystemExit(f"could not list models at {client.base_url}/v1/models; pass --model")
    return (model or card["id"]), (card or {}).get("max_model_len")


async def build_prompts(client: httpx.AsyncClient, ns: argparse.Namespace, model: str, num: int
                        ) -> tuple[list[str | list[int]], str]:
    """`num` prompts of --input-len tokens, and a line saying how their length was made."""
    # The length is part of the seed: with the seed alone, the prompts of a 256-token workload
    # would be those of a 128-token one run with the same seed, two by two, and a server that
    # had just served one would answer the other partly from its prefix cache (serve_pair runs
    # every workload of a round with one seed: 4096 of (iii)'s 32768 prompt tokens were hits).
    rng = random.Random(f"{ns.seed}:{ns.input_len}")
    if ns.token_prompts:
        ids = prompt_gen.token_id_prompts(num, ns.input_len, rng, tuple(ns.token_id_range))
        return list(ids), "token ids (exact)"
    chat = ns.endpoint == "chat"
    counter = (prompt_gen.local_token_counter(ns.tokenizer, chat) if ns.tokenizer
               else await prompt_gen.server_token_counter(client, model, chat))
    count, how = counter if counter else (None, "one token per word (approximate: no tokenize "
                                                "endpoint; try --tokenizer)")
    texts, lengths = await prompt_gen.word_prompts(num, ns.input_len, rng, count)
    off = sum(1 for n in lengths if n >= 0 and n != ns.input_len)
    if off:
        how += f"; {off} prompts missed the length by a token or more"
    return list(texts), f"random words fitted to {how}"


async def run_load(send: Callable[..., Awaitable[RequestResult]], spec: RequestSpec,
                   prompts: Sequence[Any], concurrency: int, max_duration: float
                   ) -> tuple[list[RequestResult], float]:
    """Send every prompt with `concurrency` requests in flight (a closed loop) through
    `send(spec, prompt, index, run_start)`; the results in prompt order and the wall time from
    the first send to the last answer."""
    results: list[RequestResult] = []
    next_index = 0
    start = time.perf_counter()
    deadline = start + max_duration

    async def worker() -> None:
        nonlocal next_index
        # Bounded by the prompt count, and by the deadline for starting another request.
        while next_index < len(prompts) and time.perf_counter() < deadline:
            i = next_index
            next_index += 1
            results.append(await send(spec, prompts[i], i, start))

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
    duration = time.perf_counter() - start
    return sorted(results, key=lambda r: r.index), duration


async def benchmark(ns: argparse.Namespace) -> tuple[dict[str, Any], list[RequestResult]]:
    """Warm up, run the measured load, and build the report (less the server measurements)."""
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    limits = httpx.Limits(max_connections=ns.concurrency + 4,
                          max_keepalive_connections=ns.concurrency + 4)
    # trust_env=False: no proxy from the environment; traffic goes to --base-url and nowhere else.
    async with httpx.AsyncClient(base_url=ns.base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(ns.request_timeout, connect=30.0),
                                 trust_env=False) as client:
        model, max_model_len = await resolve_model(client, ns.model)
        if max_model_len is not None and ns.input_len + ns.output_len > max_model_len:
            print(f"warning: {ns.input_len} + {ns.output_len} tokens exceed the server's "
                  f"max_model_len {max_model_len}", file=sys.stderr)
        all_prompts, prompt_note = await build_prompts(client, ns, model,
                                                       ns.num_requests + ns.warmup)
        spec = RequestSpec(endpoint=ns.endpoint, model=model, max_tokens=ns.output_len,
                           temperature=ns.temperature, stream=ns.stream, ignore_eos=ns.ignore_eos,
                           usage_stats=ns.usage_stats, timeout_s=ns.request_timeout)
        if ns.http_client == "aiohttp":
            results, duration, warm_errors = await _load_aiohttp(ns, headers, spec, all_prompts)
        else:
            results, duration, warm_errors = await _load(partial(send_request, client), ns,
                                                         spec, all_prompts)
    run = run_settings(ns, model, max_model_len, prompt_note)
    run.update(warmup_errors=warm_errors[:5], not_sent=ns.num_requests - len(results))
    # With ignore_eos every request should reach --output-len: a peer that ignores both
    # ignore_eos and min_tokens shows up here rather than as a silently easier workload.
    short = sum(1 for r in results if r.ok and r.output_tokens < ns.output_len)
    summary = summarize(results, duration, ns.input_len)
    return {"run": run, "summary": summary, "short_requests": short}, results


async def _load(send: Callable[..., Awaitable[RequestResult]], ns: argparse.Namespace,
                spec: RequestSpec, all_prompts: list
                ) -> tuple[list[RequestResult], float, list[str]]:
    """The warm-up requests, then the measured ones, through `send`."""
    warm_errors: list[str] = []
    if ns.warmup:
        warm_spec = replace(spec, max_tokens=min(ns.output_len, WARMUP_OUTPUT_LEN))
        warm, _ = await run_load(send, warm_spec, all_prompts[ns.num_requests:],
                                 ns.concurrency, ns.max_duration)
        warm_errors = [r.error for r in warm if r.error]
    results, duration = await run_load(send, spec, all_prompts[:ns.num_requests],
                                       ns.concurrency, ns.max_duration)
    return results, duration, warm_errors


async def _load_aiohttp(ns: argparse.Namespace, headers: dict[str, str], spec: RequestSpec,
                        all_prompts: list) -> tuple[list[RequestResult], float, list[str]]:
    import aiohttp
    # trust_env=False (aiohttp's default): no proxy from the environment.
    connector = aiohttp.TCPConnector(limit=ns.concurrency + 4)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30.0)
    async with aiohttp.ClientSession(headers=headers, connector=connector,
                                     timeout=timeout) as session:
        return await _load(partial(send_request_aiohttp, session, ns.base_url.rstrip("/")), ns,
                           spec, all_prompts)


def run_settings(ns: argparse.Namespace, model: str, max_model_len: int | None,
                 prompt_note: str) -> dict[str, Any]:
    """The settings that describe a run, for the table and the JSON."""
    keys = ("label", "base_url", "endpoint", "stream", "num_requests", "concurrency", "input_len",
            "output_len", "ignore_eos", "temperature", "workload", "seed", "warmup",
            "http_client")
    return {"model": model, "max_model_len": max_model_len, "prompts": prompt_note,
            **{k: getattr(ns, k) for k in keys}}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every request succeeded, 1 when any failed or was not sent."""
    parser = build_parser()
    ns = resolve_args(parser.parse_args(argv), parser)
    server: LaunchedServer | None = None
    sampler: RSSSampler | None = None
    measured: dict[str, Any] = {"cold_start_s": None, "peak_rss_bytes": None, "rss_samples": 0,
                                "pid": ns.server_pid, "command": ns.measure_cold_start}
    try:
        if ns.measure_cold_start:
            server = LaunchedServer(ns.measure_cold_start)
            measured["pid"] = server.pid
            sampler = RSSSampler(server.pid, ns.rss_interval).start()  # start-up peaks count too
            measured["cold_start_s"] = server.wait_healthy(ns.base_url, ns.cold_start_timeout)
            print(f"server healthy after {measured['cold_start_s']:.2f} s", file=sys.stderr)
        elif ns.server_pid:
            sampler = RSSSampler(ns.server_pid, ns.rss_interval).start()
        gflops = matmul_gflops() if ns.matmul_probe else None
        report, results = asyncio.run(benchmark(ns))
        report["run"]["matmul_gflops"] = gflops
    except ServerStartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if sampler is not None:
            measured["peak_rss_bytes"] = sampler.stop()
            measured["rss_samples"] = sampler.samples
        if server is not None:
            measured["exit_code"] = server.stop()
    report["server"] = measured
    print(format_report(report))
    if ns.json_out:
        write_json(ns.json_out, report, results)
    if ns.plot:
        why_not = plot(ns.plot, results, ns.label or report["run"]["model"])
        if why_not:
            print(f"--plot skipped: {why_not}", file=sys.stderr)
    failed = report["summary"]["errors"] + report["run"]["not_sent"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
