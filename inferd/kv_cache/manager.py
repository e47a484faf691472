"""Which blocks each request holds, prefix-cache lookups, and allocation for a step."""
from __future__ import annotations

from inferd.kv_cache.block_pool import BlockPool, KVCacheBlock
from inferd.kv_cache.hashing import extend_block_hashes
from inferd.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        # Prefix-cache counters since the last `take_stats`, in tokens.
        self.queries = 0
        self.hits = 0

    @property
    def usage(self) -> float:
        return self.pool.usage

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, req: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of the request's tokens, in whole blocks.

        At least one token is always left to compute: the step needs its logits.
        """
        if not self.enable_caching or (req.sampling_params is not None
                                       and req.sampling_params.prompt_logprobs is not None):
            # Prompt logprobs need logits at every prompt position, so nothing may be skipped.
            return [], 0
        extend_block_hashes(req.block_hashes, req.all_token_ids, self.block_size, req.cache_salt)
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for h in req.block_hashes[:max_blocks]:
            b = self.pool.get_cached_block(h)
            if b is None:
                break
            hits.append(b)
        return hits, len(hits) * self.block_size

    def record_prefix_lookup(self, num_tokens: int, num_hit: int) -> None:
        """Counted once per admitted request, not per (possibly failed) lookup."""
        if not self.enable_caching:
            return
        self.queries += num_tokens
        self.hits += num_hit
        self.pool.record_lookup(num_tokens, num_hit)

    def can_allocate(self, req: Request, num_new_tokens: int,
                     new_computed: list[KVCacheBlock] = ()) -> bool:
        return self._num_needed(req, num_new_tokens, new_computed) <= self.pool.num_free_blocks

    def _num_needed(self, req: Request, num_new_tokens: int, new_computed) -> int:
        held = len(self.req_blocks.get(req.request_id, ()))
        total = self.num_blocks_for(req.num_computed_tokens + len(new_computed) * self.block_size
                                    + num_new_tokens)
        # Cache hits that sit on the free list stop being free once touched.
        evictable_hits = sum(1 for b in new_computed if b.ref_cnt == 0)
        return max(0, total - held - len(new_computed)) + evictable_hits

    def allocate_slots(self, req: Request, num_new_tokens: int,
                       new_computed: list[KVCacheBlock] = ()) -> bool:
        """Reserve blocks so the request can hold `num_new_tokens` more tokens; False if the pool is short.

        `new_computed` are prefix-cache hits from `get_computed_blocks` for a request that holds no
        blocks yet; the caller then advances `num_computed_tokens` past them.
        """
        if self._num_needed(req, num_new_tokens, new_computed) > self.pool.num_free_blocks:
            return False
        blocks = self.req_blocks.setdefault(req.request_id, [])
        if new_computed:
            assert not blocks, "prefix hits are only taken before the first allocation"
            self.pool.touch(list(new_computed))
            blocks.extend(new_computed)
        total = self.num_blocks_for(req.num_computed_tokens + len(new_computed) * self.block_size
                                    + num_new_tokens)
        if total > len(blocks):
            blocks.extend(self.pool.get_new_blocks(total - len(blocks)))
        self._cache_full_blocks(req, req.num_computed_tokens + len(new_computed) * self.block_size
                                + num_new_tokens)
        return True

    def _cache_full_blocks(self, req: Request, num_tokens: int) -> None:
        """Publish blocks that will be full after this step.

        Safe before the forward runs: every layer writes all of a step's K/V before any
        attention reads, so a request that hits these blocks in the same step sees them.
        """
        if not self.enable_caching:
            return
        known = min(num_tokens, req.num_tokens)
        extend_block_hashes(req.block_hashes, req.all_token_ids, self.block_size, req.cache_salt,
                            num_tokens=known)
        blocks = self.req_blocks[req.request_id]
        # Blocks below `num_cached_blocks` were published in an earlier step.
        start = req.num_cached_blocks
        for i in range(start, known // self.block_size):
            self.pool.cache_block(blocks[i], req.block_hashes[i])
        req.num_cached_blocks = max(start, known // self.block_size)

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def free(self, req: Request) -> None:
        """Release every block the request holds; tail blocks go to the free list first (evicted first)."""
        blocks = self.req_blocks.pop(req.request_id, None)
        if blocks:
            self.pool.free_blocks(list(reversed(blocks)))

    def take_stats(self) -> tuple[int, int]:
        q, h = self.queries, self.hits
        self.queries = self.hits = 0
        return q, h

    def num_held_blocks(self) -> int:
        return sum(len(v) for v in self.req_blocks.values())
