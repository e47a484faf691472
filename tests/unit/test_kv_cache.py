"""KV block pool, prefix cache and scheduler bookkeeping, checked exactly (no model involved)."""
from __future__ import annotations

import pytest

from inferd.config import SchedulerConfig
from inferd.kv_cache.block_pool import BlockPool
from inferd.kv_cache.hashing import extend_block_hashes, hash_block
from inferd.kv_cache.manager import KVCacheManager
from inferd.request import Request, RequestStatus
from inferd.sampling_params import SamplingParams
from inferd.scheduler.scheduler import Scheduler

BS = 4


def req(rid: str, tokens: list[int], max_tokens: int = 8, salt: str | None = None, **kw) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw),
                   eos_token_ids=(0,), cache_salt=salt)


def test_free_queue_order_and_o1_removal():
    pool = BlockPool(5)
    assert pool.free_block_ids() == [0, 1, 2, 3, 4] and pool.free_queue.block_ids() == []
    a, b, c = pool.get_new_blocks(3)
    assert [x.block_id for x in (a, b, c)] == [0, 1, 2] and a.ref_cnt == b.ref_cnt == 1
    assert pool.free_block_ids() == [3, 4]
    pool.free_blocks([c, b, a])  # freed in this order -> evicted in this order
    assert pool.free_queue.block_ids() == [2, 1, 0]
    assert pool.free_block_ids() == [2, 1, 0, 3, 4]
    pool.touch([b])  # a cache hit on a free block pulls it out of the middle
    assert pool.free_queue.block_ids() == [2, 0]
    assert b.ref_cnt == 1
    assert pool.num_free_blocks == 4


def test_recycles_written_blocks_while_lookups_find_no_hits():
    """Fresh blocks cost a page fault on first write (CPU): with no prefix reuse in sight the
    pool evicts the oldest freed cached block instead of growing."""
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = req("a", list(range(1, 9)))  # 2 full blocks
    kv.record_prefix_lookup(8, 0)
    kv.allocate_slots(a, 8)
    kv.free(a)
    assert kv.pool.free_block_ids() == [1, 0, 2, 3, 4, 5, 6, 7]
    b = req("b", [50 + i for i in range(9)])  # nothing shared
    assert kv.get_computed_blocks(b) == ([], 0)
    kv.record_prefix_lookup(9, 0)
    assert kv.allocate_slots(b, 9)
    assert kv.block_ids("b") == [1, 0, 2]  # a's blocks first, LRU order, then one fresh
    assert kv.get_computed_blocks(req("a2", list(range(1, 9)) + [3]))[1] == 0  # a evicted


def test_grows_into_fresh_blocks_while_prefixes_are_hit():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = req("a", list(range(1, 9)))
    kv.allocate_slots(a, 8)
    kv.free(a)
    kv.record_prefix_lookup(8, 4)  # recent lookups hit: cached blocks are worth keeping
    b = req("b", [50 + i for i in range(9)])
    assert kv.allocate_slots(b, 9)
    assert kv.block_ids("b") == [2, 3, 4]
    c = req("c", list(range(1, 9)) + [7])
    assert kv.get_computed_blocks(c)[1] == 8  # both of a's blocks survived
    kv.free(b)
    assert kv.pool.free_block_ids() == [1, 0, 4, 3, 2, 5, 6, 7]
    assert kv.allocate_slots(req("d", [90]), 1) and kv.block_ids("d") == [5]
    # A freed block without a hash (a partial tail) holds nothing to find: reused first.
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    e = req("e", list(range(1, 7)))  # one full block, one partial
    kv.allocate_slots(e, 6)
    kv.free(e)
    kv.record_prefix_lookup(8, 8)
    assert kv.pool.free_block_ids()[:2] == [1, 0] and kv.pool.blocks[1].block_hash is None
    assert kv.allocate_slots(req("f", [90]), 1) and kv.block_ids("f") == [1]
    assert kv.allocate_slots(req("g", [91]), 1) and kv.block_ids("g") == [2]  # 0 stays cached


def test_without_prefix_caching_the_pool_recycles():
    kv = KVCacheManager(num_blocks=6, block_size=BS, enable_prefix_caching=False)
    a = req("a", list(range(1, 9)))
    kv.allocate_slots(a, 8)
    kv.free(a)
    assert kv.allocate_slots(req("b", list(range(1, 9))), 8)
    assert kv.block_ids("b") == [1, 0]


def test_chained_hashes_depend_on_prefix_and_salt():
    h1 = hash_block(None, [1, 2, 3, 4])
    assert hash_block(None, [1, 2, 3, 4]) == h1
    assert hash_block(h1, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])
    assert hash_block(None, [1, 2, 3, 4], salt="tenant-a") != h1
    hashes: list[bytes] = []
    extend_block_hashes(hashes, list(range(10)), BS)
    assert len(hashes) == 2 and hashes[1] == hash_block(hashes[0], [4, 5, 6, 7])
    extend_block_hashes(hashes, list(range(12)), BS)
    assert len(hashes) == 3


