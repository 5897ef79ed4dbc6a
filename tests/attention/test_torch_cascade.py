"""Cascade decode in the torch backend's heads-outer (CPU) layout: decodes that share leading blocks
attend to them once, together, and merge with their own blocks through log-sum-exps. The result must
equal plain per-sequence attention over each full block table."""
import pytest
import torch

import loopserve.attention.torch_ref as ref
from loopserve.attention.metadata import AttentionMetadata, KVCache

BS, HQ, HKV, D = 4, 6, 2, 8


def _batch(shared_prefix: dict[tuple[int, ...], list[int]], lens: list[int], seed: int):
    """A heads-outer pool and a decode batch: shared_prefix maps a group of sequences to the block ids
    their tables start with; the rest of each table is blocks of its own. Returns (q, k, v, pool,
    metadata builder)."""
    gen = torch.Generator().manual_seed(seed)
    nxt = 1 + sum(len(p) for p in shared_prefix.values())
    tables, slots = [], []
    for i, total in enumerate(lens):
        prefix = next((blocks for members, blocks in shared_prefix.items() if i in members), [])
        own = list(range(nxt, nxt + -(-total // BS) - len(prefix)))
        nxt += len(own)
        ids = prefix + own
        tables.append(ids + [0] * (40 - len(ids)))
        slots.append(ids[(total - 1) // BS] * BS + (total - 1) % BS)
    key, value = (torch.randn(HKV, nxt, BS, D, generator=gen) for _ in range(2))
    q = torch.randn(len(lens), HQ, D, generator=gen)
    k, v = (torch.randn(len(lens), HKV, D, generator=gen) for _ in range(2))

    def meta():
        return AttentionMetadata(list(range(len(lens) + 1)), lens, torch.tensor(slots), torch.tensor(tables),
                                 decode_indices=list(range(len(lens))), prefill_indices=[])
    return q, k, v, (key, value), meta


def _run(q, k, v, pool, meta, min_shared):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ref, "CASCADE_MIN_SHARED_TOKENS", min_shared)
        cache = KVCache(pool[0].clone(), pool[1].clone(), heads_outer=True)
        m = meta()
        out = ref.TorchPagedAttention().forward(q, k, v, cache, m, D ** -0.5)
        return out, m.derived["decode"]


def test_cascade_decode_matches_plain_attention():
    # Two groups sharing 6 and 3 blocks, a loner, and a member whose context ends right after the
    # shared run (its remainder is its last, partial block).
    shared = {(0, 1, 2): [1, 2, 3, 4, 5, 6], (3, 5): [9, 7, 8]}
    lens = [37, 26, 29, 19, 11, 14]
    q, k, v, pool, meta = _batch(shared, lens, seed=0)
    plain, dec = _run(q, k, v, pool, meta, min_shared=10 ** 9)
    assert dec.shared == []
    cascade, dec = _run(q, k, v, pool, meta, min_shared=BS)
    runs = sorted((m.tolist(), ids.tolist()) for m, ids in dec.shared)
    assert runs == [([0, 1, 2], [1, 2, 3, 4, 5, 6]), ([3, 5], [9, 7, 8])]
    torch.testing.assert_close(cascade, plain, rtol=1e-5, atol=1e-5)


def test_shared_run_stops_before_each_decodes_last_block():
    # The member with 25 tokens has its 25th token (the one just written) in block 7 of its table: the
    # shared run is capped at 6 full blocks so its own remainder is never empty.
    shared = {(0, 1): [1, 2, 3, 4, 5, 6, 7]}
    lens = [25, 40]
    q, k, v, pool, meta = _batch(shared, lens, seed=1)
    plain, _ = _run(q, k, v, pool, meta, min_shared=10 ** 9)
    cascade, dec = _run(q, k, v, pool, meta, min_shared=BS)
    assert [ids.tolist() for _, ids in dec.shared] == [[1, 2, 3, 4, 5, 6]]
    torch.testing.assert_close(cascade, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("min_shared", [7 * BS, 10 ** 9])
def test_short_shared_runs_stay_plain(min_shared):
    shared = {(0, 1): [1, 2, 3, 4, 5, 6]}
    q, k, v, pool, meta = _batch(shared, [30, 33], seed=2)
    _, dec = _run(q, k, v, pool, meta, min_shared=min_shared)
    assert dec.shared == [] and dec.mask.dtype == torch.bool


def test_cpu_attention_bench_runs_and_agrees(tmp_path, monkeypatch):
    """bench/cpu_attention.py (attention part, tiny sizes): both variants give the same output and the
    report has its keys. The engine part needs SmolLM2's weights and is skipped here (0 sessions)."""
    import json
    import sys

    from bench import cpu_attention
    out = tmp_path / "attn.json"
    monkeypatch.setattr(sys, "argv", ["cpu_attention", "--sessions", "3", "--shared-tokens", "512", "--own-tokens",
                                      "16", "64", "--layers", "2", "--repeats", "1", "--engine-sessions", "0",
                                      "--out", str(out)])
    assert cpu_attention.main() == 0
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert row["sessions"] == 3 and row["plain_ms_per_layer"] > 0 and row["cascade_ms_per_layer"] > 0
    assert row["max_abs_diff"] < 1e-4 and report["engine"] is None
    assert ref.CASCADE_MIN_SHARED_TOKENS == 256  # the bench restores the threshold
