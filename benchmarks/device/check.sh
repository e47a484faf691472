#!/usr/bin/env bash
# Run ON the GPU machine, through the device tool, after benchmarks/device/prepare.sh here:
#   command: bash benchmarks/device/check.sh     carry: [".device"]     timeout_s: 540
# One pass, ~5-8 minutes on an H200: the CUDA tests (the Triton decode kernel compiled, the
# engine with and without CUDA graphs against transformers), then offline throughput on a
# SmolLM2-135M-shaped model with random weights (speed does not depend on the values), with
# CUDA graphs and with --enforce-eager, and transformers `generate` on the same GPU.
# Logs go to $OUT (the tool brings them back).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .device/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/models/test_cuda.py \
    tests/unit/test_triton_attention.py 2>&1 | tee "$OUT/tests.log"
python3 - <<'PY' 2>&1 | tee "$OUT/build.log"
import torch
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
cfg = AutoConfig.from_pretrained(".device/smollm2")
torch.manual_seed(0)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained("/tmp/smol-random")
AutoTokenizer.from_pretrained(".device/smollm2").save_pretrained("/tmp/smol-random")
print("built /tmp/smol-random")
PY
for mode in graphs eager; do
    flag=""; [ $mode = eager ] && flag="--enforce-eager --skip-transformers"
    timeout 150 python3 benchmarks/throughput.py --model /tmp/smol-random --device cuda \
        --dtype bfloat16 $flag 2>&1 | grep -v Loading | tee "$OUT/throughput-$mode.log"
done
