"""Block pool and prefix cache, with no model: block ids and ref counts only."""
from loopserve.engine.kv_cache import BlockPool, KVCacheManager
from loopserve.engine.request import Request
from loopserve.sampling_params import SamplingParams

BS = 4


def make_req(rid, tokens, salt=None):
    return Request(rid, tokens, SamplingParams(max_tokens=8), max_model_len=1024, cache_salt=salt)


def pool_whole(kv: KVCacheManager) -> bool:
    return kv.num_free_blocks == kv.num_blocks and all(b.ref_cnt == 0 for b in kv.pool.blocks)


def run_prefill(kv, req, hits=()):
    n = req.num_tokens - len(hits) * BS
    assert kv.allocate(req, n, list(hits))
    req.num_computed_tokens = req.num_tokens
    kv.cache_computed_blocks(req)


def test_allocate_and_free_returns_every_block():
    kv = KVCacheManager(8, BS)
    req = make_req("a", list(range(10)))
    assert kv.allocate(req, 10)
    assert len(kv.block_ids("a")) == 3
    assert kv.num_free_blocks == 5
    kv.free(req)
    assert pool_whole(kv)


def test_allocation_fails_cleanly_when_full():
    kv = KVCacheManager(2, BS)
    req = make_req("a", list(range(12)))
    assert not kv.allocate(req, 12)
    assert kv.block_ids("a") == [] and pool_whole(kv)


def test_prefix_hit_shares_blocks_and_skips_last_token():
    kv = KVCacheManager(16, BS)
    a = make_req("a", list(range(12)))
    run_prefill(kv, a)
    # Same 12 tokens: only 2 full blocks may hit, the last token must be recomputed.
    b = make_req("b", list(range(12)))
    hits = kv.find_cached_prefix(b)
    assert [h.block_id for h in hits] == kv.block_ids("a")[:2]
    c = make_req("c", list(range(13)))
    assert len(kv.find_cached_prefix(c)) == 3
    run_prefill(kv, c, kv.find_cached_prefix(c))
    assert kv.block_ids("c")[:3] == kv.block_ids("a")
    assert all(kv.pool.blocks[i].ref_cnt == 2 for i in kv.block_ids("a"))
    kv.free(a)
    kv.free(c)
    assert pool_whole(kv)


def test_divergent_prefix_stops_at_first_differing_block():
    kv = KVCacheManager(16, BS)
    run_prefill(kv, make_req("a", list(range(16))))
    other = list(range(16))
    other[5] = 99
    assert len(kv.find_cached_prefix(make_req("b", other + [1]))) == 1


def test_cache_salt_isolates_tenants():
    kv = KVCacheManager(16, BS)
    run_prefill(kv, make_req("a", list(range(9)), salt="tenant-1"))
    assert kv.find_cached_prefix(make_req("b", list(range(9)), salt="tenant-2")) == []
    assert kv.find_cached_prefix(make_req("c", list(range(9)))) == []
    assert len(kv.find_cached_prefix(make_req("d", list(range(9)), salt="tenant-1"))) == 2


def test_freed_blocks_stay_cached_until_evicted_lru():
    kv = KVCacheManager(4, BS)
    a = make_req("a", list(range(8)))
    run_prefill(kv, a)
    kv.free(a)
    assert pool_whole(kv)
    # Still findable after free.
    assert len(kv.find_cached_prefix(make_req("a2", list(range(9))))) == 2
    b = make_req("b", list(range(100, 108)))
    run_prefill(kv, b)
    kv.free(b)
    # 4 blocks, all cached; a new 2-block request must evict the least recently used (a's).
    c = make_req("c", list(range(200, 208)))
    run_prefill(kv, c)
    assert kv.find_cached_prefix(make_req("a3", list(range(9)))) == []
    assert len(kv.find_cached_prefix(make_req("b2", list(range(100, 109))))) == 2
    kv.free(c)
    assert pool_whole(kv)


def test_revived_hits_count_against_free_blocks():
    kv = KVCacheManager(3, BS)
    a = make_req("a", list(range(8)))
    run_prefill(kv, a)
    kv.free(a)
    # 3 free blocks, 2 of them are a's cached blocks. A request hitting both needs 2 more: only 1 left.
    b = make_req("b", list(range(8)) + list(range(50, 58)))
    hits = kv.find_cached_prefix(b)
    assert len(hits) == 2
    assert not kv.allocate(b, 8, hits)
    assert pool_whole(kv)
    assert kv.allocate(b, 4, hits)  # a smaller chunk fits
    kv.free(b)
    assert pool_whole(kv)


