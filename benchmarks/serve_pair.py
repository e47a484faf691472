"""Two OpenAI-compatible servers, alternately, on the same prompts: ratios, not lone numbers.

    .venv/bin/python benchmarks/serve_pair.py --a http://127.0.0.1:8000 --b http://127.0.0.1:8100 \\
        [--workload ii iii] [--rounds 2] [--label-a inferd] [--label-b vllm]

The machines are shared and their speed drifts by 15% or more within an hour, so a figure is
only worth its ratio to a peer measured next to it. Each round draws a fresh prompt seed (a
rerun of old prompts would be served partly from a prefix cache), runs every workload on both
servers with that seed, and swaps which server goes first from one round to the next. Prints
output tokens/s and p50 TTFT per run, then the A/B throughput ratio per round and its range.
Run by hand, with both servers already started; never a test.
"""
from __future__ import annotations

import argparse
import asyncio
import random

from inferd.bench import serve as bench


def run_one(base_url: str, workload: str, seed: int) -> dict:
    parser = bench.build_parser()
    ns = bench.resolve_args(parser.parse_args(["--base-url", base_url, "--workload", workload,
                                               "--seed", str(seed)]), parser)
    report, _ = asyncio.run(bench.benchmark(ns))
    return report["summary"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="base URL of server A (the numerator)")
    ap.add_argument("--b", required=True, help="base URL of server B")
    ap.add_argument("--label-a", default="A")
    ap.add_argument("--label-b", default="B")
    ap.add_argument("--workload", nargs="+", default=["ii", "iii"], choices=sorted(bench.WORKLOADS))
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    servers = [(args.label_a, args.a), (args.label_b, args.b)]
    ratios: dict[str, list[float]] = {w: [] for w in args.workload}
    for rnd in range(args.rounds):
        seed = random.SystemRandom().randrange(1 << 31)
        for w in args.workload:
            got = {}
            for label, url in servers if rnd % 2 == 0 else servers[::-1]:
                s = run_one(url, w, seed)
                ttft = (s["ttft_s"] or {}).get("p50")
                errors = f", {s['errors']} errors" if s["errors"] else ""
                print(f"round {rnd + 1} ({w}, seed {seed}) {label}: "
                      f"{s['output_tokens_per_s']:.1f} out tok/s, p50 TTFT "
                      f"{'-' if ttft is None else f'{ttft:.2f} s'}{errors}", flush=True)
                got[label] = s["output_tokens_per_s"]
            if got[args.label_b] > 0:
                ratios[w].append(got[args.label_a] / got[args.label_b])
    for w, rs in ratios.items():
        if rs:
            print(f"({w}) {args.label_a}/{args.label_b}: "
                  + " / ".join(f"{r:.2f}x" for r in rs) + f"  (range {min(rs):.2f}-{max(rs):.2f}x)")


if __name__ == "__main__":
    main()
