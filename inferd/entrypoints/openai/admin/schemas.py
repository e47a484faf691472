"""Response shapes of the admin routes (vLLM's ModelCard and friends)."""
from __future__ import annotations

import secrets
import time

from pydantic import BaseModel, Field


class ModelPermission(BaseModel):
    id: str = Field(default_factory=lambda: f"modelperm-{secrets.token_hex(16)}")
    object: str = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "inferd"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=lambda: [ModelPermission()])


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard] = Field(default_factory=list)


class ScaleElasticEPRequest(BaseModel):
    """vLLM's body for /scale_elastic_ep: both values positive integers."""
    new_data_parallel_size: int = Field(gt=0, strict=True)
    drain_timeout: int = Field(default=120, gt=0, strict=True)
