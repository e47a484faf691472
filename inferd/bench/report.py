"""Presenting a run: the printed table, the JSON file, and the optional plot."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from inferd.bench.stats import RequestResult

WIDTH = 72
LABEL = 38  # the widest label, "Cold start (command -> first 200)", and a gap
RULE = "-" * WIDTH


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table for a report built by `inferd.bench.serve`."""
    s, run, server = report["summary"], report["run"], report.get("server", {})
    lines = [f"{' Serving benchmark: ' + (run.get('label') or run['model']) + ' ':=^{WIDTH}}"]

    def row(name: str, value: str) -> None:
        lines.append(f"{name:<{LABEL}}{value}")

    row("Server", f"{run['base_url']}  ({run['endpoint']}, "
                  f"{'streaming' if run['stream'] else 'not streaming'})")
    row("Model", run["model"])
    row("Workload", f"{run['num_requests']} requests, concurrency {run['concurrency']}, "
                    f"{run['input_len']} in / {run['output_len']} out"
                    f"{', ignore_eos' if run['ignore_eos'] else ''}")
    row("Prompts", run["prompts"])
    if run.get("matmul_gflops") is not None:
        row("Matmul probe (fp32, numpy)", f"{run['matmul_gflops']:.0f} GFLOP/s")
    if server.get("cold_start_s") is not None:
        row("Cold start (command -> first 200)", f"{server['cold_start_s']:.2f} s")
    if server.get("peak_rss_bytes"):
        row("Peak RSS, server process tree", f"{server['peak_rss_bytes'] / 1e9:.2f} GB "
                                             f"({server['rss_samples']} samples)")
    lines.append(RULE)
    row("Successful requests", f"{s['completed']} / {s['requests']}"
                               + (f"  ({run['not_sent']} not sent: time limit)"
                                  if run.get("not_sent") else ""))
    row("Errors", str(s["errors"]))
    row("Benchmark duration", f"{s['duration_s']:.2f} s")
    estimated = s["prompt_tokens_estimated"]
    row("Prompt tokens", str(s["prompt_tokens"])
        + (f"  ({estimated} requests without usage: --input-len assumed)" if estimated else ""))
    counted = s["output_tokens_counted_from_chunks"]
    row("Output tokens", str(s["output_tokens"])
        + (f"  ({counted} requests counted by chunks)" if counted else ""))
    if run["ignore_eos"] and report.get("short_requests"):
        row("Requests short of output_len", str(report["short_requests"]))
    row("Requests/s", f"{s['requests_per_s']:.2f}")
    row("Output tokens/s", f"{s['output_tokens_per_s']:.1f}")
    row("Total tokens/s", f"{s['total_tokens_per_s']:.1f}")
    lines.append(RULE)
    lines.append(f"{'(ms)':<{LABEL}}{'mean':>8}{'p50':>8}{'p90':>8}{'p99':>8}")
    for key, name in (("ttft_s", "Time to first token"), ("tpot_s", "Time per output token"),
                      ("itl_s", "Inter-token latency"), ("e2e_s", "End-to-end latency")):
        dist = s[key]
        if dist is None:
            row(name, f"{'n/a':>8}")
            continue
        cells = "".join(f"{dist[k] * 1000:>8.1f}" for k in ("mean", "p50", "p90", "p99"))
        lines.append(f"{name:<{LABEL}}{cells}")
    for msg in s["error_messages"]:
        lines.append(f"error: {msg}")
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def write_json(path: str | Path, report: dict[str, Any], results: Sequence[RequestResult]) -> None:
    """Everything: run settings, server measurements, summary, and every request's timings."""
    data = {**report, "requests": [r.to_json() for r in results]}
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def plot(path: str | Path, results: Sequence[RequestResult], title: str) -> str | None:
    """TTFT and ITL histograms and a per-request timeline, as a PNG. None when done; else why not
    (matplotlib is optional, so its absence is a message, not a failure)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: never open a window
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: pip install matplotlib to get --plot"
    ok = [r for r in results if r.ok]
    fig, (ax_ttft, ax_itl, ax_time) = plt.subplots(1, 3, figsize=(16, 4.5))
    ax_ttft.hist([r.ttft * 1000 for r in ok if r.ttft is not None], bins=30)
    ax_ttft.set(title="TTFT", xlabel="ms", ylabel="requests")
    ax_itl.hist([x * 1000 for r in ok for x in r.itl], bins=50)
    ax_itl.set(title="Inter-token latency", xlabel="ms", ylabel="tokens")
    for r in results:
        # Waiting for the first token in grey, streaming in blue, failed requests in red.
        first = r.ttft if r.ttft is not None else 0.0
        ax_time.barh(r.index, first, left=r.start, color="0.7")
        ax_time.barh(r.index, r.e2e - first, left=r.start + first,
                     color="tab:blue" if r.ok else "tab:red")
    ax_time.set(title="Requests (grey: until first token)", xlabel="s since start",
                ylabel="request")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
