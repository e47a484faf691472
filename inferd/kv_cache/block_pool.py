"""The pool of fixed-size KV blocks: ref counts, the free list, and the prefix-cache hash map.

Free blocks sit in an intrusive doubly linked list in eviction order (least recently
freed first), so taking, returning, and pulling a cached block back out of the free list
are all O(1). A free block keeps its hash until it is handed out again, which is what
lets a later request reuse it: that is the whole prefix cache.

Blocks never handed out yet are kept apart, in id order. On CPU the pool's pages are committed
by their first write (`worker.model_runner.lazy_zeros`), and that write is a page fault per
page: on the 2-core VM, a 2048-token prefill step of SmolLM2 spent 140 ms writing K/V into
fresh blocks and 9 ms into blocks written before. Evicting the least recently freed cached
block instead costs nothing unless a later request would have hit it. So the pool takes a
fresh block only while recent lookups find prefix hits (at least `GROW_HIT_RATE` of the
queried tokens) or when no freed block is left; with no reuse in sight (random or unique
prompts) it recycles written blocks, which also keeps the resident memory at what the load
needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None  # set once the block is full and its tokens are known
    prev_free: KVCacheBlock | None = field(default=None, repr=False)
    next_free: KVCacheBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """Doubly linked list of free blocks, empty at first; head is evicted first."""

    def __init__(self) -> None:
        self.num_free = 0
        # Sentinels remove the empty-list special cases from every operation.
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head

    def first(self) -> KVCacheBlock | None:
        b = self._head.next_free
        return None if b is self._tail else b

    def popleft(self) -> KVCacheBlock:
        b = self._head.next_free
        if b is self._tail or b is None:
            raise RuntimeError("no free KV blocks")
        self.remove(b)
        return b

    def remove(self, b: KVCacheBlock) -> None:
        assert b.prev_free is not None and b.next_free is not None, f"block {b.block_id} not free"
        b.prev_free.next_free, b.next_free.prev_free = b.next_free, b.prev_free
        b.prev_free = b.next_free = None
        self.num_free -= 1

    def append(self, b: KVCacheBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free, b.prev_free, b.next_free, self._tail.prev_free = b, last, self._tail, b
        self.num_free += 1

    def block_ids(self) -> list[int]:
        """Eviction order, for tests."""
        out, b = [], self._head.next_free
        while b is not None and b is not self._tail:
            out.append(b.block_id)
            b = b.next_free
        return out


GROW_HIT_RATE = 0.02
"""Recent prefix-hit rate (hit / queried prompt tokens) from which the pool grows into fresh
blocks rather than evict cached ones."""
HIT_RATE_DECAY = 0.98
"""Weight of the past per recorded lookup: the rate follows roughly the last 50 requests."""


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue()  # blocks handed out before and freed since
        self._fresh = list(range(num_blocks - 1, -1, -1))  # never handed out; pop() -> lowest id
        self.cached: dict[bytes, KVCacheBlock] = {}
        self._queried = 0.0  # decayed prefix-lookup counts, in tokens
        self._hit = 0.0

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free + len(self._fresh)

    def free_block_ids(self) -> list[int]:
        """Freed blocks in eviction order, then the fresh ones in the order they are taken
        (for tests)."""
        return self.free_queue.block_ids() + self._fresh[::-1]

    def record_lookup(self, num_tokens: int, num_hit: int) -> None:
        self._queried = self._queried * HIT_RATE_DECAY + num_tokens
        self._hit = self._hit * HIT_RATE_DECAY + num_hit

    def _take_fresh(self) -> bool:
        """The next block comes from the never-used ones rather than the freed ones (see the
        module doc)."""
        if not self._fresh:
            return False
        oldest = self.free_queue.first()
        if oldest is None:
            return True
        if not self.enable_caching or oldest.block_hash is None:
            return False  # the oldest freed block holds nothing a lookup could find
        return self._queried > 0 and self._hit >= GROW_HIT_RATE * self._queried

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_cached_block(self, block_hash: bytes) -> KVCacheBlock | None:
        return self.cached.get(block_hash)

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        if n > self.num_free_blocks:
            raise RuntimeError(f"asked for {n} KV blocks, {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            if self._take_fresh():
                b = self.blocks[self._fresh.pop()]
            else:
                b = self.free_queue.popleft()
                self._evict(b)
            b.ref_cnt = 1
            out.append(b)
        return out

    def _evict(self, b: KVCacheBlock) -> None:
        if b.block_hash is not None:
            if self.cached.get(b.block_hash) is b:
                del self.cached[b.block_hash]
            b.block_hash = None

    def touch(self, blocks: list[KVCacheBlock]) -> None:
        """Take a reference on prefix-cache hits; a hit on a free block pulls it off the free list."""
        for b in blocks:
            if b.ref_cnt == 0:
                self.free_queue.remove(b)
            b.ref_cnt += 1

    def free_blocks(self, blocks: list[KVCacheBlock]) -> None:
        """Drop one reference each; blocks reaching zero join the free list's tail in the given order."""
        for b in blocks:
            b.ref_cnt -= 1
            assert b.ref_cnt >= 0, f"block {b.block_id} freed twice"
            if b.ref_cnt == 0:
                if not self.enable_caching:
                    b.block_hash = None
                self.free_queue.append(b)

    def cache_block(self, b: KVCacheBlock, block_hash: bytes) -> None:
        if not self.enable_caching or b.block_hash is not None:
            return
        b.block_hash = block_hash
        # First writer wins: an identical block computed twice stays a private copy.
        self.cached.setdefault(block_hash, b)

    def reset_prefix_cache(self) -> None:
        for b in self.blocks:
            b.block_hash = None
        self.cached.clear()
