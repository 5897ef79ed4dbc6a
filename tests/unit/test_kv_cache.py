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


def _digests(tokens, salt=None, n=None):
    """hash_block's chain over the first n full blocks of tokens."""
    from loopserve.engine.kv_cache import hash_block

    parent, out = None, []
    for i in range(len(tokens) // BS if n is None else n):
        parent = hash_block(parent, tuple(tokens[i * BS:(i + 1) * BS]), salt if i == 0 else None)
        out.append(parent)
    return out


class _CountingDict(dict):
    """The digest memo, counting its lookups."""
    lookups = 0

    def get(self, key, default=None):
        self.lookups += 1
        return super().get(key, default)


def test_block_digests_are_memoised_exactly_and_bounded():
    """A later turn re-sending the conversation reuses the earlier turn's block digests (no blake2b),
    and they are exactly hash_block's; the memo never outgrows the pool."""
    from loopserve.engine import kv_cache

    kv = KVCacheManager(1024, BS)
    first = make_req("a", list(range(40)), salt="s")
    kv._update_hashes(first, 40)
    calls = []
    real = kv_cache.hash_block
    kv_cache.hash_block = lambda *a: calls.append(a) or real(*a)
    try:
        later = make_req("b", list(range(40)) + [7] * 9, salt="s")
        kv._update_hashes(later, 49)  # 12 full blocks: the first turn hashed 10
    finally:
        kv_cache.hash_block = real
    assert len(calls) == 2
    assert later.block_hashes == _digests(later.all_token_ids, "s")
    other_salt = make_req("c", list(range(40)), salt="t")
    kv._update_hashes(other_salt, 4)
    assert other_salt.block_hashes[0] != first.block_hashes[0]

    small = KVCacheManager(4, BS)
    for i in range(5):
        small._update_hashes(make_req(f"r{i}", list(range(i * 1000, i * 1000 + 4 * 400))), 4 * 400)
        assert len(small._digests) <= small._max_digests


def test_lookup_hashes_only_as_far_as_it_hits():
    """A cold prompt's blocks are not hashed before its first chunk: the lookup stops at the first
    block it misses, and caching the computed blocks hashes the rest. A lookup that hits hashes ahead
    in batches of as many blocks as it has found."""
    kv = KVCacheManager(64, BS)
    cold = make_req("a", list(range(40)))
    assert kv.find_cached_prefix(cold) == [] and len(cold.block_hashes) == 1
    run_prefill(kv, cold)
    assert cold.block_hashes == _digests(cold.all_token_ids)
    turn = make_req("b", list(range(40)) + [9] * 12)
    assert len(kv.find_cached_prefix(turn)) == 10
    # Batches of 1, 1, 2, 4, then the 4 blocks left before the last token's: every one it may look up.
    assert turn.block_hashes == _digests(turn.all_token_ids, n=12)


def test_a_turn_takes_the_digests_its_previous_turn_hashed():
    """A finished request's hashed blocks stay with their digests (by session and first block): the
    next request over the same conversation takes the digests of every block it shares with it at
    once, a diverging one only those before it diverges, and each gets exactly hash_block's chain. A
    request of another session or cache salt takes none."""
    kv = KVCacheManager(64, BS)
    a = make_req("a", list(range(40)))
    run_prefill(kv, a)
    kv.free(a)
    kv._digests = memo = _CountingDict(kv._digests)
    b = make_req("b", list(range(40)) + [9] * 9)
    assert len(kv.find_cached_prefix(b)) == 10
    assert memo.lookups == 3  # the first block, then the two past the conversation (the batch after ten)
    assert b.block_hashes == _digests(b.all_token_ids, n=12)

    c = make_req("c", list(range(24)) + [5] * 20)  # diverges in the seventh block
    memo.lookups = 0
    assert len(kv.find_cached_prefix(c)) == 6
    assert memo.lookups == 5 and c.block_hashes == _digests(c.all_token_ids, n=10)  # 1, then blocks 6-9

    session = Request("d", list(range(40)) + [9] * 9, SamplingParams(max_tokens=8), max_model_len=1024,
                      session_id="s1")
    memo.lookups = 0
    assert len(kv.find_cached_prefix(session)) == 10  # the blocks are cached all the same
    assert memo.lookups == 12 and session.block_hashes == _digests(session.all_token_ids, n=12)
    salted = make_req("e", list(range(40)) + [9] * 9, salt="t")
    assert kv.find_cached_prefix(salted) == [] and salted.block_hashes == _digests(salted.all_token_ids, "t", n=1)


def test_remembered_runs_are_bounded():
    """Finished requests' runs hold at most max(the pool's tokens, RUN_COMPARE_BLOCKS blocks), the
    oldest going first, and one a key (a session's or first block's latest)."""
    from loopserve.engine.kv_cache import RUN_COMPARE_BLOCKS

    kv = KVCacheManager(8, BS)
    bound = max(8 * BS, RUN_COMPARE_BLOCKS * BS)
    keys = []
    for i in range(2 * bound // 16):
        req = make_req(f"r{i}", [1000 * i + t for t in range(17)])
        kv._update_hashes(req, 16)
        kv.free(req)
        keys.append((None, req.block_hashes[0]))
        assert kv._run_tokens == sum(len(r.token_ids) for r in kv._runs.values()) <= bound
    assert list(kv._runs) == keys[-(bound // 16):]
    again = make_req("again", [1000 * 3 + t for t in range(17)] + [5] * 8)  # the same first block as r3's
    kv._update_hashes(again, 24)
    kv.free(again)
    assert list(kv._runs)[-1] == keys[3] and len(kv._runs[keys[3]].token_ids) == 24
