"""Request bodies and response shapes of the pooling routes (vLLM's, reference §1.4).

Unknown fields are accepted and ignored, as vLLM does. Requests are pydantic (the HTTP edge);
responses are plain dicts built here, encoded once by the router.
"""
from __future__ import annotations

import base64
import sys
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from inferd.entrypoints.openai.errors import BadRequest

# A text, texts, token ids, or lists of token ids.
Input = str | list[str] | list[int] | list[list[int]]
EncodingFormat = Literal["float", "base64", "bytes", "bytes_only"]


class PoolingFields(BaseModel):
    """What every pooling request may carry."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    """Keep at most this many tokens per input (-1: the model's maximum); else too long is a 400."""
    truncation_side: Literal["left", "right"] | None = None
    """Which end truncation cuts; default: the tokenizer's (right for BERT-style models)."""
    use_activation: bool | None = None
    """classify/score: softmax or sigmoid on the logits; embeddings: L2 normalisation."""
    add_special_tokens: bool | None = None
    """Default: true for `input`, false for `messages` (the chat template adds them)."""
    user: str | None = None
    priority: int = 0
    request_id: str | None = Field(default=None, max_length=256)


class ChatFields(BaseModel):
    """The chat form (`messages` instead of `input`), rendered with the chat template."""

    messages: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class InputRequest(PoolingFields, ChatFields):
    input: Input | None = None

    @model_validator(mode="after")
    def _one_form(self) -> "InputRequest":
        if (self.input is None) == (self.messages is None):
            raise ValueError("exactly one of `input` or `messages` must be given")
        return self


class EncodedOutput(BaseModel):
    encoding_format: EncodingFormat = "float"
    embed_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    endianness: Literal["native", "little", "big"] = "native"
    dimensions: int | None = None
    normalize: bool | None = None


class EmbeddingRequest(InputRequest, EncodedOutput):
    """POST /v1/embeddings (OpenAI's fields plus vLLM's)."""


class ClassificationRequest(InputRequest):
    """POST /classify."""


class PoolingRequest(InputRequest, EncodedOutput):
    """POST /pooling: the raw pooler output."""

    task: Literal["embed", "classify", "score", "token_embed", "encode"] | None = None


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str


class RerankRequest(PoolingFields):
    """POST /rerank, /v1/rerank, /v2/rerank (Jina / Cohere style)."""

    query: str
    documents: list[str | RerankDocument]
    top_n: int | None = 0
    """How many results to return, best first; 0 (or absent) returns all."""
    return_documents: bool = True

    def document_texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class ScoreRequest(PoolingFields):
    """POST /score and /v1/score: `text_1`/`text_2`, `data_1`/`data_2`, `queries`/`documents`
    or `queries`/`items`; each side a string or a list of strings."""

    text_1: str | list[str] | None = None
    text_2: str | list[str] | None = None
    data_1: str | list[str] | None = None
    data_2: str | list[str] | None = None
    queries: str | list[str] | None = None
    documents: str | list[str] | None = None
    items: str | list[str] | None = None

    @model_validator(mode="after")
    def _one_pair_of_sides(self) -> "ScoreRequest":
        self.sides()  # raises when no form, or more than one, is complete
        return self

    def sides(self) -> tuple[list[str], list[str]]:
        forms = [(self.text_1, self.text_2), (self.data_1, self.data_2),
                 (self.queries, self.documents), (self.queries, self.items)]
        complete = [(a, b) for a, b in forms if a is not None and b is not None]
        if len(complete) != 1:
            raise ValueError("give the two sides as text_1/text_2, data_1/data_2, "
                             "queries/documents or queries/items")
        left, right = complete[0]
        return ([left] if isinstance(left, str) else list(left),
                [right] if isinstance(right, str) else list(right))


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------
def usage(prompt_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
            "completion_tokens": 0, "prompt_tokens_details": None}


def check_encoding(req: EncodedOutput) -> None:
    """Before any engine work: vLLM's octet-stream `bytes` formats are not served."""
    if req.encoding_format not in ("float", "base64"):
        raise BadRequest(f"encoding_format {req.encoding_format!r} is not supported; use float "
                         "or base64", param="encoding_format")


def encode_vector(values: list[float] | list[list[float]], req: EncodedOutput) -> Any:
    """A vector as JSON floats, or base64 of its bytes (`embed_dtype`, `endianness`)."""
    check_encoding(req)
    if req.encoding_format == "float":
        return values
    order = sys.byteorder if req.endianness == "native" else req.endianness
    t = torch.tensor(values, dtype=torch.float32).flatten()
    if req.embed_dtype == "bfloat16":  # numpy has no bfloat16: reinterpret the bits as int16
        arr = t.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2" if order == "little" else ">i2")
    else:
        kind = "f4" if req.embed_dtype == "float32" else "f2"
        arr = t.numpy().astype(("<" if order == "little" else ">") + kind)
    return base64.b64encode(arr.tobytes()).decode("ascii")


def list_response(request_id: str, model: str, created: int, data: list[dict[str, Any]],
                  prompt_tokens: int) -> dict[str, Any]:
    """The envelope /v1/embeddings, /pooling, /classify and /score share."""
    return {"id": request_id, "object": "list", "created": created, "model": model, "data": data,
            "usage": usage(prompt_tokens)}


def embedding_item(index: int, vector: Any) -> dict[str, Any]:
    return {"index": index, "object": "embedding", "embedding": vector}


def pooling_item(index: int, data: Any) -> dict[str, Any]:
    return {"index": index, "object": "pooling", "data": data}


def classification_item(index: int, probs: list[float], id2label: dict[Any, str]) -> dict[str, Any]:
    best = int(np.argmax(probs))
    label = id2label.get(best, id2label.get(str(best), f"LABEL_{best}")) if id2label else None
    return {"index": index, "label": label, "probs": probs, "num_classes": len(probs)}


def score_item(index: int, score: float) -> dict[str, Any]:
    return {"index": index, "object": "score", "score": score}


def rerank_response(request_id: str, model: str, results: list[dict[str, Any]],
                    prompt_tokens: int) -> dict[str, Any]:
    return {"id": request_id, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            "results": results}


def rerank_item(index: int, score: float, text: str | None) -> dict[str, Any]:
    return {"index": index, "document": {"text": text} if text is not None else None,
            "relevance_score": score}
