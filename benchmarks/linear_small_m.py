"""Decode-sized matmuls: inferd's 4-bit kernels (GGUF Q4 blocks: skinny, and AMX tiles or
AVX512-BF16 panels) and its bf16 skinny kernel vs oneDNN.

    .venv/bin/python benchmarks/linear_small_m.py [--rows 1 2 4 8 16 32 64]

One pass over the 30 layers of SmolLM2-135M's linear shapes (qkv, o, gate/up, down) with
distinct weights, so each weight comes from memory as it does in a decode step. Prints the best
of three alternating runs per kernel and the ratio to oneDNN's bf16 matmul on prepacked weights
(what the engine uses for larger batches). Run by hand; never a test.
"""
from __future__ import annotations

import argparse
import time

import torch

from inferd.kernels import cpu as kernels
from inferd.models.layers.quant import Q4Weights

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (N, K)
LAYERS = 30


def random_q4(n: int, k: int, g: torch.Generator) -> Q4Weights:
    nb = k // 32
    q = torch.randint(0, 16, (n, nb, 32), generator=g)
    qs = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8).contiguous()
    d = torch.rand(n, nb, generator=g) * 0.01 + 0.001
    return Q4Weights(qs, d, -8 * d)


def best_of(fn, rounds: int = 3, iters: int = 10) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - t) / iters * 1000)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    args = ap.parse_args()
    lib = kernels.load()
    if lib is None or not lib.inferd_has_gemv_bf16():
        raise SystemExit("needs inferd's CPU kernels built on a CPU with AVX512-BF16")
    g = torch.Generator().manual_seed(0)
    q4 = [[random_q4(n, k, g) for n, k in SHAPES] for _ in range(LAYERS)]
    plain = [[torch.randn(n, k, generator=g).bfloat16() * 0.05 for n, k in SHAPES]
             for _ in range(LAYERS)]
    packed = [[torch.ops.mkldnn._reorder_linear_weight(w, None) for w in layer] for layer in plain]
    bf16_bytes = sum(n * k for n, k in SHAPES) * LAYERS * 2
    print(f"threads={torch.get_num_threads()}  weights: {bf16_bytes / 1e6:.0f} MB bf16, "
          f"{bf16_bytes / 1e6 * 0.69 / 2:.0f} MB as 4-bit blocks")
    for m in args.rows:
        xs = [torch.randn(m, k).bfloat16() for _, k in SHAPES]

        def onednn():
            for layer in packed:
                for x, w in zip(xs, layer):
                    torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

        def ours_q4():
            for layer in q4:
                for x, w in zip(xs, layer):
                    kernels.gemv_q4(lib, x, w, None)

        def ours_gemm():
            for layer in q4:
                for x, w in zip(xs, layer):
                    kernels.gemm_q4(lib, x, w, None)

        def ours_bf16():
            for layer in plain:
                for x, w in zip(xs, layer):
                    kernels.gemv_bf16(lib, x, w, None)

        base = best_of(onednn)
        line = f"rows {m}: oneDNN bf16 {base:6.2f} ms"
        runs = [("4-bit AMX" if kernels.has_amx(lib) else "4-bit AVX512", ours_gemm)]
        if m <= 8:
            runs += [("4-bit skinny", ours_q4), ("bf16 skinny", ours_bf16)]
        for name, fn in runs:
            t = best_of(fn)
            line += f" | {name} {t:6.2f} ms ({base / t:.2f}x)"
        print(line)


if __name__ == "__main__":
    main()
