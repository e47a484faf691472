"""/metrics: vLLM's metric names under `inferd:`, exact counts after known requests, and the
bounded waiting queue (429 + Retry-After, counted by reason). One server, one running sequence
at a time and one waiting slot, so the queue can be filled on purpose."""
from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

MODEL_NAME = "tiny-llama"
LABELS = f'engine="0",model_name="{MODEL_NAME}"'

GAUGES = ["num_requests_running", "num_requests_waiting", "num_requests_waiting_by_reason",
          "kv_cache_usage_perc", "cache_config_info", "engine_sleep_state"]
COUNTERS = ["prefix_cache_queries_total", "prefix_cache_hits_total", "num_preemptions_total",
            "prompt_tokens_total", "generation_tokens_total", "request_success_total",
            "request_rejected_total", "prompt_tokens_cached_total", "prompt_tokens_by_source_total"]
HISTOGRAMS = ["iteration_tokens_total", "request_prompt_tokens", "request_generation_tokens",
              "request_params_n", "request_params_max_tokens", "time_to_first_token_seconds",
              "inter_token_latency_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
              "request_inference_time_seconds", "request_prefill_time_seconds",
              "request_decode_time_seconds", "request_max_num_generation_tokens",
              "request_prefill_kv_computed_tokens"]


@pytest.fixture(scope="module")
def server(launch_server):
    with launch_server(["--max-num-seqs", "1", "--max-num-queued-requests", "1"]) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


def scrape(http: httpx.Client) -> dict[str, float]:
    """`name{labels}` -> value for every sample (labels kept verbatim)."""
    text = http.get("/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def value(samples: dict[str, float], name: str, **extra: str) -> float:
    """Sum of the samples of `name` whose labels include the model's and `extra`."""
    total = 0.0
    for key, v in samples.items():
        m = re.fullmatch(r"([^{]+)\{(.*)\}", key)
        if not m or m.group(1) not in (f"inferd:{name}", name):  # http_* carry no prefix
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if labels.get("model_name", MODEL_NAME) == MODEL_NAME and all(labels.get(k) == w for k, w in extra.items()):
            total += v
    return total


def test_exposition_format_and_names(http):
    resp = http.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = resp.text
    for name in GAUGES + COUNTERS:
        assert re.search(rf"^inferd:{name}{{", text, re.M), name
    for name in HISTOGRAMS:
        for suffix in ("_sum", "_bucket", "_count"):
            assert re.search(rf"^inferd:{name}{suffix}{{", text, re.M), name + suffix
    assert f"inferd:num_requests_running{{{LABELS}}}" in text
    assert re.search(r'^inferd:cache_config_info\{.*block_size="16".*enable_prefix_caching="True"', text, re.M)
    assert "_created" not in text


def test_metrics_answers_head_trailing_slash_and_gzip(http):
    assert http.head("/metrics").status_code == 200
    slash = http.get("/metrics/")
    assert slash.status_code == 200 and "inferd:num_requests_running" in slash.text  # no redirect
    zipped = http.get("/metrics", headers={"Accept-Encoding": "gzip"})
    assert zipped.headers["content-encoding"] == "gzip" and "inferd:kv_cache_usage_perc" in zipped.text


def test_counts_are_exact_after_known_requests(http):
    n, max_tokens = 3, 5
    before = scrape(http)
    prompt_tokens = 0
    for i in range(n):
        resp = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": f"Count {i} to five",
                                                  "max_tokens": max_tokens, "temperature": 0,
                                                  "ignore_eos": True})
        assert resp.status_code == 200, resp.text
        usage = resp.json()["usage"]
        assert usage["completion_tokens"] == max_tokens
        prompt_tokens += usage["prompt_tokens"]
    after = scrape(http)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("request_success_total", finished_reason="length") == n
    assert delta("request_success_total") == n
    assert delta("prompt_tokens_total") == prompt_tokens
    assert delta("generation_tokens_total") == n * max_tokens
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_inference_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_prompt_tokens", "request_generation_tokens",
                 "request_params_n", "request_params_max_tokens"):
        assert delta(f"{name}_count") == n, name
        assert delta(f"{name}_bucket", le="+Inf") == n, name
    assert delta("request_prompt_tokens_sum") == prompt_tokens
    assert delta("request_generation_tokens_sum") == n * max_tokens
    assert delta("request_params_max_tokens_sum") == n * max_tokens
    assert delta("request_params_n_sum") == n
    assert delta("inter_token_latency_seconds_count") == n * (max_tokens - 1)
    # Every computed token went through some step.
    assert delta("iteration_tokens_total_sum") >= prompt_tokens + n * (max_tokens - 1)
    assert value(after, "num_requests_running") == 0
    # HTTP metrics (prometheus-fastapi-instrumentator's, as vLLM's): one per request, scrapes left out.
    assert delta("http_requests_total", handler="/v1/completions", method="POST", status="2xx") == n
    assert value(after, "http_requests_total", handler="/metrics") == 0
    assert delta("request_max_num_generation_tokens_sum") == n * max_tokens


