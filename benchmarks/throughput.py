"""Offline throughput: inferd vs transformers `generate`, same model and dtype, same run.

    .venv/bin/python benchmarks/throughput.py [--num-requests 256] [--input-len 128] [--output-len 128]
        [--device cpu|cuda] [--enforce-eager]

Workloads: (a) N requests of I prompt + O output tokens (ignore_eos) all submitted at once;
(b) batch-1 decode of O tokens. Prints tokens/s and inferd/transformers ratios. Run by hand;
the machines are noisy, so a matmul probe is printed first and ratios matter more than numbers.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from probe import matmul_probe  # benchmarks/ is on sys.path when run as a script


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n, length), generator=g).tolist()


def bench_inferd(model: str, prompts, out_len: int, dtype: str, batch1_tokens: int,
                 device: str = "auto", enforce_eager: bool = False) -> dict:
    from inferd import LLM, SamplingParams
    llm = LLM(model, dtype=dtype, max_model_len=2048, device=device, enforce_eager=enforce_eager)
    sp = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=4, ignore_eos=True))
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
    dt = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"throughput": n_out / dt, "batch1": decode_only(llm, prompts[0], batch1_tokens),
            "elapsed": dt}


def decode_only(llm, prompt: list[int], tokens: int) -> float:
    """Batch-1 decode tokens/s with the prompt's prefill excluded (llama.cpp's script measures
    the same): the first step prefills and samples token 1, the timed steps make the rest."""
    from inferd import SamplingParams
    llm.engine.add_request("batch1", prompt, SamplingParams(max_tokens=tokens + 1, temperature=0.0,
                                                            ignore_eos=True))
    llm.engine.step()
    t = time.perf_counter()
    steps = 0
    while llm.engine.has_unfinished():
        llm.engine.step()  # one token per step: the only request decodes
        steps += 1
    return steps / (time.perf_counter() - t)


def load_hf(model: str, torch_dtype):
    from transformers import AutoModelForCausalLM
    if model.endswith(".gguf"):
        d, f = os.path.split(model)
        return AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch_dtype).eval()
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).eval()


@torch.inference_mode()
def bench_transformers(model: str, prompts, out_len: int, torch_dtype, batch_size: int,
                       batch1_tokens: int, device: str = "cpu") -> dict:
    m = load_hf(model, torch_dtype).to(device)
    kw = dict(do_sample=False, min_new_tokens=out_len, max_new_tokens=out_len, pad_token_id=0)
    t = time.perf_counter()
    n_out = 0
    for i in range(0, len(prompts), batch_size):
        ids = torch.tensor(prompts[i:i + batch_size], device=device)
        out = m.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        n_out += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    dt = time.perf_counter() - t
    ids = torch.tensor(prompts[:1], device=device)
    t = time.perf_counter()
    m.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=batch1_tokens,
               max_new_tokens=batch1_tokens, pad_token_id=0)
    dt1 = time.perf_counter() - t
    return {"throughput": n_out / dt, "batch1": batch1_tokens / dt1, "elapsed": dt}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--batch1-tokens", type=int, default=128)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (GPU)")
    args = ap.parse_args()
    from inferd.config import default_model_path, resolve_device, resolve_dtype
    model = args.model or default_model_path()
    device = resolve_device(args.device)
    torch_dtype = resolve_dtype(args.dtype, device)
    if device == "cpu":
        print(f"matmul probe: {matmul_probe():.0f} GFLOP/s fp32 (threads={torch.get_num_threads()})")
    prompts = random_prompts(args.num_requests, args.input_len, 49152)
    ours = bench_inferd(model, prompts, args.output_len, args.dtype, args.batch1_tokens, device,
                        args.enforce_eager)
    print(f"inferd       {args.num_requests}x{args.input_len}/{args.output_len}: "
          f"{ours['throughput']:.1f} out tok/s   batch-1 decode: {ours['batch1']:.1f} tok/s   ({torch_dtype})")
    if args.skip_transformers:
        return
    ref = bench_transformers(model, prompts, args.output_len, torch_dtype, args.hf_batch_size,
                             args.batch1_tokens, device)
    print(f"transformers batch {args.hf_batch_size}: {ref['throughput']:.1f} out tok/s   "
          f"batch-1 decode: {ref['batch1']:.1f} tok/s")
    print(f"ratio inferd/transformers: throughput {ours['throughput'] / ref['throughput']:.2f}x, "
          f"batch-1 {ours['batch1'] / ref['batch1']:.2f}x")


if __name__ == "__main__":
    main()