def test_decode_blocks_are_cached_for_the_next_turn():
    kv = KVCacheManager(8, BS)
    a = make_req("a", list(range(6)))
    run_prefill(kv, a)
    for t in (6, 7, 8):  # three generated tokens complete the second block... and start a third
        a.append_token(t)
        assert kv.allocate(a, 1)
        a.num_computed_tokens += 1
        kv.cache_computed_blocks(a)
    kv.free(a)
    follow_up = make_req("b", list(range(9)) + [42])
    assert len(kv.find_cached_prefix(follow_up)) == 2


def test_identical_concurrent_prefills_do_not_double_index():
    kv = KVCacheManager(8, BS)
    a, b = make_req("a", list(range(8))), make_req("b", list(range(8)))
    assert kv.allocate(a, 8) and kv.allocate(b, 8)
    for r in (a, b):
        r.num_computed_tokens = 8
        kv.cache_computed_blocks(r)
    assert kv.pool.num_cached_blocks == 2
    kv.free(a)
    kv.free(b)
    assert pool_whole(kv)


def test_prefix_caching_off_finds_nothing():
    kv = KVCacheManager(8, BS, enable_prefix_caching=False)
    run_prefill(kv, make_req("a", list(range(9))))
    assert kv.find_cached_prefix(make_req("b", list(range(9)))) == []


def test_block_pool_release_order_evicts_tail_first():
    pool = BlockPool(3, True)
    blocks = pool.allocate(3)
    for i, b in enumerate(blocks):
        pool.cache(b, bytes([i]))
    pool.release(blocks[::-1])
    assert [b.block_id for b in pool.allocate(1)] == [blocks[2].block_id]


def test_block_ids_follow_growth_truncation_and_free():
    """block_ids keeps one list per request in step with its table (decodes grow it by one block now
    and then, a speculative rollback truncates it, a preemption frees it)."""
    kv = KVCacheManager(16, BS)
    req = make_req("a", list(range(6)))
    assert kv.allocate(req, 6)
    first = list(kv.block_ids("a"))
    assert len(first) == 2
    req.num_computed_tokens = 6
    assert kv.allocate(req, 1) and kv.block_ids("a") == first       # fits in the last block
    assert kv.allocate(req, 3)                                       # 9 tokens: a third block
    grown = kv.block_ids("a")
    assert grown[:2] == first and len(grown) == 3
    req.num_computed_tokens = 4
    kv.truncate(req)                                                 # back to one block
    assert kv.block_ids("a") == first[:1]
    assert kv.allocate(req, 6)
    assert kv.block_ids("a") == [b.block_id for b in kv._tables["a"]] and len(kv.block_ids("a")) == 3
    kv.free(req)
    assert kv.block_ids("a") == [] and pool_whole(kv)
    assert not kv.allocate(req, 16 * BS + 1) and kv.block_ids("a") == []  # too big: nothing held


def test_block_digests_are_memoised_exactly_and_bounded():
    """A later turn re-sending the conversation reuses the earlier turn's block digests (no blake2b),
    and they are exactly hash_block's; the memo never outgrows the pool."""
    from loopserve.engine import kv_cache

    kv = KVCacheManager(1024, BS)
    first = make_req("a", list(range(40)), salt="s")
    kv.find_cached_prefix(first)
    calls = []
    real = kv_cache.hash_block
    kv_cache.hash_block = lambda *a: calls.append(a) or real(*a)
    try:
        # The first turn hashed 9 blocks (its last token is never served from cache): 3 more now.
        later = make_req("b", list(range(40)) + [7] * 9, salt="s")
        kv.find_cached_prefix(later)
    finally:
        kv_cache.hash_block = real
    assert len(calls) == 3
    parent, want = None, []
    for i in range(12):
        parent = real(parent, tuple(later.all_token_ids[i * BS:(i + 1) * BS]), "s" if i == 0 else None)
        want.append(parent)
    assert later.block_hashes == want
    other_salt = make_req("c", list(range(40)), salt="t")
    kv.find_cached_prefix(other_salt)
    assert other_salt.block_hashes[0] != first.block_hashes[0]

    small = KVCacheManager(4, BS)
    for i in range(5):
        small.find_cached_prefix(make_req(f"r{i}", list(range(i * 1000, i * 1000 + 4 * 400))))
        assert len(small._digests) <= small._max_digests
