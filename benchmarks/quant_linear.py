"""Quantized linear layers on CPU: kernels per shape, batch-1 decode end to end, and accuracy.

    .venv/bin/python benchmarks/quant_linear.py kernels [--threads 2] [--ms 1,4,16,64] [--cached]
    .venv/bin/python benchmarks/quant_linear.py decode [--modes fp32,int8,int4] [--rounds 6]
                                                       [--output-len 64] [--batch 1] [--threads N]
    .venv/bin/python benchmarks/quant_linear.py quality [--modes int8,int8-weight-only,int4]

kernels: SmolLM2-135M's matmul shapes, fp32 `F.linear` against each candidate (ours and the raw
  torch ops `inferd.models.layers.quant` chose among). Each round cycles over enough copies of the
  weight (>= 64 MB) that it streams from DRAM as in a real decode; --cached reuses one copy.
decode: `LLM(model=None)` (the SmolLM2 Q4_1 GGUF) per mode, greedy decode of --batch (1)
  sequences after 128-token English prompts, step by step through the engine; rounds
  alternate the modes. Reports tokens/s from the median decode step (robust to load spikes)
  and from the mean, and per sequence the position where greedy tokens first differ from the
  first mode's (quantization flips near-ties, after which the texts go their own ways).
quality: teacher-forced logits over a fixed English text vs fp32, as one prefill (M = all
  tokens) and token by token (M = 1): top-1 agreement, mean KL(fp32 || mode), perplexity.

The machine is shared and noisy: a matmul probe and `uptime` are printed first; medians of
alternating rounds and ratios against fp32 from the same run are what to compare.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from probe import matmul_probe  # benchmarks/ is on sys.path when run as a script

from inferd.models.layers.quant import (Int4Linear, Int8Linear, cpu_has_int4_kernel,
                                        quantize_int4_groupwise, quantize_int8_per_channel,
                                        quantize_model)

# name, in_features (K), out_features (N): SmolLM2-135M's fused projections and tied LM head.
SHAPES = [("qkv_proj", 576, 960), ("o_proj", 576, 576), ("gate_up_proj", 576, 3072),
          ("down_proj", 1536, 576), ("lm_head", 576, 49152)]

TEXT = (
    "The river town woke slowly. Fishermen pulled their boats onto the gravel while the baker "
    "opened the shutters and set out the first loaves of the morning. Children ran along the "
    "embankment, shouting at the gulls, and an old man on a bench read yesterday's newspaper "
    "as if the news might still change. By nine o'clock the market square was full: farmers "
    "from the hills sold cheese, apples and honey, and a woman with a cart of flowers called "
    "out prices that nobody believed. In the library, a student opened a book on the history "
    "of bridges. Stone arches, she read, carry their load by pressing each block against its "
    "neighbours, so that the weight of the road becomes a force that runs along the curve and "
    "into the ground. Iron and then steel allowed longer spans, and engineers learned to hang "
    "roads from cables slung between towers. Each new material brought new failures, and each "
    "failure taught a lesson that the next generation wrote into its rules. She closed the book "
    "and looked out of the window at the old bridge, which had stood for three hundred years.")


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def header(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    print(f"load average {load_average()}; torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}"
          f"; threads {torch.get_num_threads()}; matmul probe {matmul_probe():.0f} GFLOP/s fp32")


# --- kernels -----------------------------------------------------------------------------------

Kernel = Callable[[torch.Tensor], torch.Tensor]


def candidates(w: torch.Tensor) -> dict[str, Kernel]:
    """Every way to compute x @ w.T that was considered; first entry is the fp32 baseline."""
    n, k = w.shape
    ours8, ours4 = Int8Linear(w), Int4Linear(w)
    wb = w.bfloat16()
    q8, s8 = quantize_int8_per_channel(w, 127)
    qw = torch.quantize_per_channel(w, s8.double(), torch.zeros(n, dtype=torch.long), 0,
                                    torch.qint8)
    prepacked = torch.ops.quantized.linear_prepack(qw, None)
    fp16 = torch.ops.aten.fbgemm_pack_gemm_matrix_fp16(w)
    return {
        "fp32": lambda x: F.linear(x, w),
        "int8 (ours)": ours8,
        "int4 (ours)": ours4,
        "bf16": lambda x: F.linear(x.bfloat16(), wb),
        "fbgemm linear_dynamic": lambda x: torch.ops.quantized.linear_dynamic(x, prepacked, True),
        "fbgemm fp16": lambda x: torch.ops.aten.fbgemm_linear_fp16_weight_fp32_activation(x, fp16,
                                                                                          None),
        "_weight_int8pack_mm": lambda x: torch._weight_int8pack_mm(x, q8, s8),
    }


SCALAR_ON_AVX2 = {"_weight_int8pack_mm", "int4 (ours)"}


def bench_kernels(args: argparse.Namespace) -> None:
    header(args)
    slow = set() if cpu_has_int4_kernel() else SCALAR_ON_AVX2
    for name, k, n in SHAPES:
        copies = 1 if args.cached else max(2, int(64e6 / (4 * k * n)))
        kernels = [candidates(torch.randn(n, k) * 0.02) for _ in range(copies)]
        for m in args.ms:
            x = torch.randn(m, k)
            times: dict[str, list[float]] = {kname: [] for kname in kernels[0]}
            for _ in range(args.rounds):
                for kname in times:
                    if kname in slow and m > 1:
                        continue  # scalar loops: minutes per round, the M=1 figure says enough
                    group = kernels[:1] if kname in slow else kernels
                    reps = 1 if kname in slow else max(1, 16 // copies)
                    group[0][kname](x)  # warm: first-call allocations, lazy init
                    t = time.perf_counter()
                    for _ in range(reps):
                        for c in group:
                            c[kname](x)
                    times[kname].append((time.perf_counter() - t) / (reps * len(group)))
            base = statistics.median(times["fp32"])
            cells = [f"fp32 {base * 1e6:8.0f} us"]
            for kname, ts in list(times.items())[1:]:
                if ts:
                    med = statistics.median(ts)
                    cells.append(f"{kname} {med * 1e6:.0f} us x{base / med:.2f}")
            print(f"{name:12s} {k:5d}->{n:5d} M={m:3d} (x{copies} copies): " + " | ".join(cells),
                  flush=True)


# --- decode ------------------------------------------------------------------------------------

def make_llm(mode: str, model: str | None):
    """An offline LLM for `mode` (fp32 | int8 | int4), prefix caching off so rounds are equal."""
    from inferd import LLM
    kw = dict(dtype="float32", kv_cache_memory="512MiB", enable_prefix_caching=False,
              max_model_len=2048)
    if mode == "fp32":
        return LLM(model, **kw)
    try:
        return LLM(model, quantization=mode, **kw)
    except TypeError:  # LLM() without the flag yet: quantize the loaded model in place
        llm = LLM(model, **kw)
        quantize_model(llm.engine.core.runner.model, mode)
        print(f"  ({mode}: LLM() has no quantization= yet; quantized the loaded model in place)")
        return llm


def decode_steps(llm, prompts: list[list[int]], n: int, tag: str
                 ) -> tuple[list[float], list[list[int]]]:
    """Greedy-decode n tokens for each prompt together through the engine's own loop: the wall
    time of each decode step (the prefill step excluded; each step yields one token per prompt)
    and each prompt's tokens."""
    from inferd import SamplingParams
    engine = llm.engine
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, sp)
    engine.step()  # prefill (and the first token)
    times, done = [], []
    while engine.has_unfinished():
        t = time.perf_counter()
        done += engine.step()
        times.append(time.perf_counter() - t)
    by_id = {o.request_id: list(o.outputs[0].token_ids) for o in done}
    return times, [by_id[f"{tag}-{i}"] for i in range(len(prompts))]


