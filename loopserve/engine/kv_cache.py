"""Paged KV-cache bookkeeping: a pool of fixed-size blocks, per-request block tables, prefix cache.

The prefix cache is a hash chain over *full* blocks: a block's hash covers its parent's hash, its
token ids and (first block only) the request's cache salt, so equal hashes mean equal prefixes.
Blocks are ref-counted; a block whose count drops to zero keeps its contents and stays findable by
hash until the allocator evicts it, least recently used first. This module never touches tensors:
it hands out block ids, and the model runner owns the memory they index.

Block movement the runner must do is queued as KVOps, executed in order before the next forward:
* offload: a block marked `offload_on_evict` (a retained session's block forced out by memory
  pressure) is copied to a host slot when the allocator hands it to someone else;
* restore: a prefix lookup that continues past the device cache into the host index gets fresh
  device blocks filled from host slots instead of recomputing them;
* copy: copy-on-write at a divergence. When a new request shares the first tokens of a block but not
  all of them (fan-out workers, n > 1 samples), it copies the donor block into a block of its own
  and computes only from the first differing token.
"""
from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from loopserve.engine.request import Request, RequestStatus

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: tuple[int, ...], salt: str | None) -> BlockHash:
    """Content hash of one full block; collisions would silently mix requests, so use a real digest."""
    payload = pickle.dumps((parent, token_ids, salt), protocol=pickle.HIGHEST_PROTOCOL)
    return hashlib.blake2b(payload, digest_size=16).digest()


# Blocks compared at once while finding where a request leaves its HashedRun (then block by block).
RUN_COMPARE_BLOCKS = 64


@dataclass(frozen=True)
class HashedRun:
    """A finished request's tokens in full blocks and their digests (block_hashes): the next turn of
    its conversation re-sends them, and need not hash them again."""
    token_ids: list[int]
    hashes: list[BlockHash]


def shared_blocks(tokens: list[int], run_tokens: list[int], n: int, block_size: int) -> int:
    """How many leading full blocks (at most n) the two token lists agree on: RUN_COMPARE_BLOCKS blocks
    a list compare, then block by block within the first that differs."""
    k = 0
    while k < n:
        m = min(n, k + RUN_COMPARE_BLOCKS)
        if tokens[k * block_size:m * block_size] != run_tokens[k * block_size:m * block_size]:
            while tokens[k * block_size:(k + 1) * block_size] == run_tokens[k * block_size:(k + 1) * block_size]:
                k += 1
            return k
        k = m
    return k


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    # Set while cached: the key of its parent in the chain and its tokens (copy-on-write donors).
    parent_key: object = None
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class KVOp:
    kind: str  # "offload": device block -> host slot; "restore": host slot -> device block; "copy": device -> device
    src: int
    dst: int


@dataclass
class KVMoveStats:
    offloaded_blocks: int = 0
    restored_blocks: int = 0
    cow_copies: int = 0
    cow_tokens: int = 0  # prompt tokens served by copy-on-write instead of recomputed


def _parent_key(parent: BlockHash | None, salt: str | None) -> object:
    return parent if parent is not None else ("root", salt)


