#!/usr/bin/env bash
# Run HERE (no GPU needed) before a session's device check: fills .device/ (git-ignored) with
# what the GPU machine lacks and cannot download (it has no network): the wheels inferd needs
# beyond that image's torch/transformers/triton, for its Python 3.12, and SmolLM2-135M's
# tokenizer and config, exported from the GGUF the set-up installs (the GGUF itself, ~90 MB,
# is over the 64 MiB a call carries, so the check builds random weights of the same shape).
#   bash benchmarks/device/prepare.sh
# then: device run, carry [".device"], command "bash benchmarks/device/check.sh" (see there).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
rm -rf .device && mkdir -p .device/whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .device/whl msgspec
$PY - <<'PY'
from transformers import AutoConfig, AutoTokenizer
from inferd.config import default_model_path
import os
d, f = os.path.split(default_model_path())
AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(".device/smollm2")
AutoConfig.from_pretrained(d, gguf_file=f).save_pretrained(".device/smollm2")
PY
du -sh .device