def test_allocate_exact_block_ids_and_prefix_reuse():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = req("a", list(range(1, 11)))  # 10 tokens: 2 full blocks + 2 tokens
    hits, n = kv.get_computed_blocks(a)
    assert hits == [] and n == 0
    assert kv.allocate_slots(a, 10)
    assert kv.block_ids("a") == [0, 1, 2]
    a.num_computed_tokens = 10
    # Same first 8 tokens: both full blocks are reused, only the tail is new.
    b = req("b", list(range(1, 9)) + [99, 98, 97])
    hits, n = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and n == 8
    assert kv.allocate_slots(b, 3, hits)
    assert kv.block_ids("b") == [0, 1, 3]
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    # A different salt shares nothing.
    c = req("c", list(range(1, 11)), salt="other")
    assert kv.get_computed_blocks(c) == ([], 0)


def test_full_hit_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = req("a", list(range(1, 9)))  # exactly 2 blocks
    kv.allocate_slots(a, 8)
    b = req("b", list(range(1, 9)))
    hits, n = kv.get_computed_blocks(b)
    assert n == 4 and len(hits) == 1  # the last block is recomputed: its logits are needed


def test_free_then_evict_lru_and_reuse_after_free():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = req("a", list(range(1, 9)))
    kv.allocate_slots(a, 8)
    kv.free(a)
    # Tail block first: the shared prefix (block 0) is evicted last; blocks 2, 3 never used.
    assert kv.pool.free_block_ids() == [1, 0, 2, 3]
    assert kv.pool.num_free_blocks == 4
    b = req("b", list(range(1, 5)) + [50, 51, 52, 53, 54])
    hits, n = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0] and n == 4
    kv.record_prefix_lookup(9, 4)  # a hit: the pool keeps cached blocks and grows
    assert kv.allocate_slots(b, 5, hits)
    assert kv.block_ids("b") == [0, 2, 3]
    # Block 1 (a's second block) is still cached and free; block 0 is held again.
    assert kv.pool.blocks[0].ref_cnt == 1 and kv.pool.blocks[1].block_hash is not None
    c = req("c", [7] * 4)
    assert kv.allocate_slots(c, 4)  # takes the last free block: evicts a's cached block 1
    assert kv.block_ids("c") == [1]
    assert kv.pool.blocks[1].block_hash is None or kv.pool.blocks[1].block_hash not in (
        a.block_hashes[1],)


def test_allocation_fails_cleanly_when_pool_is_short():
    kv = KVCacheManager(num_blocks=2, block_size=BS)
    a = req("a", list(range(1, 13)))
    assert not kv.allocate_slots(a, 12)
    assert kv.block_ids("a") == [] and kv.pool.num_free_blocks == 2


def make_scheduler(num_blocks: int, budget: int = 64, max_seqs: int = 8) -> Scheduler:
    kv = KVCacheManager(num_blocks=num_blocks, block_size=BS)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs), kv, max_model_len=64,
                     max_num_batched_tokens=budget)


def run_step(s: Scheduler, token: int = 5) -> tuple:
    out = s.schedule()
    sampled = {x.request.request_id: token for x in out.scheduled if x.samples}
    return out, s.update_from_output(out, sampled)


def test_chunked_prefill_under_budget():
    s = make_scheduler(num_blocks=16, budget=6)
    s.add_request(req("a", list(range(1, 15))))  # 14 tokens -> chunks 6, 6, 2
    chunks = []
    for _ in range(3):
        out, _ = run_step(s)
        chunks.append([(x.request.request_id, x.num_computed_tokens, x.num_new_tokens) for x in out.scheduled])
    assert chunks[0] == [("a", 0, 6)] and chunks[1] == [("a", 6, 6)]
    assert chunks[2][0] == ("a", 12, 2)
    assert s.requests["a"].num_output_tokens == 1


def test_decodes_and_prefills_share_a_step_decodes_first():
    s = make_scheduler(num_blocks=16, budget=16)
    s.add_request(req("a", [1, 2, 3]))
    run_step(s)  # a prefilled, sampled one token
    s.add_request(req("b", [4, 5, 6, 7, 8]))
    out, _ = run_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 5)]