class HostBlockIndex:
    """Which block hashes have a copy in host memory, in which slot; least recently used reused first."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._slots: OrderedDict[BlockHash, int] = OrderedDict()
        self._free = list(range(num_slots - 1, -1, -1))
        # Slots a queued restore still has to read: never overwritten before the ops have run.
        self.busy: set[int] = set()

    def __len__(self) -> int:
        return len(self._slots)

    def lookup(self, block_hash: BlockHash) -> int | None:
        slot = self._slots.get(block_hash)
        if slot is not None:
            self._slots.move_to_end(block_hash)
        return slot

    def put(self, block_hash: BlockHash) -> int | None:
        """A slot to write block_hash into; None when it is already held (nothing to copy)."""
        if block_hash in self._slots:
            return None
        if self._free:
            slot = self._free.pop()
        else:
            victim = next((h for h, s in self._slots.items() if s not in self.busy), None)
            if victim is None:
                return None
            slot = self._slots.pop(victim)
        self._slots[block_hash] = slot
        return slot

    def clear(self) -> None:
        self._free.extend(self._slots.values())
        self._slots.clear()


class BlockPool:
    """All blocks, the free queue (eviction order: front first) and the hash -> block index."""

    def __init__(self, num_blocks: int, enable_caching: bool, host: HostBlockIndex | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least 1 block, got {num_blocks}")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.enable_caching = enable_caching
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[BlockHash, KVBlock] = {}
        self._children: dict[object, dict[BlockHash, KVBlock]] = {}
        self.host = host
        # Hashes whose block is copied to host memory when it is evicted (retained sessions under pressure).
        self.offload_on_evict: set[BlockHash] = set()
        self.ops: list[KVOp] = []
        self.moves = KVMoveStats()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def lookup(self) -> Callable[[BlockHash], KVBlock | None]:
        """The cached block of a digest, or None (the index's own get: a prefix walk calls it a block)."""
        return self._cached.get

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
        h = block.block_hash
        if h is not None:
            if self._cached.get(h) is block:
                del self._cached[h]
                siblings = self._children.get(block.parent_key)
                if siblings is not None:
                    siblings.pop(h, None)
                    if not siblings:
                        del self._children[block.parent_key]
            if h in self.offload_on_evict:
                self.offload_on_evict.discard(h)
                slot = self.host.put(h) if self.host is not None else None
                if slot is not None:
                    self.ops.append(KVOp("offload", block.block_id, slot))
                    self.moves.offloaded_blocks += 1
            block.block_hash = None
            block.parent_key = None
            block.token_ids = ()

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

    def cache(self, block: KVBlock, block_hash: BlockHash, parent_key: object = None,
              token_ids: tuple[int, ...] = ()) -> None:
        if block.block_hash is not None:
            return
        if block_hash in self._cached:
            return  # an identical block was computed concurrently; keep the first, this one stays private
        block.block_hash = block_hash
        block.parent_key = parent_key
        block.token_ids = token_ids
        self._cached[block_hash] = block
        if token_ids:
            self._children.setdefault(parent_key, {})[block_hash] = block

    def children(self, parent_key: object) -> list[KVBlock]:
        return list(self._children.get(parent_key, {}).values())

    def reset_prefix_cache(self) -> None:
        for block in list(self._cached.values()):
            block.block_hash = None
            block.parent_key = None
            block.token_ids = ()
        self._cached.clear()
        self._children.clear()
        self.offload_on_evict.clear()
        if self.host is not None:
            self.host.clear()


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0
    requests: int = 0


@dataclass(frozen=True)
class PartialBlock:
    """A block with its first tokens computed, following the chain at `parent` (None: first block)."""
    parent: BlockHash | None
    block: KVBlock
    token_ids: tuple[int, ...]


@dataclass
class PrefixHit:
    """What a new request can skip computing: device blocks, then blocks restored from host memory,
    then the first `cow_tokens` tokens of a donor block that it copies (copy-on-write)."""
    blocks: list[KVBlock] = field(default_factory=list)
    host_slots: list[int] = field(default_factory=list)
    cow_donor: KVBlock | None = None
    cow_tokens: int = 0

    def num_tokens(self, block_size: int) -> int:
        return (len(self.blocks) + len(self.host_slots)) * block_size + self.cow_tokens


class KVCacheManager:
    """Block tables per request on top of a BlockPool, with prefix-cache lookup and insertion."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_host_blocks: int = 0) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        host = HostBlockIndex(num_host_blocks) if num_host_blocks > 0 and enable_prefix_caching else None
        self.pool = BlockPool(num_blocks, enable_prefix_caching, host)
        self._tables: dict[str, list[KVBlock]] = {}
        self._num_hashed: dict[str, int] = {}  # leading blocks of each table already in the index
        self._ids: dict[str, list[int]] = {}  # block_ids() of each table, as of its last call
        self._copy_sources: list[KVBlock] = []  # COW donors referenced until their copy has run
        self.stats = PrefixCacheStats()
        # Digests of recently hashed blocks by their exact (parent, token ids, salt). An agent's next turn
        # re-sends the whole conversation, and blake2b over each block again cost ~1.9 ms per 8k tokens
        # on the dev VM, against ~0.2 ms for dict hits. A dict compares whole keys, so a hit is exactly
        # the digest hash_block would compute. Bounded by the pool's size (cleared when it outgrows it).
        self._digests: dict[tuple, BlockHash] = {}
        self._max_digests = max(num_blocks, 1024)
        # Finished requests' hashed tokens and digests (HashedRun), by session and first block digest, the
        # oldest first. The memo above still costs a dict hit a block (~0.4 us on the dev VM, ~0.2 ms a
        # turn at 8k); a turn that re-sends its conversation agrees with its session's previous request
        # on all of that one's blocks, which a list compare (C) finds at once, and takes their digests.
        self._runs: OrderedDict[tuple[str | None, BlockHash], HashedRun] = OrderedDict()
        self._run_tokens = 0
        self._max_run_tokens = max(num_blocks * block_size, RUN_COMPARE_BLOCKS * block_size)

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
        """The request's block table as ids. Tables only grow at the end or lose their tail, so the
        list is kept per request and brought up to date here (the caller must not modify it)."""
        table = self._tables.get(request_id)
        if not table:
            self._ids.pop(request_id, None)
            return []
        ids = self._ids.get(request_id)
        if ids is None:
            ids = self._ids[request_id] = [b.block_id for b in table]
        elif len(ids) < len(table):
            ids.extend(b.block_id for b in table[len(ids):])
        return ids

    def _update_hashes(self, request: Request, num_tokens: int) -> None:
        """request.block_hashes made to cover its full blocks up to num_tokens (or further: a request's
        first block takes the digests of every block it shares with its HashedRun at once)."""
        bs = self.block_size
        hashes = request.block_hashes
        tokens = request.all_token_ids
        digests = self._digests
        end = num_tokens // bs
        i = len(hashes)
        while i < end:
            key = (hashes[i - 1] if i else None, tuple(tokens[i * bs:(i + 1) * bs]),
                   request.cache_salt if i == 0 else None)
            digest = digests.get(key)
            if digest is None:
                if len(digests) >= self._max_digests:
                    digests.clear()
                digest = digests[key] = hash_block(*key)
            hashes.append(digest)
            if i == 0:
                self._take_run(request)
            i = len(hashes)

    def _take_run(self, request: Request) -> None:
        """Append the digests of the blocks after the first that the request shares with the last
        finished request of its session (or without one, of its first block)."""
        run = self._runs.get((request.session_id, request.block_hashes[0]))
        if run is None:
            return
        bs = self.block_size
        shared = shared_blocks(request.all_token_ids, run.token_ids, min(len(run.hashes), request.num_tokens // bs),
                               bs)
        request.block_hashes.extend(run.hashes[1:shared])

    def _remember_run(self, request: Request) -> None:
        """Keep the finished request's hashed tokens and their digests for its next turn (_take_run)."""
        hashes = request.block_hashes
        if not hashes:
            return
        key = (request.session_id, hashes[0])
        old = self._runs.pop(key, None)
        if old is not None:
            self._run_tokens -= len(old.token_ids)
        run = HashedRun(request.all_token_ids[:len(hashes) * self.block_size], list(hashes))
        self._runs[key] = run
        self._run_tokens += len(run.token_ids)
        while self._run_tokens > self._max_run_tokens and len(self._runs) > 1:
            _, oldest = self._runs.popitem(last=False)
            self._run_tokens -= len(oldest.token_ids)

    def find_cached_prefix(self, request: Request) -> list[KVBlock]:
        """Longest run of cached full blocks at the start of the request's tokens.

        The last token is never served from cache: its forward pass produces the next logits. Blocks
        are hashed only as far as the lookup goes: a cold prompt's are hashed as its chunks are cached,
        while the device computes them, not before its first chunk is launched.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[KVBlock] = []
        self._walk_hashes(request, 0, (request.num_tokens - 1) // self.block_size, self.pool.lookup, hits)
        return hits

    def _walk_hashes(self, request: Request, start: int, end: int, lookup, found: list) -> None:
        """Append lookup(digest) of the request's blocks start, start+1, ... to `found` until one is None
        or `end` is reached, hashing blocks as the walk needs them: as many more as it has found (a cold
        prompt hashes one, a long hit about log2 of its length batches)."""
        hashes = request.block_hashes
        i = start
        while i < end:
            if i == len(hashes):
                self._update_hashes(request, min(end, i + max(1, i - start)) * self.block_size)
            for digest in hashes[i:end]:
                value = lookup(digest)
                if value is None:
                    return
                found.append(value)
                i += 1

    def find_prefix(self, request: Request, tail: PartialBlock | None = None) -> PrefixHit:
        """Everything a new request can reuse: device hits, host-memory hits after them, and a
        copy-on-write donor for the block where it diverges from a cached block, its n > 1 sibling's
        partial block, or `tail` (the partial last block its session's previous turn left pinned)."""
        hit = PrefixHit(self.find_cached_prefix(request))
        if not self.enable_prefix_caching:
            return hit
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs
        host = self.pool.host
        if host is not None:
            self._walk_hashes(request, len(hit.blocks), max_blocks, host.lookup, hit.host_slots)
        self._find_cow_donor(request, hit, tail)
        return hit

    def _find_cow_donor(self, request: Request, hit: PrefixHit, tail: PartialBlock | None) -> None:
        bs = self.block_size
        i = len(hit.blocks) + len(hit.host_slots)
        start = i * bs
        limit = request.num_tokens - 1 - start  # the last token is always computed
        if limit <= 0:
            return
        tokens = request.all_token_ids[start:start + min(bs, limit)]
        best, best_n = None, 0
        sibling = request.wait_for
        if sibling is not None and sibling.status is RequestStatus.RUNNING:
            # n > 1: the first sample's partial prompt block is not cached (not full), but it is the
            # same prompt, so everything it has computed there is shared.
            table = self._tables.get(sibling.request_id, ())
            if i < len(table):
                best, best_n = table[i], max(0, min(sibling.num_computed_tokens - start, len(tokens)))
        parent = request.block_hashes[i - 1] if i else None
        candidates = [(b, b.token_ids) for b in
                      self.pool.children(_parent_key(parent, request.cache_salt if i == 0 else None))]
        if tail is not None and tail.parent == parent:
            candidates.append((tail.block, tail.token_ids))
        for block, block_tokens in candidates:
            n = 0
            for a, b in zip(block_tokens, tokens):
                if a != b:
                    break
                n += 1
            if n > best_n:
                best, best_n = block, n
        if best is not None and best_n > 0:
            hit.cow_donor, hit.cow_tokens = best, best_n

    def allocate(self, request: Request, num_new_tokens: int, cached: list[KVBlock] | PrefixHit = ()) -> bool:
        """Make the table cover num_computed_tokens (+ cached hits) + num_new_tokens; False if no room.

        `cached` are prefix hits (a list of device blocks, or a full PrefixHit) for a request that
        holds no blocks yet.
        """
        if not cached:  # a running request growing (every decode, every step): no hit bookkeeping
            table = self._tables.get(request.request_id)
            if table is not None:
                needed = -(-(request.num_computed_tokens + num_new_tokens) // self.block_size) - len(table)
                if needed > 0:
                    if needed > self.pool.num_free_blocks:
                        return False
                    table.extend(self.pool.allocate(needed))
                return True
        hit = cached if isinstance(cached, PrefixHit) else PrefixHit(list(cached))
        table = self._tables.setdefault(request.request_id, [])
        has_hit = bool(hit.blocks or hit.host_slots or hit.cow_tokens)
        assert not has_hit or not table, "prefix hits are only taken by a request without blocks"
        computed = request.num_computed_tokens + hit.num_tokens(self.block_size)
        needed = -(-(computed + num_new_tokens) // self.block_size) - len(table) - len(hit.blocks)
        # Hits that currently sit in the free queue (a COW donor too) are taken out of it.
        pinned_now = hit.blocks + ([hit.cow_donor] if hit.cow_tokens else [])
        revived = sum(1 for b in set(pinned_now) if b.ref_cnt == 0)
        if needed > self.pool.num_free_blocks - revived:
            if not table:
                del self._tables[request.request_id]
            return False
        rid = request.request_id
        if hit.blocks:
            self.pool.touch(list(hit.blocks))
            table.extend(hit.blocks)
            self._num_hashed[rid] = len(hit.blocks)
        if hit.cow_tokens:
            self.pool.touch([hit.cow_donor])
        if hit.host_slots:
            self.pool.host.busy.update(hit.host_slots)  # before allocating: evictions may offload
        new = self.pool.allocate(needed) if needed > 0 else []
        for j, slot in enumerate(hit.host_slots):
            idx = len(hit.blocks) + j
            parent = request.block_hashes[idx - 1] if idx else None
            bs = self.block_size
            self.pool.cache(new[j], request.block_hashes[idx], _parent_key(parent, request.cache_salt if idx == 0 else None),
                            tuple(request.all_token_ids[idx * bs:(idx + 1) * bs]))
            self.pool.ops.append(KVOp("restore", slot, new[j].block_id))
        if hit.host_slots:
            self.pool.moves.restored_blocks += len(hit.host_slots)
            self._num_hashed[rid] = len(hit.blocks) + len(hit.host_slots)
        if hit.cow_tokens:
            self.pool.ops.append(KVOp("copy", hit.cow_donor.block_id, new[len(hit.host_slots)].block_id))
            self._copy_sources.append(hit.cow_donor)
            self.pool.moves.cow_copies += 1
            self.pool.moves.cow_tokens += hit.cow_tokens
        table.extend(new)
        return True

    def take_ops(self) -> list[KVOp]:
        """Block movements queued since the last call, in the order they must run (before the next forward)."""
        ops, self.pool.ops = self.pool.ops, []
        return ops

    def ops_done(self) -> None:
        """The runner has executed the taken ops: COW donors may be evicted, host slots reused again."""
        if self.pool.host is not None:
            self.pool.host.busy.clear()
        if self._copy_sources:
            self.pool.release(self._copy_sources[::-1])
            self._copy_sources = []

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
        bs = self.block_size
        tokens = request.all_token_ids
        for i in range(start, num_full):
            parent = request.block_hashes[i - 1] if i else None
            self.pool.cache(table[i], request.block_hashes[i],
                            _parent_key(parent, request.cache_salt if i == 0 else None),
                            tuple(tokens[i * bs:(i + 1) * bs]))
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
            self._ids.pop(request.request_id, None)
            self.pool.release(surplus[::-1])

    def free(self, request: Request) -> None:
        if self.enable_prefix_caching:
            self._remember_run(request)
        table = self._tables.pop(request.request_id, None)
        self._num_hashed.pop(request.request_id, None)
        self._ids.pop(request.request_id, None)
        if table:
            self.pool.release(table[::-1])

    def hashed_blocks(self, request: Request) -> list[KVBlock]:
        """The request's leading blocks that are in the prefix-cache index (what a later turn can hit)."""
        table = self._tables.get(request.request_id, [])
        return table[:self._num_hashed.get(request.request_id, 0)]

    def partial_block(self, request: Request) -> PartialBlock | None:
        """The block after the hashed ones, if it holds computed tokens (a copy-on-write donor)."""
        table = self._tables.get(request.request_id, [])
        i = self._num_hashed.get(request.request_id, 0)
        start = i * self.block_size
        end = min(request.num_computed_tokens, start + self.block_size)
        if i >= len(table) or end <= start:
            return None
        return PartialBlock(request.block_hashes[i - 1] if i else None, table[i],
                            tuple(request.all_token_ids[start:end]))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; only allowed when no request (or session pin) holds blocks."""
        if self._tables or self.pool.num_free_blocks < self.pool.num_blocks:
            return False
        self.pool.reset_prefix_cache()
        return True
