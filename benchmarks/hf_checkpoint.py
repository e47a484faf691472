"""A safetensors checkpoint of a GGUF's weights, for peers that cannot read GGUF (vLLM,
`transformers serve`): the recipe of ../shared/BENCHMARKS.md.

    .venv/bin/python benchmarks/hf_checkpoint.py OUT_DIR [--gguf FILE] [--dtype bfloat16]

transformers dequantizes the GGUF; its state dict goes into a fresh model built from the same
config without `quantization_config` (transformers refuses to save a GGUF-loaded model), saved
with the tokenizer beside it. Needs `gguf` and `accelerate` in the environment.
"""
from __future__ import annotations

import argparse
import os

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--gguf", default=None, help="default: SmolLM2-135M-Instruct's Q4_1 GGUF")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from inferd.config import default_model_path
    path = args.gguf or default_model_path()
    d, f = os.path.split(path)
    dtype = getattr(torch, args.dtype)
    loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype)
    config = AutoConfig.from_pretrained(d, gguf_file=f)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise SystemExit(f"state dicts differ: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    fresh.save_pretrained(args.out_dir)
    AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(args.out_dir)
    print(f"wrote {args.out_dir} ({args.dtype})")


if __name__ == "__main__":
    main()
