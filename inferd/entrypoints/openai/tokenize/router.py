"""POST /tokenize (completion and chat forms) and POST /detokenize."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Request

from inferd.entrypoints.openai.state import get_state
from inferd.entrypoints.openai.tokenize import service
from inferd.entrypoints.openai.tokenize.schemas import (DetokenizeRequest, DetokenizeResponse,
                                                        TokenizeResponse, parse_tokenize_request)

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(raw_request: Request, body: dict[str, Any] = Body(...)) -> TokenizeResponse:
    """`{prompt}` (completion form) or `{messages}` (chat form, rendered with the chat template)."""
    return await service.tokenize(get_state(raw_request), parse_tokenize_request(body))


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(raw_request: Request, request: DetokenizeRequest) -> DetokenizeResponse:
    return await service.detokenize(get_state(raw_request), request)