def test_preemption_keeps_oldest_progressing_and_frees_blocks():
    s = make_scheduler(num_blocks=4, budget=64)  # 16 token slots in all
    s.add_request(req("old", [1] * 6, max_tokens=9, ignore_eos=True))
    s.add_request(req("new", [2] * 6, max_tokens=9, ignore_eos=True))
    finished = []
    preemptions = 0
    for _ in range(60):
        out, fin = run_step(s, token=9)
        preemptions += out.num_preemptions
        finished += [r.request_id for r in fin]
        if not s.has_unfinished():
            break
    assert finished[0] == "old" and set(finished) == {"old", "new"}
    assert preemptions >= 1
    assert s.kv.num_held_blocks() == 0 and s.kv.pool.num_free_blocks == 4


def test_abort_at_any_moment_frees_everything():
    for abort_after in range(0, 6):
        s = make_scheduler(num_blocks=8, budget=4)
        reqs = [req(f"r{i}", list(range(1, 9)), max_tokens=5) for i in range(3)]
        for r in reqs:
            s.add_request(r)
        for _ in range(abort_after):
            run_step(s)
        s.abort([r.request_id for r in reqs])
        assert all(r.status == RequestStatus.FINISHED_ABORTED or r.is_finished for r in reqs)
        assert not s.has_unfinished()
        assert s.kv.num_held_blocks() == 0
        assert s.kv.pool.num_free_blocks == 8
        assert all(b.ref_cnt == 0 for b in s.kv.pool.blocks)


def test_stop_conditions():
    s = make_scheduler(num_blocks=16)
    s.add_request(req("eos", [1, 2], max_tokens=5))
    _, fin = run_step(s, token=0)  # 0 is EOS
    assert [r.request_id for r in fin] == ["eos"] and fin[0].status == RequestStatus.FINISHED_STOPPED
    s.add_request(req("min", [1, 2], max_tokens=5, min_tokens=2))
    _, fin = run_step(s, token=0)
    assert fin == []  # EOS ignored below min_tokens
    s.add_request(req("stoptok", [1, 2], max_tokens=5, stop_token_ids=[7]))
    _, fin = run_step(s, token=7)
    stopped = {r.request_id: r for r in fin}
    assert stopped["stoptok"].stop_reason == 7
    s.add_request(req("len", [1, 2], max_tokens=2))
    run_step(s, token=5)
    _, fin = run_step(s, token=5)
    assert any(r.request_id == "len" and r.status == RequestStatus.FINISHED_LENGTH for r in fin)


@pytest.mark.parametrize("enable", [True, False])
def test_prefix_cache_stats_count_once_per_request(enable):
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_prefix_caching=enable)
    s = Scheduler(SchedulerConfig(), kv, max_model_len=64, max_num_batched_tokens=64)
    s.add_request(req("a", list(range(1, 10))))
    run_step(s)
    s.add_request(req("b", list(range(1, 10))))
    run_step(s)
    q, h = kv.take_stats()
    if enable:
        assert (q, h) == (18, 8)
    else:
        assert (q, h) == (0, 0)


def _mappings_over(lo: int, hi: int) -> tuple[int, set[str]]:
    """Rss in kB summed, and VmFlags joined, over the /proc/self/smaps mappings meeting
    [lo, hi) (an madvise can split one allocation into several)."""
    rss, flags, inside = 0, set(), False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                a, b = (int(x, 16) for x in head.split("-"))
                inside = a < hi and lo < b
            elif inside and head == "Rss:":
                rss += int(line.split()[1])
            elif inside and head == "VmFlags:":
                flags |= set(line.split()[1:])
    assert flags, f"no mapping meets {lo:#x}"
    return rss, flags


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/smaps"), reason="Linux only")
def test_lazy_kv_pool_is_zero_lazily_committed_and_not_huge_page_advised():
    import torch

    from inferd.worker.model_runner import lazy_zeros
    cache = lazy_zeros((2, 4096, 16, 4, 64), torch.bfloat16, torch.device("cpu"))  # 64 MiB
    assert cache.shape == (2, 4096, 16, 4, 64) and cache.dtype == torch.bfloat16
    assert cache.is_contiguous()
    span = (cache.data_ptr(), cache.data_ptr() + cache.numel() * 2)
    rss, flags = _mappings_over(*span)
    # "hg" is MADV_HUGEPAGE: advised ranges may stall on compaction at their first write.
    # (kB; under THP "always" a first write may still commit a 2 MiB page, not 64 MiB)
    assert "hg" not in flags and rss < 8192, (rss, flags)
    cache[1, 100:102] = 2.5  # two blocks: a few pages, not the pool
    rss_after, _ = _mappings_over(*span)
    assert rss_after < 8192
    view = cache[1]
    del cache
    import gc
    gc.collect()
    assert view[100:102].eq(2.5).all()  # the write survives the first handle
    assert int(view.count_nonzero()) == 2 * 16 * 4 * 64  # and everything else reads as zeros
    assert int(view[0].count_nonzero()) == 0
    assert lazy_zeros((0, 8), torch.float32, torch.device("cpu")).shape == (0, 8)
