"""pools.py: PoolStream's seeded epochs and the bucket shuffle."""

import numpy as np
import pytest

from framelm.errors import FramelmError
from framelm.schedule import PoolStream


def test_pool_stream_repeats_with_fresh_permutations_and_no_drift():
    weight = np.full(10, 3, np.int64)
    stream = PoolStream("cell:Q1", np.arange(10), weight, seed=0)
    taken = [stream.take(7.5) for _ in range(8)]  # 60 tokens = 20 documents = 2 epochs
    idx = np.concatenate([t[0] for t in taken])
    epoch = np.concatenate([t[1] for t in taken])
    assert len(idx) == 20 and sorted(idx[:10]) == list(range(10)) and sorted(idx[10:]) == list(range(10))
    assert epoch.tolist() == [0] * 10 + [1] * 10
    assert idx[:10].tolist() != idx[10:].tolist()


def test_pool_stream_refuses_to_draw_from_an_empty_pool():
    stream = PoolStream("source:math", np.empty(0, np.int64), np.ones(5, np.int64), seed=0)
    assert all(len(a) == 0 for a in stream.take(0))
    with pytest.raises(FramelmError, match="pool 'source:math' has no documents to draw 50 tokens from"):
        stream.take(50)


def test_bucket_shuffle_is_a_uniform_permutation_moving_arrays_together(monkeypatch):
    from framelm.schedule import pools

    monkeypatch.setattr(pools, "SHUFFLE_BUCKET_ROWS", 2)  # 12 rows: 6 buckets
    a, b = np.arange(12), np.arange(12) * 10
    x, y = pools.shuffled(np.random.default_rng(1), a, b)
    assert sorted(x.tolist()) == list(range(12)) and (y == x * 10).all() and x.tolist() != list(range(12))
    again, _ = pools.shuffled(np.random.default_rng(1), a, b)
    assert (again == x).all()  # the seed decides
    rng = np.random.default_rng(0)
    where = np.zeros((12, 12))  # row i: how often element i lands at each position
    for _ in range(6000):
        (perm,) = pools.shuffled(rng, a)
        where[perm, np.arange(12)] += 1
    assert np.abs(where - 500).max() < 5 * np.sqrt(500)  # every position equally likely, to 5 standard deviations
