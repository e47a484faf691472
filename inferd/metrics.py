"""Prometheus collectors: vLLM's metric set under the `inferd:` prefix, in one place.

`PrometheusStatsSink` implements `inferd.engine.stats.StatsSink`: the engine client calls it
once per engine step (scheduler stats) and once per finished request. Every collector lives in
a per-app `CollectorRegistry`, so several apps (tests, several engines) never collide in
prometheus_client's global registry.

Token counters are fed from finished requests, not from steps: a step may sample tokens that
the frontend later cuts at a stop string, and a preempted prompt is computed twice, so only the
per-request numbers match what clients were billed in `usage`.
"""
from __future__ import annotations

import gzip
from dataclasses import asdict, is_dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import choose_encoder

from inferd.engine.protocol import SchedulerStats
from inferd.engine.stats import FinishedRequestStats

# vLLM hides the `_created` series; it is a process-wide switch in prometheus_client.
disable_created_metrics()

PREFIX = "inferd:"
# vLLM's exposition content type (the 0.0.4 text format every scraper understands).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
PARAMS_N_BUCKETS = [1, 2, 5, 10, 20]
# prometheus-fastapi-instrumentator's HTTP metrics leave these out, as vLLM's do: probes and
# scrapes would drown the traffic that matters.
HTTP_EXCLUDED_HANDLERS = ["/metrics", "/health", "/load", "/ping", "/version", "/server_info"]


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    buckets: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


def iteration_token_buckets(max_num_batched_tokens: int) -> list[int]:
    """1, 8, 16, 32, ... 16384 (vLLM's), plus the step budget itself when it is not a power of 2."""
    buckets = [1] + [2**i for i in range(3, 15)]
    if max_num_batched_tokens not in buckets:
        buckets.append(max_num_batched_tokens)
    return sorted(buckets)


