"""Benchmark tools that drive any OpenAI-compatible server over HTTP (inferd or a peer).

`inferd.bench.serve.main` is the load generator behind `benchmarks/serve.py` and `inferd bench
serve`. The package never imports the engine: it measures a server from the outside, so the same
code times inferd, vLLM, llama.cpp and `transformers serve` alike.
"""
