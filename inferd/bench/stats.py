"""Per-request measurements and the statistics reported over them.

Definitions (the same as vLLM's serving benchmark, so numbers compare across tools):
- TTFT: request sent → first chunk that carries output (text, or tokens per the usage counts).
- ITL: the gap between consecutive output-carrying chunks. A chunk that carries k tokens
  contributes k gaps of gap/k, so servers that batch tokens into chunks are not flattered.
- TPOT: (e2e − TTFT) / (output tokens − 1): the mean decode time per token after the first.
- Throughput: tokens over the wall time of the whole measured run, not a sum of per-request rates.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence


@dataclass
class RequestResult:
    """What one request measured. Times are seconds; `start` is relative to the run's start."""
    index: int
    start: float = 0.0
    e2e: float = 0.0
    ttft: float | None = None  # None when not streaming, or no output arrived
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None  # from usage; None when the server sent none
    output_tokens_from_usage: bool = False  # False: counted chunks, an estimate
    chunks: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None when it is undefined."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tpot"] = self.tpot
        return d


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100) with linear interpolation between order statistics (numpy's
    default), so p50 of an even count is the mean of the middle two."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values: Sequence[float], quantiles: Sequence[float]) -> dict[str, float] | None:
    """{'mean', 'p50', ...} of `values`; None when there are none (TTFT without streaming)."""
    if not values:
        return None
    out = {"mean": sum(values) / len(values)}
    for q in quantiles:
        out[f"p{q:g}"] = percentile(values, q)
    return out


def summarize(results: Sequence[RequestResult], duration: float, prompt_len: int = 0,
              max_errors: int = 5) -> dict[str, Any]:
    """The run's report: counts, throughput over `duration` (the measured wall time) and the
    latency distributions over successful requests. `prompt_len` stands in for the prompt tokens
    of requests whose server sent no usage."""
    ok = [r for r in results if r.ok]
    errors = [r for r in results if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(prompt_len if r.prompt_tokens is None else r.prompt_tokens for r in ok)
    per_s = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    return {
        "duration_s": duration,
        "requests": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "error_messages": _first_distinct([r.error for r in errors if r.error], max_errors),
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_estimated": sum(1 for r in ok if r.prompt_tokens is None),
        "output_tokens": out_tokens,
        "output_tokens_counted_from_chunks": sum(1 for r in ok if not r.output_tokens_from_usage),
        "requests_per_s": per_s(len(ok)),
        "output_tokens_per_s": per_s(out_tokens),
        "total_tokens_per_s": per_s(out_tokens + prompt_tokens),
        "ttft_s": distribution([r.ttft for r in ok if r.ttft is not None], (50, 90, 99)),
        "tpot_s": distribution([t for r in ok if (t := r.tpot) is not None], (50, 90, 99)),
        "itl_s": distribution([x for r in ok for x in r.itl], (50, 90, 99)),
        "e2e_s": distribution([r.e2e for r in ok], (50, 90, 99)),
    }


def _first_distinct(messages: list[str], limit: int) -> list[str]:
    """The first `limit` different messages: one failure repeated 64 times is one line."""
    seen: list[str] = []
    for m in messages:
        if m not in seen:
            seen.append(m)
            if len(seen) == limit:
                break
    return seen
