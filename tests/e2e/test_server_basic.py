"""The server frame over real HTTP: admin routes, tokenize, error envelope and status codes,
content-type and body-size checks, request ids, /load, disconnect → abort, start-up log, and
the engine watchdog. One shared server (real engine, tiny Llama) for the module."""
from __future__ import annotations

import os
import re
import signal
import time

import httpx
import openai
import pytest

MODEL_NAME = "tiny-llama"  # tests/e2e/conftest.py serves the tiny model under this name
BODY_LIMIT = 65536


@pytest.fixture(scope="module")
def server(launch_server):
    with launch_server(["--enable-request-id-headers", "--enable-server-load-tracking",
                        "--max-request-body-bytes", str(BODY_LIMIT)]) as s:
        yield s
        code = s.stop(signal.SIGTERM)
        # A SIGTERM is a clean stop: exit 0, the app's shutdown ran, the engine was stopped.
        assert code == 0, s.log_text()[-3000:]
        assert "Shutting down FastAPI HTTP server." in s.log_text()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


def assert_envelope(resp: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and isinstance(error["message"], str) and error["message"]
    if param != "any":
        assert error["param"] == param
    return error


# -- start-up ---------------------------------------------------------------------------------------

def test_startup_log_lines(server):
    log = server.log_text()
    lines = [
        "inferd server version 0.1.0, serving model ",
        "non-default args: {",
        "Supported tasks: ['generate']",
        f"Starting inferd API server on http://127.0.0.1:{server.port}",
        "Available routes are:",
        # vLLM's registration order: docs, tokenize, admin, /ping, then the generation routes.
        "Route: /openapi.json, Methods: GET, HEAD",
        "Route: /tokenize, Methods: POST",
        "Route: /health, Methods: GET",
        "Route: /v1/models, Methods: GET",
        "Route: /ping, Methods: GET",
        "Route: /ping, Methods: POST",
        "Route: /v1/completions, Methods: POST",
        "Application startup complete.",
    ]
    positions = [log.find(line) for line in lines]
    assert all(p >= 0 for p in positions), [l for l, p in zip(lines, positions) if p < 0]
    assert positions == sorted(positions), "start-up lines out of order"
    assert "'served_model_name': ['tiny-llama']" in log


# -- admin routes -----------------------------------------------------------------------------------

def test_health_ping_version_load(http):
    for method, path in [("GET", "/health"), ("GET", "/ping"), ("POST", "/ping")]:
        resp = http.request(method, path)
        assert resp.status_code == 200 and resp.content == b""
    assert http.get("/version").json() == {"version": "0.1.0"}
    assert http.get("/load").json() == {"server_load": 0}
    assert http.post("/is_scaling_elastic_ep").json() == {"is_scaling_elastic_ep": False}


def test_models_card(http, server, tiny_llama_dir):
    body = http.get("/v1/models").json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == MODEL_NAME and card["object"] == "model" and card["owned_by"] == "inferd"
    assert card["max_model_len"] == 512 and card["parent"] is None
    assert card["root"] == str(tiny_llama_dir)
    perm = card["permission"][0]
    assert perm["object"] == "model_permission" and perm["id"].startswith("modelperm-")
    assert perm["allow_sampling"] is True and perm["organization"] == "*"
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_docs_are_served(http):
    spec = http.get("/openapi.json").json()
    assert spec["info"]["title"] == "inferd"
    ids = [op["operationId"] for item in spec["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)  # OpenAPI: unique
    assert {"get", "post"} <= set(spec["paths"]["/ping"])
    assert http.get("/docs").status_code == 200 and http.get("/redoc").status_code == 200


def test_scale_elastic_ep_validates_then_501(http):
    assert_envelope(http.post("/scale_elastic_ep", content=b"{not json"), 400)
    assert_envelope(http.post("/scale_elastic_ep", json={}), 400, "new_data_parallel_size")
    assert_envelope(http.post("/scale_elastic_ep", json={"new_data_parallel_size": 0}), 400,
                    "new_data_parallel_size")
    assert_envelope(http.post("/scale_elastic_ep", json={"new_data_parallel_size": 2,
                                                         "drain_timeout": -1}), 400, "drain_timeout")
    error = assert_envelope(http.post("/scale_elastic_ep", json={"new_data_parallel_size": 2}), 501)
    assert error["type"] == "NotImplementedError" and "data parallel" in error["message"]


# -- tokenize -----------------------------------------------------------------------------------------

def test_tokenize_completion_form_matches_hf(http, tokenizer):
    prompt = "Hello, my name is inferd. The quick brown fox"
    body = http.post("/tokenize", json={"prompt": prompt, "model": MODEL_NAME}).json()
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    assert body == {"count": len(ids), "max_model_len": 512, "tokens": ids, "token_strs": None}
    body = http.post("/tokenize", json={"prompt": prompt, "return_token_strs": True,
                                        "add_special_tokens": False}).json()
    assert body["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])


def test_tokenize_chat_form_matches_hf_template(http, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    body = http.post("/tokenize", json={"messages": messages}).json()
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert body["tokens"] == ids and body["count"] == len(ids)


def test_detokenize_round_trip_and_out_of_vocab(http, tokenizer):
    ids = tokenizer.encode("round trip text", add_special_tokens=False)
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "round trip text"}
    assert_envelope(http.post("/detokenize", json={"tokens": [len(tokenizer) + 5]}), 400, "tokens")
    assert_envelope(http.post("/detokenize", json={"tokens": [-1]}), 400, "tokens")


def test_unknown_model_is_404(http, server):
    error = assert_envelope(http.post("/tokenize", json={"prompt": "x", "model": "gpt-nope"}), 404, "model")
    assert error == {"message": "The model `gpt-nope` does not exist.", "type": "NotFoundError",
                     "param": "model", "code": 404}
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="gpt-nope", prompt="x", max_tokens=1)


# -- errors -----------------------------------------------------------------------------------------

def test_validation_errors_are_400_not_422(http):
    error = assert_envelope(http.post("/v1/completions", json={"prompt": "x", "max_tokens": "many"}),
                            400, "max_tokens")
    assert error["type"] == "Bad Request"
    assert_envelope(http.post("/tokenize", json={"prompt": 5}), 400, "prompt")
    assert_envelope(http.post("/tokenize", json={"messages": "not a list"}), 400, "messages")
    assert_envelope(http.post("/detokenize", json={}), 400, "tokens")
    error = assert_envelope(http.post("/v1/completions", content=b"{oops",
                                      headers={"content-type": "application/json"}), 400)
    assert "JSON decode error" in error["message"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_non_json_content_type_is_400(http, content_type):
    headers = {"content-type": content_type} if content_type else {}
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        resp = http.post(path, content=b'{"prompt": "x"}', headers=headers)
        error = assert_envelope(resp, 400)
        assert error["message"] == "Unsupported Media Type: Only 'application/json' is allowed"
    # A charset parameter is fine.
    ok = http.post("/tokenize", content=b'{"prompt": "x"}',
                   headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_body_over_the_limit_is_413(http):
    big = b'{"prompt": "' + b"a" * (BODY_LIMIT + 10) + b'"}'
    error = assert_envelope(http.post("/tokenize", content=big,
                                      headers={"content-type": "application/json"}), 413)
    assert str(BODY_LIMIT) in error["message"]

    def chunks():  # no Content-Length: the limit applies as the bytes arrive
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 4096 + 2):
            yield b"a" * 4096
        yield b'"}'
    assert_envelope(http.post("/tokenize", content=chunks(), headers={"content-type": "application/json"}), 413)
    assert http.post("/tokenize", json={"prompt": "a" * 1000}).status_code == 200


def test_unknown_route_and_method(http):
    assert_envelope(http.get("/v1/nope"), 404)
    assert_envelope(http.delete("/v1/models"), 405)


def test_request_id_headers(http):
    resp = http.get("/version", headers={"X-Request-Id": "my-id-123"})
    assert resp.headers["x-request-id"] == "my-id-123"
    generated = http.get("/version").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    resp = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                     headers={"X-Request-Id": "abc"})
    assert resp.headers["x-request-id"] == "abc" and resp.json()["id"] == "cmpl-abc"


def test_requests_sharing_an_id_all_run(server):
    """A retried or proxied request may reuse an X-Request-Id (or body request_id) while the
    first is still running: each runs, and each answers with the id the client gave."""
    import concurrent.futures

    def send(i: int) -> httpx.Response:
        path, body = [("v1/completions", {"prompt": "Hi", "max_tokens": 8, "ignore_eos": True}),
                      ("v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                               "max_tokens": 8, "stream": True}),
                      ("v1/completions", {"prompt": "Hi", "max_tokens": 8, "request_id": "same"})][i % 3]
        headers = {} if "request_id" in body else {"X-Request-Id": "same"}
        return httpx.post(server.url_for(path), json=body, headers=headers, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(send, range(6)))
    for i, resp in enumerate(responses):
        assert resp.status_code == 200, resp.text
        if i % 3 == 1:
            assert '"id":"chatcmpl-same"' in resp.text.replace(" ", "") and "[DONE]" in resp.text
        else:
            assert resp.json()["id"] == "cmpl-same"


# -- load and disconnects ---------------------------------------------------------------------------

def _metric(http: httpx.Client, name: str, labels: str = "") -> float:
    pattern = re.compile(rf"^{re.escape(name)}{{([^}}]*)}} (\S+)$", re.M)
    return sum(float(v) for lab, v in pattern.findall(http.get("/metrics").text) if labels in lab)


def test_load_counts_in_flight_requests(http, server):
    assert http.get("/load").json() == {"server_load": 0}
    with httpx.Client(base_url=server.base_url, timeout=60) as other:
        with other.stream("POST", "/v1/completions",
                          json={"prompt": "Once", "max_tokens": 300, "stream": True,
                                "ignore_eos": True}) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()  # keep it: a dropped line iterator closes the stream
            next(lines)
            assert http.get("/load").json() == {"server_load": 1}
    deadline = time.monotonic() + 30
    while http.get("/load").json()["server_load"] != 0:
        assert time.monotonic() < deadline, "load never dropped back to 0"
        time.sleep(0.1)


def test_client_disconnect_aborts_non_streaming_request(http, server):
    aborted = _metric(http, "inferd:request_success_total", 'finished_reason="abort"')
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url_for("v1/completions"), timeout=0.5,
                   json={"prompt": "Long", "max_tokens": 500, "ignore_eos": True})
    deadline = time.monotonic() + 30
    while _metric(http, "inferd:request_success_total", 'finished_reason="abort"') < aborted + 1:
        assert time.monotonic() < deadline, "the request was not aborted after the client left"
        time.sleep(0.2)
    # And the server keeps answering.
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


# -- the watchdog: a stalled engine fails /health; a dead one also stops the server (exit 1) ------

def _wait_for_health(client: httpx.Client, status: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := client.get("/health").status_code) != status:
        assert time.monotonic() < deadline, f"/health stayed {got}, expected {status}"
        time.sleep(0.1)


def test_engine_stall_and_death(launch_server):
    stall_timeout = 5
    with launch_server(["--engine-stall-timeout", str(stall_timeout)]) as s, \
            httpx.Client(base_url=s.base_url, timeout=30) as client:
        [engine] = s.engine_pids()
        time.sleep(stall_timeout + 1)  # idle time is not a stall
        with client.stream("POST", "/v1/completions", json={"prompt": "Go", "max_tokens": 400,
                                                             "ignore_eos": True, "stream": True}) as resp:
            lines = resp.iter_lines()
            next(lines)
            assert client.get("/health").status_code == 200
            os.kill(engine, signal.SIGSTOP)  # pending work, no progress: a stall
            try:
                _wait_for_health(client, 503)
            finally:
                os.kill(engine, signal.SIGCONT)
            _wait_for_health(client, 200)  # progress again: healthy again
        os.kill(engine, signal.SIGKILL)
        try:
            _wait_for_health(client, 503, timeout=10)
        except httpx.TransportError:
            pass  # already gone: the watchdog is quick
        assert s.proc.wait(30) == 1
        log = s.log_text()
        assert "Health check failing: the engine has made no progress" in log
        assert "The engine has died; shutting down the server." in log
