"""Paged KV-cache bookkeeping: a pool of fixed-size blocks, per-request block tables, prefix cache.

The prefix cache is a hash chain over *full* blocks: a block's hash covers its parent's hash, its
token ids and (first block only) the request's cache salt, so equal hashes mean equal prefixes.
Blocks are ref-counted; a block whose count drops to zero keeps its contents and stays findable by
hash until the allocator evicts it, least recently used first. This module never touches tensors:
it hands out block ids, and the model runner owns the memory they index.
"""
from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from dataclasses import dataclass

from loopserve.engine.request import Request

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: tuple[int, ...], salt: str | None) -> BlockHash:
    """Content hash of one full block; collisions would silently mix requests, so use a real digest."""
    payload = pickle.dumps((parent, token_ids, salt), protocol=pickle.HIGHEST_PROTOCOL)
    return hashlib.blake2b(payload, digest_size=16).digest()


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None


class BlockPool:
    """All blocks, the free queue (eviction order: front first) and the hash -> block index."""

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least 1 block, got {num_blocks}")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.enable_caching = enable_caching
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[BlockHash, KVBlock] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def lookup(self, block_hash: BlockHash) -> KVBlock | None:
        return self._cached.get(block_hash)

    def allocate(self, n: int) -> list[KVBlock]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks with {len(self._free)} free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
            block.block_hash = None

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on prefix-cache hits, pulling unreferenced ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def release(self, blocks: list[KVBlock]) -> None:
        """Drop a reference; pass blocks tail-first so a sequence's last blocks are evicted first."""
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} released twice"
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
                if block.block_hash is None:
                    # Nothing to reuse in it: hand it out before any cached block.
                    self._free.move_to_end(block.block_id, last=False)

    def cache(self, block: KVBlock, block_hash: BlockHash) -> None:
        if block.block_hash is not None:
            return
        if block_hash in self._cached:
            return  # an identical block was computed concurrently; keep the first, this one stays private
        block.block_hash = block_hash
        self._cached[block_hash] = block

    def reset_prefix_cache(self) -> None:
        for block in list(self._cached.values()):
            block.block_hash = None
        self._cached.clear()


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0
    requests: int = 0


class KVCacheManager:
    """Block tables per request on top of a BlockPool, with prefix-cache lookup and insertion."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self._tables: dict[str, list[KVBlock]] = {}
        self._num_hashed: dict[str, int] = {}  # leading blocks of each table already in the index
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        """Share of blocks referenced by live requests (cached-but-free blocks count as free)."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._tables.get(request_id, ())]

    def _update_hashes(self, request: Request, num_tokens: int) -> None:
        bs = self.block_size
        hashes = request.block_hashes
        tokens = request.all_token_ids
        for i in range(len(hashes), num_tokens // bs):
            parent = hashes[i - 1] if i else None
            hashes.append(hash_block(parent, tuple(tokens[i * bs:(i + 1) * bs]),
                                     request.cache_salt if i == 0 else None))

    def find_cached_prefix(self, request: Request) -> list[KVBlock]:
        """Longest run of cached full blocks at the start of the request's tokens.

        The last token is never served from cache: its forward pass produces the next logits.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._update_hashes(request, max_blocks * self.block_size)
        hits = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate(self, request: Request, num_new_tokens: int, cached: list[KVBlock] = ()) -> bool:
        """Make the table cover num_computed_tokens (+ cached hits) + num_new_tokens; False if no room.

        `cached` are prefix hits for a request that holds no blocks yet.
        """
        table = self._tables.setdefault(request.request_id, [])
        assert not cached or not table, "prefix hits are only taken by a request without blocks"
        computed = request.num_computed_tokens + len(cached) * self.block_size
        needed = -(-(computed + num_new_tokens) // self.block_size) - len(table) - len(cached)
        revived = sum(1 for b in cached if b.ref_cnt == 0)  # hits that currently sit in the free queue
        if needed > self.pool.num_free_blocks - revived:
            if not table:
                del self._tables[request.request_id]
            return False
        if cached:
            self.pool.touch(list(cached))
            table.extend(cached)
            self._num_hashed[request.request_id] = len(cached)
        if needed > 0:
            table.extend(self.pool.allocate(needed))
        return True

    def record_hit(self, request: Request, num_hit_tokens: int) -> None:
        self.stats.requests += 1
        self.stats.queried_tokens += request.num_tokens
        self.stats.hit_tokens += num_hit_tokens

    def cache_computed_blocks(self, request: Request) -> None:
        """Index the request's newly completed full blocks so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        table = self._tables.get(rid)
        if not table:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(table))
        start = self._num_hashed.get(rid, 0)
        if num_full <= start:
            return
        self._update_hashes(request, num_full * self.block_size)
        for i in range(start, num_full):
            self.pool.cache(table[i], request.block_hashes[i])
        self._num_hashed[rid] = num_full

    def truncate(self, request: Request) -> None:
        """Release the blocks past the request's computed tokens (rejected speculative tokens' KV).

        Safe for the prefix cache: only full blocks below num_computed_tokens are ever hashed, and
        the released tail blocks hold nothing the cache indexes.
        """
        table = self._tables.get(request.request_id)
        if not table:
            return
        keep = -(-request.num_computed_tokens // self.block_size)
        if len(table) > keep:
            assert self._num_hashed.get(request.request_id, 0) <= keep
            surplus = table[keep:]
            del table[keep:]
            self.pool.release(surplus[::-1])

    def free(self, request: Request) -> None:
        table = self._tables.pop(request.request_id, None)
        self._num_hashed.pop(request.request_id, None)
        if table:
            self.pool.release(table[::-1])

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; only allowed when no request holds blocks."""
        if self._tables:
            return False
        self.pool.reset_prefix_cache()
        return True