class PrometheusStatsSink:
    """Engine metrics for one served model; `exposition()` is the /metrics body."""

    def __init__(self, model_name: str, max_model_len: int, max_num_batched_tokens: int = 2048,
                 engine_index: str = "0", registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._labels = {"model_name": model_name, "engine": engine_index}
        self._init_gauges()
        self._init_counters()
        self._init_histograms(max_model_len, max_num_batched_tokens)

    # -- construction -------------------------------------------------------------------------

    def _gauge(self, name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
        return Gauge(PREFIX + name, doc, [*self._labels, *extra], registry=self.registry)

    def _counter(self, name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
        return Counter(PREFIX + name, doc, [*self._labels, *extra], registry=self.registry)

    def _histogram(self, name: str, doc: str, buckets: list[float] | list[int]) -> Histogram:
        return Histogram(PREFIX + name, doc, list(self._labels), buckets=buckets,
                         registry=self.registry)

    def _init_gauges(self) -> None:
        L = self._labels
        self.num_running = self._gauge("num_requests_running", "Requests in model execution batches.").labels(**L)
        self.num_waiting = self._gauge("num_requests_waiting", "Requests waiting to be processed.").labels(**L)
        by_reason = self._gauge("num_requests_waiting_by_reason", "Waiting requests by why they wait.",
                                ("reason",))
        # Every waiting request here waits for capacity; nothing is deferred (no KV transfer yet).
        self.num_waiting_capacity = by_reason.labels(**L, reason="capacity")
        by_reason.labels(**L, reason="deferred").set(0)
        sleep = self._gauge("engine_sleep_state", "Engine sleep state; awake = 0 means sleeping.",
                            ("sleep_state",))
        # No sleep mode yet: the engine is always awake with its weights in place.
        for state, value in (("awake", 1), ("weights_offloaded", 0), ("discard_all", 0)):
            sleep.labels(**L, sleep_state=state).set(value)
        self.kv_cache_usage = self._gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.").labels(**L)
        # Registered by set_cache_config_info once the engine has sized its KV pool.
        self._cache_info: Gauge | None = None

    def _init_counters(self) -> None:
        L = self._labels
        self.prefix_queries = self._counter("prefix_cache_queries", "Prefix-cache queries, in tokens.").labels(**L)
        self.prefix_hits = self._counter("prefix_cache_hits", "Prefix-cache hits, in tokens.").labels(**L)
        self.preemptions = self._counter("num_preemptions", "Cumulative number of preemptions.").labels(**L)
        self.prompt_tokens = self._counter("prompt_tokens", "Number of prefill tokens processed.").labels(**L)
        self.prompt_tokens_cached = self._counter("prompt_tokens_cached",
                                                  "Prompt tokens served from the prefix cache.").labels(**L)
        by_source = self._counter("prompt_tokens_by_source", "Prompt tokens by where their KV came from.",
                                  ("source",))
        self.prompt_tokens_computed = by_source.labels(**L, source="local_compute")
        self.prompt_tokens_hit = by_source.labels(**L, source="local_cache_hit")
        by_source.labels(**L, source="external_kv_transfer")  # no KV connector: always 0
        self.generation_tokens = self._counter("generation_tokens", "Number of generation tokens processed.").labels(**L)
        self._success = self._counter("request_success", "Count of successfully processed requests.",
                                      ("finished_reason",))
        for reason in ("stop", "length", "abort", "error", "repetition"):
            self._success.labels(**L, finished_reason=reason)  # expose zeros from the start
        self._rejected = self._counter("request_rejected", "Requests refused before admission, by reason.",
                                       ("reason",))
        for reason in ("queue_full",):
            self._rejected.labels(**L, reason=reason)

    def _init_histograms(self, max_model_len: int, max_num_batched_tokens: int) -> None:
        L = self._labels
        token_buckets = build_1_2_5_buckets(max(max_model_len, 1))
        h = self._histogram
        self.iteration_tokens = h("iteration_tokens_total", "Histogram of number of tokens per engine_step.",
                                  iteration_token_buckets(max_num_batched_tokens)).labels(**L)
        self.req_prompt_tokens = h("request_prompt_tokens", "Number of prefill tokens processed.", token_buckets).labels(**L)
        self.req_gen_tokens = h("request_generation_tokens", "Number of generation tokens processed.", token_buckets).labels(**L)
        self.req_max_gen_tokens = h("request_max_num_generation_tokens",
                                    "Histogram of maximum number of generated tokens per request (over its n choices).",
                                    token_buckets).labels(**L)
        self.req_prefill_computed = h("request_prefill_kv_computed_tokens",
                                      "Histogram of prompt tokens computed (not read from the prefix cache) per request.",
                                      token_buckets).labels(**L)
        self.req_params_n = h("request_params_n", "Histogram of the n request parameter.", PARAMS_N_BUCKETS).labels(**L)
        self.req_params_max_tokens = h("request_params_max_tokens", "Histogram of the max_tokens request parameter.",
                                       token_buckets).labels(**L)
        self.ttft = h("time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS).labels(**L)
        self.itl = h("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS).labels(**L)
        self.tpot = h("request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.",
                      ITL_BUCKETS).labels(**L)
        self.e2e = h("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                     REQUEST_LATENCY_BUCKETS).labels(**L)
        self.queue_time = h("request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
                            REQUEST_LATENCY_BUCKETS).labels(**L)
        self.inference_time = h("request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.",
                                REQUEST_LATENCY_BUCKETS).labels(**L)
        self.prefill_time = h("request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
                              REQUEST_LATENCY_BUCKETS).labels(**L)
        self.decode_time = h("request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
                             REQUEST_LATENCY_BUCKETS).labels(**L)

    def set_cache_config_info(self, cache_config: Any, **extra: Any) -> None:
        """vLLM's info gauge: the cache config fields as labels, value 1. Call once, after sizing."""
        if self._cache_info is not None:
            return
        fields = asdict(cache_config) if is_dataclass(cache_config) else dict(cache_config)
        labels = {k: str(v) for k, v in {**fields, **extra}.items()}
        labels["engine"] = self._labels["engine"]
        self._cache_info = Gauge(PREFIX + "cache_config_info", "Information of the KV cache configuration.",
                                 list(labels), registry=self.registry)
        self._cache_info.labels(**labels).set(1)

    # -- StatsSink ----------------------------------------------------------------------------

    def on_scheduler_stats(self, stats: SchedulerStats) -> None:
        self.num_running.set(stats.num_running_reqs)
        self.num_waiting.set(stats.num_waiting_reqs)
        self.num_waiting_capacity.set(stats.num_waiting_reqs)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.prefix_queries.inc(stats.prefix_cache_queries)
        self.prefix_hits.inc(stats.prefix_cache_hits)
        self.preemptions.inc(stats.num_preemptions)
        step_tokens = stats.num_prompt_tokens + stats.num_generation_tokens
        if step_tokens > 0:  # an idle or all-waiting step computed nothing
            self.iteration_tokens.observe(step_tokens)

    def on_request_finished(self, stats: FinishedRequestStats) -> None:
        self._success.labels(**self._labels, finished_reason=stats.finish_reason).inc()
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        cached = min(stats.num_cached_tokens, stats.num_prompt_tokens)
        self.prompt_tokens_cached.inc(cached)
        self.prompt_tokens_hit.inc(cached)
        self.prompt_tokens_computed.inc(stats.num_prompt_tokens - cached)
        self.req_prefill_computed.observe(stats.num_prompt_tokens - cached)
        if stats.max_num_generation_tokens is not None:
            self.req_max_gen_tokens.observe(stats.max_num_generation_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        self.req_prompt_tokens.observe(stats.num_prompt_tokens)
        self.req_gen_tokens.observe(stats.num_generation_tokens)
        self.req_params_n.observe(stats.n_param)
        if stats.max_tokens_param is not None:
            self.req_params_max_tokens.observe(stats.max_tokens_param)
        if stats.ttft is not None:
            self.ttft.observe(stats.ttft)
        for latency in stats.inter_token_latencies:
            self.itl.observe(latency)
        if stats.num_generation_tokens > 1:
            self.tpot.observe(stats.decode_time / (stats.num_generation_tokens - 1))
        self.e2e.observe(stats.e2e_latency)
        self.queue_time.observe(stats.queued_time)
        self.inference_time.observe(stats.inference_time)
        self.prefill_time.observe(stats.prefill_time)
        self.decode_time.observe(stats.decode_time)

    def on_request_rejected(self, reason: str) -> None:
        self._rejected.labels(**self._labels, reason=reason).inc()

    # -- exposition ---------------------------------------------------------------------------

    def exposition(self, accept: str = "", accept_encoding: str = "") -> tuple[bytes, dict[str, str]]:
        """The /metrics body and headers as prometheus_client's own ASGI app (which vLLM mounts)
        negotiates them: OpenMetrics when asked for, gzip when accepted."""
        encoder, content_type = choose_encoder(accept)
        body = encoder(self.registry)
        headers = {"Content-Type": content_type}
        if "gzip" in accept_encoding:
            body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
        return body, headers

    def instrument_http(self, app: Any) -> None:
        """vLLM's HTTP metrics (`http_requests_total`, request/response sizes, durations) by
        prometheus-fastapi-instrumentator, in this sink's registry."""
        from prometheus_fastapi_instrumentator import Instrumentator

        Instrumentator(excluded_handlers=HTTP_EXCLUDED_HANDLERS, registry=self.registry).instrument(app)
