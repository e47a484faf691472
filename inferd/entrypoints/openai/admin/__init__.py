"""Operational routes: /health, /ping, /version, /load, /metrics, /v1/models, elastic-EP stubs.

`router` is always registered; `scaling_router` only for generative models (as vLLM does).
"""
from inferd.entrypoints.openai.admin.router import router, scaling_router

__all__ = ["router", "scaling_router"]