def test_prompt_tokens_by_source_match_cached_tokens(http):
    """The same 40-token prompt twice: the second reads its full blocks from the prefix cache,
    and the counters split its prompt exactly as `usage.prompt_tokens_details` reports."""
    prompt = [7 + i % 50 for i in range(40)]
    before = scrape(http)
    usages = []
    for _ in range(2):
        resp = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 2})
        assert resp.status_code == 200, resp.text
        usages.append(resp.json()["usage"])
    after = scrape(http)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    cached = sum((u.get("prompt_tokens_details") or {}).get("cached_tokens", 0) for u in usages)
    assert cached >= 32  # two full 16-token blocks of the second request
    assert delta("prompt_tokens_cached_total") == cached
    assert delta("prompt_tokens_by_source_total", source="local_cache_hit") == cached
    assert delta("prompt_tokens_by_source_total", source="local_compute") == 80 - cached
    assert delta("prompt_tokens_by_source_total", source="external_kv_transfer") == 0
    assert delta("request_prefill_kv_computed_tokens_sum") == 80 - cached


def test_full_waiting_queue_is_429_with_retry_after(http, server):
    rejected = value(scrape(http), "request_rejected_total", reason="queue_full")
    body = {"model": MODEL_NAME, "prompt": "Busy", "max_tokens": 400, "ignore_eos": True}
    with httpx.Client(base_url=server.base_url, timeout=120) as running_client, \
            running_client.stream("POST", "/v1/completions", json={**body, "stream": True}) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # keep it: a dropped line iterator closes the stream
        next(lines)  # the one batch slot is now taken
        waiting_result: dict[str, int] = {}
        waiter = threading.Thread(target=lambda: waiting_result.update(
            status=httpx.post(server.url_for("v1/completions"), timeout=120,
                              json={**body, "max_tokens": 2}).status_code))
        waiter.start()
        deadline = time.monotonic() + 30
        while value(scrape(http), "num_requests_waiting") < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.05)

        for stream in (False, True):
            resp = http.post("/v1/completions", json={**body, "stream": stream})
            assert resp.status_code == 429, resp.text
            assert resp.headers["retry-after"] == "1"
            assert resp.headers["content-type"].startswith("application/json")  # never an SSE body
            error = resp.json()["error"]
            assert error["type"] == "RateLimitError" and error["code"] == 429
        resp = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 429
    waiter.join(120)
    assert waiting_result["status"] == 200  # the queued request was served, not dropped
    assert value(scrape(http), "request_rejected_total", reason="queue_full") == rejected + 3


def test_queue_counts_choices_and_admits_a_burst_one_at_a_time(http, server):
    """With the one slot taken and the one waiting place free: n=2 needs two places (429); of
    three requests sent at the same moment exactly one queues, the others see it (429)."""
    rejected = value(scrape(http), "request_rejected_total", reason="queue_full")
    body = {"model": MODEL_NAME, "prompt": "Busy", "max_tokens": 400, "ignore_eos": True}
    with httpx.Client(base_url=server.base_url, timeout=120) as running_client, \
            running_client.stream("POST", "/v1/completions", json={**body, "stream": True}) as running:
        assert running.status_code == 200
        lines = running.iter_lines()
        next(lines)  # the one batch slot is taken; nothing waits
        resp = http.post("/v1/completions", json={**body, "max_tokens": 2, "n": 2})
        assert resp.status_code == 429, resp.text
        statuses: list[int] = []
        gate = threading.Barrier(3)

        def send() -> None:
            gate.wait()
            statuses.append(httpx.post(server.url_for("v1/completions"), timeout=120,
                                       json={**body, "max_tokens": 2}).status_code)
        burst = [threading.Thread(target=send) for _ in range(3)]
        for t in burst:
            t.start()
        deadline = time.monotonic() + 60
        while len(statuses) < 2:  # the two refusals come back at once; the admitted one waits
            assert time.monotonic() < deadline, statuses
            time.sleep(0.05)
    for t in burst:
        t.join(120)
    assert sorted(statuses) == [200, 429, 429]
    assert value(scrape(http), "request_rejected_total", reason="queue_full") == rejected + 3


def test_n_that_can_never_fit_is_400_not_429(http):
    """One batch slot plus one waiting place: n=3 is refused even on an idle server, so a
    Retry-After would have the client retry forever. It is a 400 naming `n` instead."""
    rejected = value(scrape(http), "request_rejected_total", reason="queue_full")
    resp = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2,
                                              "n": 3})
    assert resp.status_code == 400, resp.text
    assert "retry-after" not in resp.headers
    error = resp.json()["error"]
    assert error["param"] == "n" and "--max-num-queued-requests" in error["message"]
    assert value(scrape(http), "request_rejected_total", reason="queue_full") == rejected
    ok = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2,
                                            "n": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2  # the slot and the place
