"""Batch-1 decode speed of llama.cpp (llama-cpp-python) on a GGUF: the peer for
benchmarks/throughput.py. Runs under whichever Python has `llama_cpp` installed, so it can live
in its own venv (building it takes minutes; see ../shared/BENCHMARKS.md):

    python -m venv /tmp/llamacpp && CMAKE_ARGS="-DGGML_NATIVE=ON" \\
        /tmp/llamacpp/bin/pip install llama-cpp-python

On the Sapphire Rapids VM the native build (which turns on ggml's AMX kernels) segfaults in
llama_decode; a build with AVX-512 and without AMX runs (~90 tokens/s there, as
../shared/BENCHMARKS.md measured):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON
        -DGGML_AVX512_BF16=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \\
        /tmp/llamacpp/bin/pip install llama-cpp-python

Then:

    /tmp/llamacpp/bin/python benchmarks/llamacpp_decode.py MODEL.gguf --prompt-ids 1,2,3 --tokens 64

Prints one JSON line: {"batch1": tokens/s of the decode loop, "prefill": prompt tokens/s}.
"""
from __future__ import annotations

import argparse
import json
import time


def _request_amx_permission() -> None:
    """llama.cpp built with GGML_NATIVE on an AMX CPU runs tile instructions in its matmuls
    without asking Linux for the AMX state first, and dies of SIGILL (llama-cpp-python 0.3.36).
    Asking on its behalf (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA) before it loads fixes that;
    on other CPUs the call fails harmlessly."""
    import ctypes
    import platform
    if platform.machine() == "x86_64":
        ctypes.CDLL(None, use_errno=True).syscall(158, 0x1023, 18)  # SYS_arch_prctl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    _request_amx_permission()
    from llama_cpp import Llama

    llm = Llama(args.model, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                verbose=False)
    prompt = [int(t) for t in args.prompt_ids.split(",")]
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    prefill = len(prompt) / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(args.tokens):  # greedy, whatever the token (no EOS stop): like ignore_eos
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    batch1 = args.tokens / (time.perf_counter() - t)
    print(json.dumps({"batch1": batch1, "prefill": prefill}))


if __name__ == "__main__":
    main()
