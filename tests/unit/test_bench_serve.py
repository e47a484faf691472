"""The serving benchmark: SSE parsing, per-chunk timing, statistics, prompts, and one small run
against a real `inferd serve` launched through the benchmark's own cold-start helper."""
from __future__ import annotations

import asyncio
import json
import os
import random
import shlex
import socket
import sys

import httpx
import numpy as np
import pytest

from inferd.bench import serve as bench
from inferd.bench.client import RequestSpec, StreamTracker, send_request, send_request_aiohttp
from inferd.bench.prompts import fit_words, token_id_prompts, word_prompts
from inferd.bench.server_proc import split_env_assignments, tree_rss_bytes
from inferd.bench.sse import SSEParser
from inferd.bench.stats import RequestResult, percentile, summarize


def sse(*payloads: object) -> str:
    return "".join(f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n" for p in payloads)


def completion_chunk(text: str, total: int | None = None, prompt: int = 5) -> dict:
    chunk: dict = {"object": "text_completion", "choices": [{"index": 0, "text": text}]}
    if total is not None:
        chunk["usage"] = {"prompt_tokens": prompt, "completion_tokens": total,
                          "total_tokens": prompt + total}
    return chunk


# --- SSE -----------------------------------------------------------------------------------------
STREAM = (": keep-alive\n\n"
          "data: {\"a\": 1}\n\n"
          "event: message\r\ndata: {\"b\": 2}\r\n\r\n"
          "data: line one\ndata: line two\n\n"
          "data:no-space\r\r"
          "id: 7\n\n"  # an event with no data is no event
          "data: [DONE]\n\n")
EXPECTED = ['{"a": 1}', '{"b": 2}', "line one\nline two", "no-space", "[DONE]"]


def test_sse_parser_whole_stream() -> None:
    p = SSEParser()
    assert p.feed(STREAM) + p.close() == EXPECTED


@pytest.mark.parametrize("seed", range(20))
def test_sse_parser_any_chunking(seed: int) -> None:
    """Network reads split anywhere, including between \\r and \\n: same events every time."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(STREAM)), rng.randint(1, 30)))
    pieces = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)])]
    p = SSEParser()
    events = [e for piece in pieces for e in p.feed(piece)]
    assert events + p.close() == EXPECTED


def test_sse_parser_one_char_at_a_time_and_unterminated_tail() -> None:
    p = SSEParser()
    events = [e for ch in 'data: {"x": 1}\n\ndata: last' for e in p.feed(ch)]
    assert events == ['{"x": 1}']
    assert p.close() == ["last"]  # the server closed without the final blank line


# --- timing one stream ---------------------------------------------------------------------------
def test_tracker_multi_token_chunks_split_the_gap() -> None:
    """With continuous usage, a chunk carrying 3 tokens contributes 3 gaps of a third each."""
    r = RequestResult(index=0)
    t = StreamTracker(r, t0=10.0, endpoint="completions", max_events=100)
    assert not t.on_events([json.dumps(completion_chunk("a", 1))], 10.5)
    assert not t.on_events([json.dumps(completion_chunk("bcd", 4))], 11.1)
    assert not t.on_events([json.dumps(completion_chunk("", 4))], 11.2)  # no new token: untimed
    assert not t.on_events([json.dumps(completion_chunk("e", 5))], 11.3)
    final = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 5}}
    assert t.on_events([json.dumps(final), "[DONE]"], 11.4)
    t.finish()
    r.e2e = 1.4
    assert r.ok and r.ttft == pytest.approx(0.5)
    assert r.itl == pytest.approx([0.2, 0.2, 0.2, 0.2])
    assert (r.output_tokens, r.prompt_tokens, r.output_tokens_from_usage) == (5, 5, True)
    assert r.tpot == pytest.approx((1.4 - 0.5) / 4)


def test_tracker_without_usage_counts_text_chunks() -> None:
    r = RequestResult(index=0)
    t = StreamTracker(r, t0=0.0, endpoint="chat", max_events=100)
    role = {"choices": [{"delta": {"role": "assistant", "content": ""}}]}
    events = [json.dumps(role)] + [json.dumps({"choices": [{"delta": {"content": c}}]})
                                   for c in "xyz"]
    for i, e in enumerate(events):
        t.on_events([e], 1.0 + i)
    t.on_events(["[DONE]"], 5.0)
    t.finish()
    assert r.ttft == 2.0 and r.itl == [1.0, 1.0]
    assert (r.output_tokens, r.output_tokens_from_usage) == (3, False)


def test_tracker_usage_only_at_the_end_is_not_double_counted() -> None:
    """A peer that sends usage on its last content chunk only: earlier chunks count one each."""
    r = RequestResult(index=0)
    t = StreamTracker(r, t0=0.0, endpoint="completions", max_events=100)
    t.on_events([json.dumps(completion_chunk("a")), json.dumps(completion_chunk("b"))], 1.0)
    t.on_events([json.dumps(completion_chunk("c", total=3))], 2.0)
    t.on_events(["[DONE]"], 2.0)
    t.finish()
    assert r.output_tokens == 3 and len(r.itl) == 2


def test_tracker_errors() -> None:
    r = RequestResult(index=0)
    t = StreamTracker(r, 0.0, "completions", max_events=100)
    assert t.on_events([json.dumps({"error": {"message": "boom", "code": 500}})], 1.0)
    assert r.error == "stream error: boom"

    r = RequestResult(index=1)
    t = StreamTracker(r, 0.0, "completions", max_events=100)
    t.on_events([json.dumps(completion_chunk("a"))], 1.0)
    t.finish()
    assert r.error == "stream ended without [DONE]"

    r = RequestResult(index=2)
    t = StreamTracker(r, 0.0, "completions", max_events=3)
    assert t.on_events([json.dumps(completion_chunk("a"))] * 5, 1.0)
    assert r.error is not None and "exceeded 3 events" in r.error


def test_request_body() -> None:
    spec = RequestSpec(endpoint="completions", model="m", max_tokens=7, ignore_eos=True)
    body = spec.body([1, 2, 3])
    assert body["prompt"] == [1, 2, 3] and body["ignore_eos"] is True and body["min_tokens"] == 7
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    chat = RequestSpec(endpoint="chat", model="m", max_tokens=7, stream=False).body("hi")
    assert chat["messages"] == [{"role": "user", "content": "hi"}]
    assert "stream_options" not in chat and "ignore_eos" not in chat and "min_tokens" not in chat


def test_send_request_over_a_mock_transport() -> None:
    """The whole client path (status, SSE over several reads, usage) without a server."""
    body = sse(completion_chunk("Hel", 1), completion_chunk("lo", 2),
               {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}, "[DONE]")

    async def reads():
        for i in range(0, len(body), 7):
            yield body[i:i + 7].encode()

    def handler(request: httpx.Request) -> httpx.Response:
        sent = json.loads(request.content)
        if sent["model"] != "m":
            return httpx.Response(404, json={"error": {"message": "no such model"}})
        return httpx.Response(200, content=reads(), headers={"content-type": "text/event-stream"})

    async def go() -> list[RequestResult]:
        async with httpx.AsyncClient(base_url="http://127.0.0.1:1",
                                     transport=httpx.MockTransport(handler)) as client:
            ok = await send_request(client, RequestSpec("completions", "m", 2), [1, 2], 0, 0.0)
            bad = await send_request(client, RequestSpec("completions", "x", 2), [1, 2], 1, 0.0)
            return [ok, bad]

    ok, bad = asyncio.run(go())
    assert ok.ok and ok.output_tokens == 2 and ok.prompt_tokens == 4 and ok.ttft is not None
    assert bad.error == "HTTP 404: no such model"


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_both_transports_read_a_real_stream_alike(transport: str) -> None:
    """A real HTTP server (aiohttp.web on a loopback port) writes the SSE body, with raw
    multi-byte characters, in 5-byte pieces; either transport must time and count it the same,
    and turn a 404 into the server's message."""
    from aiohttp import web
    body = sse(completion_chunk("Hel", 1), completion_chunk("lo", 2),
               {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}},
               "[DONE]").replace("Hel", "\u20ac\u20ac").encode()  # raw 3-byte characters

    async def handler(request: web.Request) -> web.StreamResponse:
        if (await request.json())["model"] != "m":
            return web.json_response({"error": {"message": "no such model"}}, status=404)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(0, len(body), 5):
            await resp.write(body[i:i + 5])
            await asyncio.sleep(0)
        return resp

    async def go() -> list[RequestResult]:
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{port}"
        specs = [RequestSpec("completions", "m", 2), RequestSpec("completions", "x", 2)]
        try:
            if transport == "httpx":
                async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
                    return [await send_request(client, s, [1, 2], i, 0.0)
                            for i, s in enumerate(specs)]
            import aiohttp
            async with aiohttp.ClientSession() as session:
                return [await send_request_aiohttp(session, url, s, [1, 2], i, 0.0)
                        for i, s in enumerate(specs)]
        finally:
            await runner.cleanup()

    ok, bad = asyncio.run(go())
    assert ok.ok, ok.error
    assert (ok.output_tokens, ok.prompt_tokens, ok.chunks) == (2, 4, 2) and ok.ttft is not None
    assert bad.error == "HTTP 404: no such model"


