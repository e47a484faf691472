"""Robustness over real HTTP: hostile or malformed bodies get a 4xx OpenAI error envelope (never a
5xx), nothing a request does leaves engine state behind or takes the engine down, and SSE framing
holds, an engine failure mid-stream included.

One server with a short --engine-stall-timeout: a request the API process forgets to finish
(registered, never ended) turns /health into 503 once the server is idle for that long, so
`test_nothing_left_pending` catches such leaks from every test before it. The last test kills
the engine, so it must stay last.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time

import httpx
import pytest

STALL_S = 4.0
M = [{"role": "user", "content": "hi"}]
SURROGATE = "\ud800"  # json.dumps writes it as the escape "\ud800": valid JSON, invalid Unicode
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def server(launch_server):
    with launch_server(["--engine-stall-timeout", str(STALL_S)]) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def post_raw(http: httpx.Client, path: str, body: object | str, **kwargs) -> httpx.Response:
    """POST `body` as JSON text: a str is sent as is; anything else through json.dumps, which
    keeps surrogate escapes, NaN, Infinity and integers past 64 bits."""
    text = body if isinstance(body, str) else json.dumps(body)
    return http.post(path, content=text, headers={"content-type": "application/json"}, **kwargs)


def assert_4xx_envelope(resp: httpx.Response) -> dict:
    assert 400 <= resp.status_code < 500, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == resp.status_code and error["message"]
    return error


def metric(http: httpx.Client, name: str, labels: str = "") -> float:
    pattern = re.compile(rf"^{re.escape(name)}{{([^}}]*)}} (\S+)$", re.M)
    return sum(float(v) for lab, v in pattern.findall(http.get("/metrics").text) if labels in lab)


def aborted(http: httpx.Client) -> float:
    return metric(http, "inferd:request_success_total", 'finished_reason="abort"')


def wait_until(predicate, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


# -- bad input: a 4xx envelope, never a 5xx ----------------------------------------------------------

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
BAD_INPUTS = [
    # bodies that are not objects, or not JSON at all, or nested past the parser's limit
    *[(path, raw) for path in (CMPL, CHAT, "/tokenize", "/detokenize", "/invocations")
      for raw in ("[]", '"x"', "1", "null", "{", DEEP)],
    ("/scale_elastic_ep", DEEP),
    # unpaired surrogates: were 500s (tokenizer) or 400s that left the request registered forever
    (CMPL, {"prompt": SURROGATE}),
    (CMPL, {"prompt": ["ok", "a" + SURROGATE]}),
    (CMPL, {"prompt": "hi", "bad_words": [SURROGATE]}),
    (CMPL, {"prompt": "hi", "stop": [SURROGATE]}),
    (CMPL, {"prompt": "hi", "cache_salt": SURROGATE}),
    (CMPL, {"prompt": "hi", "vllm_xargs": {SURROGATE: 1}}),
    (CMPL, {"prompt": "hi", "stream": True, "request_id": SURROGATE}),
    (CHAT, {"messages": [{"role": "user", "content": SURROGATE}]}),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]}),
    ("/tokenize", {"prompt": SURROGATE}),
    ("/tokenize", {"messages": [{"role": "user", "content": SURROGATE}]}),
    ("/invocations", {"prompt": SURROGATE}),
    # numbers the engine boundary (msgpack, int64) cannot carry: were 400s after registration
    (CMPL, {"prompt": "hi", "vllm_xargs": {"a": 2**70}}),
    (CMPL, {"prompt": "hi", "n": 2, "seed": 2**63 - 1}),  # killed the engine: seed + i overflowed
    (CHAT, {"messages": M, "n": 3, "seed": 2**63 - 2}),
    # wrong types, out of range, huge
    (CMPL, {"prompt": "hi", "n": 10**6}),
    (CMPL, {"prompt": "hi", "max_tokens": 10**12}),
    (CMPL, {"prompt": "hi", "max_tokens": -1}),
    (CMPL, {"prompt": "hi", "logprobs": 10**9}),
    (CMPL, {"prompt": "hi", "temperature": 1e309}),
    (CMPL, {"prompt": "hi", "temperature": float("nan")}),
    (CMPL, {"prompt": "hi", "top_k": 2**70}),
    (CMPL, {"prompt": "hi", "min_tokens": 2**70, "max_tokens": 2}),
    (CMPL, {"prompt": "hi", "stop": ["x"] * 100_000}),
    (CMPL, {"prompt": "hi", "stop": "x" * 100_000}),
    (CMPL, {"prompt": "hi", "logit_bias": {"abc": 1}}),
    (CMPL, {"prompt": "hi", "logit_bias": {str(2**70): 1}}),
    (CMPL, {"prompt": "hi", "logit_bias": {"1": float("nan")}}),
    (CMPL, {"prompt": [1, 2**70]}),
    (CMPL, {"prompt": [[1], []]}),
    (CMPL, {"prompt": []}),
    (CMPL, {"prompt": None}),
    (CMPL, {"prompt": "hi", "response_format": {"type": "nope"}}),
    (CMPL, {"prompt": "hi", "structured_outputs": {"regex": "(("}}),
    (CHAT, {"messages": []}),
    (CHAT, {"messages": "hi"}),
    (CHAT, {"messages": [5]}),
    (CHAT, {"messages": [{"content": "hi"}]}),
    (CHAT, {"messages": [{"role": 5, "content": "hi"}]}),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}),
    (CHAT, {"messages": [{"role": "assistant", "content": "x", "tool_calls": 5}]}),
    (CHAT, {"messages": M, "logprobs": True, "top_logprobs": 10**9}),
    (CHAT, {"messages": M, "tools": [{"type": "function"}]}),
    (CHAT, {"messages": M, "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}}}),
    (CHAT, {"messages": M, "tool_choice": "bogus"}),
    (CHAT, {"messages": M, "response_format": {"type": "json_schema"}}),
    (CHAT, {"messages": M, "chat_template": "{{ 1/0 }}"}),  # untrusted: refused
    ("/tokenize", {"messages": M, "chat_template": "{{ x }}"}),
    ("/detokenize", {"tokens": [2**70]}),
    ("/detokenize", {"tokens": [-1]}),
]


@pytest.mark.parametrize("path,body", BAD_INPUTS,
                         ids=[f"{p}-{i}" for i, (p, _) in enumerate(BAD_INPUTS)])
def test_bad_input_is_a_4xx_envelope(http, path, body):
    assert_4xx_envelope(post_raw(http, path, body))


@pytest.mark.parametrize("body, param", [
    ({"messages": M, "tool_choice": "sometimes"}, "tool_choice"),  # not "tool_choice.literal[...]"
    ({"messages": M, "max_tokens": "many"}, "max_tokens"),  # not "max_tokens.int"
    ({"messages": M, "n": [2]}, "n"),
])
def test_schema_errors_name_the_field_sent(http, body, param):
    resp = post_raw(http, CHAT, body)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


@pytest.mark.parametrize("path,body", [
    # Nested past json.loads' recursion limit in a tool call's arguments: was a 500; kept as a string.
    (CHAT, {"messages": [M[0], {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[" * 100_000}}]},
        {"role": "user", "content": "go"}], "max_tokens": 1}),
    # A schema holding an integer past 64 bits where xgrammar ignores it: was a 400 that left the
    # request registered (the dict crossed to the engine as msgpack); now it travels as text.
    (CMPL, {"prompt": "hi", "max_tokens": 2,
            "structured_outputs": {"json": {"type": "string", "description": 2**70}}}),
    (CHAT, {"messages": M, "max_tokens": 2, "tool_choice": {"type": "function", "function": {"name": "f"}},
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "description": 2**70}}}]}),
    # A surrogate *pair* is one valid character.
    (CMPL, {"prompt": "\ud83d\ude00", "max_tokens": 1}),
    (CMPL, {"prompt": "hi", "n": 2, "seed": 2**63 - 2, "max_tokens": 1}),
])
def test_edge_input_is_served(http, path, body):
    resp = post_raw(http, path, body)
    assert resp.status_code == 200, resp.text


def test_oversized_headers_are_refused_unread(server, http):
    """Headers past h11's 16 KiB cap get a 400 and the connection closed before the rest is
    read: a parser that buffers headers of any size (uvicorn's httptools protocol did, 20 MB
    and more) lets a few clients hold gigabytes of memory."""
    import socket
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 64 * 1024)
        first = s.recv(64)
    assert first.startswith(b"HTTP/1.1 400"), first
    assert http.get("/health").status_code == 200  # a normal request right after is fine


def test_still_serving_after_bad_input(http):
    assert http.get("/health").status_code == 200
    resp = http.post(CMPL, json={"prompt": "Hello", "max_tokens": 3})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3


# -- SSE framing ------------------------------------------------------------------------------------

def sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n"), text[-200:]
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: "):] for e in events]


@pytest.mark.parametrize("path,body,tokens", [
    (CMPL, {"prompt": ["a", "b"], "n": 2, "max_tokens": 3, "logprobs": 1, "ignore_eos": True}, 12),
    (CHAT, {"messages": M, "n": 2, "max_tokens": 3, "logprobs": True, "top_logprobs": 1,
            "ignore_eos": True}, 6),
])
def test_sse_framing(http, path, body, tokens):
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    resp = http.post(path, json=body)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    *chunks, done = sse_events(resp.text)
    assert done == "[DONE]"
    payloads = [json.loads(c) for c in chunks]
    assert all("error" not in p for p in payloads)
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == tokens


# -- cancellation frees everything ------------------------------------------------------------------

def test_cancelled_requests_free_their_blocks(http, server):
    before = aborted(http)
    long = {"max_tokens": 400, "ignore_eos": True}
    with httpx.Client(base_url=server.base_url, timeout=30) as other:
        for path, body in [(CMPL, {"prompt": "hi", "stream": True, **long}),
                           (CHAT, {"messages": M, "n": 2, "stream": True, **long})]:
            with other.stream("POST", path, json=body) as resp:
                assert resp.status_code == 200
                lines = resp.iter_lines()  # keep it: a dropped iterator closes the stream
                next(lines)
    for path, body in [(CMPL, {"prompt": ["a", "b"], **long}), ("/invocations", {"prompt": "a", **long})]:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url_for(path), json=body, timeout=0.5)
    wait_until(lambda: aborted(http) >= before + 5, what="the cancelled requests were not all aborted")
    # The gauges come from engine steps; one more request makes sure a step ran after the aborts.
    assert http.post(CMPL, json={"prompt": "hi", "max_tokens": 1}).status_code == 200
    assert metric(http, "inferd:num_requests_running") == 0
    assert metric(http, "inferd:num_requests_waiting") == 0
    assert metric(http, "inferd:kv_cache_usage_perc") == 0


def test_gauges_drop_to_zero_after_an_abort_without_another_request(http, server):
    with httpx.Client(base_url=server.base_url, timeout=30) as other:
        with other.stream("POST", CMPL, json={"prompt": "hi", "stream": True, "max_tokens": 400,
                                              "ignore_eos": True}) as resp:
            lines = resp.iter_lines()
            next(lines)
            next(lines)
    before = time.monotonic()
    while time.monotonic() - before < 3:
        if metric(http, "inferd:num_requests_running") == 0:
            break
        time.sleep(0.1)
    assert metric(http, "inferd:num_requests_running") == 0
    assert metric(http, "inferd:kv_cache_usage_perc") == 0


def test_nothing_left_pending(http):
    """Every request above ended in the API process too: idle past the stall timeout with a
    request still registered would be reported as a stalled engine."""
    time.sleep(STALL_S + 1.5)
    assert http.get("/health").status_code == 200


# -- keep last: kills the engine --------------------------------------------------------------------

def test_engine_death_mid_stream_is_an_error_event(http, server):
    [engine] = server.engine_pids()
    with http.stream("POST", CMPL, json={"prompt": "hi", "stream": True, "max_tokens": 400,
                                         "ignore_eos": True}) as resp:
        assert resp.status_code == 200
        chunks = resp.iter_text()
        text = next(chunks)
        os.kill(engine, signal.SIGKILL)
        text += "".join(chunks)
    *events, error, done = sse_events(text)
    assert done == "[DONE]" and events
    assert json.loads(error) == {"error": {
        "message": "The engine is not running; the server is shutting down.",
        "type": "ServiceUnavailableError", "param": None, "code": 503}}
