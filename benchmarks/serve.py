"""Serving benchmark against any OpenAI-compatible server (inferd or a peer), over HTTP.

    .venv/bin/python benchmarks/serve.py --workload ii --base-url http://127.0.0.1:8000
    .venv/bin/python benchmarks/serve.py --help

The code lives in inferd/bench/serve.py so that `inferd bench serve` runs the same thing.
"""
from __future__ import annotations

import sys

from inferd.bench.serve import main

if __name__ == "__main__":
    sys.exit(main())