def bench_decode(args: argparse.Namespace) -> None:
    header(args)
    llms = {mode: make_llm(mode, args.model) for mode in args.modes}
    if args.threads:  # the engine set its own count while loading
        torch.set_num_threads(args.threads)
    B = args.batch
    # English prose, not random ids: random prompts give flat next-token distributions whose
    # near-ties make the greedy-agreement figure meaningless. Sequence i starts i*9 tokens in.
    text = next(iter(llms.values())).tokenizer.encode(TEXT * 2)
    prompts = [text[9 * i:9 * i + args.input_len] for i in range(B)]
    for mode, llm in llms.items():
        decode_steps(llm, prompts, 4, f"warm-{mode}")
    steps: dict[str, list[float]] = {m: [] for m in llms}
    tokens: dict[str, list[list[int]]] = {}
    for r in range(args.rounds):  # modes alternate every round, so load spikes hit all alike
        for mode, llm in llms.items():
            times, tokens[mode] = decode_steps(llm, prompts, args.output_len, f"{mode}-{r}")
            steps[mode] += times
        print(f"round {r}: " + "  ".join(
            f"{m} {B * len(times) / sum(steps[m][-len(times):]):.1f}" for m in llms)
            + " tok/s", flush=True)
    base_mode = args.modes[0]
    base = B / statistics.median(steps[base_mode])
    ref = tokens[base_mode]
    for mode in llms:
        med = B / statistics.median(steps[mode])
        mean = B * len(steps[mode]) / sum(steps[mode])
        same = [next((i for i, (a, b) in enumerate(zip(r, t)) if a != b), len(r))
                for r, t in zip(ref, tokens[mode])]
        print(f"{mode:5s} batch-{B} decode: {med:6.1f} tok/s from the median step "
              f"({mean:.1f} from the mean; {len(steps[mode])} steps)  x{med / base:.2f} vs "
              f"{base_mode}; greedy tokens equal to {base_mode}'s up to position {same} "
              f"(of {args.output_len})")
    print(f"load average after: {load_average()}")


