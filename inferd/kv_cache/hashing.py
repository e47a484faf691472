"""Chained block hashes: a block's hash covers its tokens and every block before it.

SHA-256 rather than Python's `hash()`: a collision would hand one request another's KV,
and token ids are attacker-chosen, so the hash must be collision resistant.
"""
from __future__ import annotations

import hashlib
from array import array

ROOT_HASH = b"inferd-kv-v1"


def hash_block(parent: bytes | None, token_ids: list[int], salt: str | None = None) -> bytes:
    h = hashlib.sha256(parent if parent is not None else ROOT_HASH)
    if parent is None and salt:
        h.update(b"salt:" + salt.encode())
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def extend_block_hashes(hashes: list[bytes], token_ids: list[int], block_size: int,
                        salt: str | None = None, num_tokens: int | None = None) -> None:
    """Append the hashes of every newly full block among the first `num_tokens` tokens (in place)."""
    n = len(token_ids) if num_tokens is None else min(num_tokens, len(token_ids))
    num_full = n // block_size
    for i in range(len(hashes), num_full):
        parent = hashes[i - 1] if i else None
        hashes.append(hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], salt))
