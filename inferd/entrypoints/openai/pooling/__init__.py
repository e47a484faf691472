"""Pooling endpoints: embeddings, pooling, classify, score, rerank (and their /invocations forms)."""
from __future__ import annotations

from inferd.entrypoints.openai.pooling import router as _routes
from inferd.entrypoints.openai.pooling.schemas import (ClassificationRequest, EmbeddingRequest,
                                                       PoolingRequest, RerankRequest, ScoreRequest)

router = _routes.router


def _register_invocations() -> None:
    """/invocations tries these after chat and completions, in vLLM's priority order; each is a
    candidate only when the model supports its task. (PoolingRequest accepts what the first two
    accept, so it is reached only through fields they reject, e.g. a `task`.)"""
    from inferd.entrypoints.openai.invocations import register_invocation

    register_invocation(EmbeddingRequest, _routes.handle_embeddings, "embed")
    register_invocation(ClassificationRequest, _routes.handle_classify, "classify")
    register_invocation(RerankRequest, _routes.handle_rerank, "score")
    register_invocation(ScoreRequest, _routes.handle_score, "score")
    register_invocation(PoolingRequest, _routes.handle_pooling, "embed")


_register_invocations()

__all__ = ["router"]