# --- quality -----------------------------------------------------------------------------------

class SequenceRunner:
    """One sequence through a model over a private paged KV cache (prefill chunks or decodes)."""

    def __init__(self, model: torch.nn.Module, max_len: int, block_size: int = 16) -> None:
        from inferd.attention.metadata import build_attention_metadata
        self.model, self.block_size, self.build = model, block_size, build_attention_metadata
        self.blocks = list(range(-(-max_len // block_size)))
        for layer in model.attention_layers():
            layer.kv_cache = torch.zeros(2, len(self.blocks), block_size, layer.num_kv_heads,
                                         layer.head_dim)
        self.length = 0

    @torch.inference_mode()
    def step(self, ids: list[int]) -> torch.Tensor:
        """Feed the next tokens; returns their logits [len(ids), vocab]."""
        meta = self.build([self.length], [len(ids)], [self.blocks], self.block_size)
        pos = torch.arange(self.length, self.length + len(ids))
        self.length += len(ids)
        return self.model.compute_logits(self.model(torch.tensor(ids), pos, meta))


def teacher_forced(model: torch.nn.Module, ids: list[int], one_by_one: bool) -> torch.Tensor:
    runner = SequenceRunner(model, len(ids))
    if not one_by_one:
        return runner.step(ids)
    return torch.cat([runner.step([t]) for t in ids])


def float_copy_with(model: torch.nn.Module, transform: Callable[[torch.Tensor], torch.Tensor]):
    """A deep copy whose Linear weights went through `transform` (weight-only emulation)."""
    import copy

    from inferd.models.layers.linear import Linear, MergedLinear
    m = copy.deepcopy(model)
    with torch.no_grad():
        for mod in m.modules():
            if type(mod) in (Linear, MergedLinear):
                mod.weight = torch.nn.Parameter(transform(mod.weight), requires_grad=False)
    return m


def int8_weight_only(w: torch.Tensor) -> torch.Tensor:
    q, s = quantize_int8_per_channel(w)
    return q.float() * s[:, None]


def int4_weight_only(w: torch.Tensor) -> torch.Tensor:
    q, scale, zero = quantize_int4_groupwise(w)
    n, k = w.shape
    g = q.view(n, k // 32, 32).float() - 8
    return (g * scale[..., None] + zero[..., None]).view(n, k)


class _Int8NoRowScaling(Int8Linear):
    """Ablation: one fbgemm quantization range for the whole multi-row input."""

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self._fbgemm(x).mul_(self.scale)


def quality_models(fp32: torch.nn.Module, modes: list[str]) -> dict[str, torch.nn.Module]:
    import copy
    out = {}
    for mode in modes:
        if mode in ("int8", "int8-no-row-scaling"):
            m = copy.deepcopy(fp32)
            quantize_model(m, "int8")
            if mode == "int8-no-row-scaling":
                for mod in m.modules():
                    if type(mod) is Int8Linear:
                        mod.__class__ = _Int8NoRowScaling
            out[mode] = m
        elif mode == "int8-weight-only":  # 7-bit weights, exact fp32 activations
            out[mode] = float_copy_with(fp32, int8_weight_only)
        elif mode == "int4":  # the int4 kernel is scalar on AVX2: emulate with its exact weights
            out[mode] = float_copy_with(fp32, int4_weight_only)
        else:
            raise SystemExit(f"unknown quality mode {mode!r}")
    return out


def bench_quality(args: argparse.Namespace) -> None:
    from inferd.config import default_model_path
    from inferd.models.gguf import GGUFModel
    from inferd.models.loader import load_hf_config, load_model
    header(args)
    path = args.model or default_model_path()
    ids = GGUFModel(path).tokenizer().encode(TEXT) if path.endswith(".gguf") else None
    if ids is None:
        from transformers import AutoTokenizer
        ids = AutoTokenizer.from_pretrained(path).encode(TEXT)
    fp32 = load_model(path, load_hf_config(path), torch.float32, "cpu")
    models = quality_models(fp32, args.modes)
    target = torch.tensor(ids[1:])

    def perplexity(logprobs: torch.Tensor) -> float:
        return float(torch.exp(-logprobs[:-1].gather(1, target[:, None]).mean()))

    for one_by_one in (False, True):
        regime = "decode, M=1 per step" if one_by_one else f"one prefill, M={len(ids)}"
        ref = teacher_forced(fp32, ids, one_by_one).log_softmax(-1)
        print(f"[{regime}] fp32 perplexity {perplexity(ref):.3f} over {len(ids) - 1} next tokens")
        for mode, m in models.items():
            lp = teacher_forced(m, ids, one_by_one).log_softmax(-1)
            kl = F.kl_div(lp, ref, log_target=True, reduction="none").sum(-1)
            top1 = (lp.argmax(-1) == ref.argmax(-1)).float().mean()
            print(f"  {mode:20s} top-1 = fp32 {top1 * 100:5.1f}%  mean KL {kl.mean():.4f} "
                  f"(max {kl.max():.3f})  perplexity {perplexity(lp):.3f}  max |dlogp| top-1 "
                  f"{(lp - ref).gather(1, ref.argmax(-1, keepdim=True)).abs().max():.3f}",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kernels")
    k.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16, 64])
    k.add_argument("--rounds", type=int, default=7)
    k.add_argument("--cached", action="store_true", help="one weight copy (stays in cache)")
    d = sub.add_parser("decode")
    d.add_argument("--modes", type=lambda s: s.split(","), default=["fp32", "int8"])
    d.add_argument("--rounds", type=int, default=6)
    d.add_argument("--input-len", type=int, default=128)
    d.add_argument("--output-len", type=int, default=64)
    d.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    q = sub.add_parser("quality")
    q.add_argument("--modes", type=lambda s: s.split(","),
                   default=["int8", "int8-no-row-scaling", "int8-weight-only", "int4"])
    for p in (k, d, q):
        p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
        p.add_argument("--model", default=None, help="default: the SmolLM2-135M Q4_1 GGUF")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    {"kernels": bench_kernels, "decode": bench_decode, "quality": bench_quality}[args.cmd](args)


if __name__ == "__main__":
    main()