def test_aiohttp_stream_decodes_characters_split_across_reads() -> None:
    """The network may cut a UTF-8 character between two reads (the real server above does not
    reliably do so): each read decoded alone would fail, the incremental decoder must not."""
    from inferd.bench.client import _streamed_aiohttp
    body = sse(completion_chunk("\u20ac", 1), "[DONE]").replace("\\u20ac", "\u20ac").encode()
    cut = body.index("\u20ac".encode()) + 1  # inside the 3-byte character

    class Content:
        async def iter_any(self):
            yield body[:cut]
            yield body[cut:]

    class Resp:
        content = Content()

    r = RequestResult(index=0)
    asyncio.run(_streamed_aiohttp(Resp(), RequestSpec("completions", "m", 1), r, 0.0))
    assert r.ok and r.output_tokens == 1 and r.chunks == 1, r.error
    with pytest.raises(UnicodeDecodeError):
        body[:cut].decode()


# --- statistics ----------------------------------------------------------------------------------
@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy(q: float) -> None:
    values = [random.Random(3).expovariate(1.0) for _ in range(37)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize() -> None:
    rs = [RequestResult(index=i, e2e=1.0 + i, ttft=0.1 * (i + 1), output_tokens=11,
                        prompt_tokens=20, itl=[0.05 * (i + 1)] * 10) for i in range(3)]
    rs.append(RequestResult(index=3, error="HTTP 500: x"))
    rs.append(RequestResult(index=4, error="HTTP 500: x"))
    s = summarize(rs, duration=2.0)
    assert (s["completed"], s["errors"], s["error_messages"]) == (3, 2, ["HTTP 500: x"])
    assert s["output_tokens_per_s"] == pytest.approx(33 / 2.0)
    assert s["total_tokens_per_s"] == pytest.approx((33 + 60) / 2.0)
    assert s["requests_per_s"] == pytest.approx(1.5)
    assert s["ttft_s"]["mean"] == pytest.approx(0.2) and s["ttft_s"]["p50"] == pytest.approx(0.2)
    tpots = [(1.0 + i - 0.1 * (i + 1)) / 10 for i in range(3)]
    assert s["tpot_s"]["mean"] == pytest.approx(sum(tpots) / 3)
    assert s["tpot_s"]["p99"] == pytest.approx(float(np.percentile(tpots, 99)))
    assert s["itl_s"]["p50"] == pytest.approx(0.1)
    # Not streamed: no TTFT, so no TPOT either.
    assert summarize([RequestResult(index=0, e2e=1.0, output_tokens=5)], 1.0)["tpot_s"] is None


# --- prompts and flags ---------------------------------------------------------------------------
def test_prompts_have_the_exact_length() -> None:
    ids = token_id_prompts(3, 17, random.Random(0), (1000, 2000))
    assert [len(p) for p in ids] == [17] * 3 and all(1000 <= i < 2000 for p in ids for i in p)
    assert len({tuple(p) for p in ids}) == 3  # distinct prompts: no prefix-cache hits

    async def count(text: str) -> int:  # a BOS, then words of 6+ characters take two tokens
        return 1 + sum(2 if len(w) >= 6 else 1 for w in text.replace(",", " ,").split())

    texts, lengths = asyncio.run(word_prompts(4, 50, random.Random(1), count))
    assert lengths == [50] * 4
    assert [asyncio.run(count(t)) for t in texts] == [50] * 4
    text, n = asyncio.run(fit_words(["sentence"] * 10, 6, count))  # pads fill the odd token
    assert n == 6 == asyncio.run(count(text))


def test_reruns_get_fresh_prompts_unless_seeded() -> None:
    """A rerun against the same server must not be served from its prefix cache: without
    --seed each run draws new prompts (and reports its seed); with one it repeats exactly."""
    def prompts(*argv: str) -> tuple[list, int]:
        parser = bench.build_parser()
        ns = bench.resolve_args(parser.parse_args(["--workload", "ii", *argv]), parser)
        out, _ = asyncio.run(bench.build_prompts(None, ns, "m", 4))
        return out, ns.seed

    (a, seed_a), (b, seed_b) = prompts(), prompts()
    assert a != b and seed_a != seed_b
    assert prompts("--seed", str(seed_a)) == (a, seed_a)
    # one seed, two prompt lengths: no prompt of one starts like a prompt of the other
    short, _ = prompts("--seed", "7")
    long, _ = prompts("--seed", "7", "--input-len", str(2 * len(short[0])))
    assert not {tuple(p[:16]) for p in short} & {tuple(p[:16]) for p in long}

def test_workload_presets_and_overrides() -> None:
    parser = bench.build_parser()
    ns = bench.resolve_args(parser.parse_args(["--workload", "iii", "--concurrency", "8"]), parser)
    assert (ns.num_requests, ns.concurrency, ns.input_len, ns.output_len) == (128, 8, 256, 64)
    assert ns.ignore_eos and ns.token_prompts
    ns = bench.resolve_args(parser.parse_args(["--endpoint", "chat"]), parser)
    assert not ns.ignore_eos and not ns.token_prompts and ns.num_requests == 8
    with pytest.raises(SystemExit):
        bench.resolve_args(parser.parse_args(["--endpoint", "chat", "--token-prompts"]), parser)


def test_server_command_env_and_rss() -> None:
    cmd = shlex.split("A_B=4 X=0-1 python -m m --flag=1")
    assert split_env_assignments(cmd) == ({"A_B": "4", "X": "0-1"},
                                          ["python", "-m", "m", "--flag=1"])
    assert tree_rss_bytes(os.getpid()) > 10**6


# --- a real server -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(400)
def test_small_run_against_inferd(tiny_llama_dir, tmp_path, capsys) -> None:
    """4 requests x 8 tokens through --measure-cold-start: launch, time, load, report, stop."""
    port = free_port()
    cmd = shlex.join([sys.executable, "-m", "inferd.cli.main", "serve", str(tiny_llama_dir),
                      "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                      "--device", "cpu", "--max-model-len", "256", "--kv-cache-memory", "16MiB",
                      "--max-num-seqs", "4", "--served-model-name", "tiny-llama"])
    out = tmp_path / "run.json"
    code = bench.main(["--base-url", f"http://127.0.0.1:{port}", "--num-requests", "4",
                       "--concurrency", "2", "--input-len", "16", "--output-len", "8",
                       "--ignore-eos", "--no-matmul-probe", "--json-out", str(out),
                       "--measure-cold-start", cmd, "--cold-start-timeout", "300"])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert code == 0, printed
    s = data["summary"]
    assert (s["completed"], s["errors"], s["output_tokens"], s["prompt_tokens"]) == (4, 0, 32, 64)
    assert all(r["output_tokens_from_usage"] and r["ttft"] > 0 and len(r["itl"]) == 7
               for r in data["requests"])
    assert data["run"]["model"] == "tiny-llama"
    assert data["server"]["cold_start_s"] > 0 and data["server"]["peak_rss_bytes"] > 10**7
    assert data["server"]["exit_code"] is not None  # stopped
    assert "Time to first token" in printed and "Output tokens/s" in printed
