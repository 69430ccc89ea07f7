"""Which rank owns which rows of W (refimpl.parallel.sharding): ``shard_range``,
``shard_owner``, and the world-size-invariant initial rows ``init_shard``."""
import numpy as np
import pytest

from refimpl.parallel import shard_owner, shard_range
from refimpl.parallel.sharding import INIT_BLOCK, init_shard


def test_shard_range_partitions_rows():
    """Contiguous, covering, balanced shards [floor(rN/P), floor((r+1)N/P))."""
    for n in range(1, 51):
        for p in range(1, min(n, 6) + 1):
            ranges = [shard_range(n, p, r) for r in range(p)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(ranges[r][1] == ranges[r + 1][0] for r in range(p - 1))
            sizes = [hi - lo for lo, hi in ranges]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
            assert ranges == [(r * n // p, (r + 1) * n // p) for r in range(p)]
    assert shard_range(37, 4, 3) == (27, 37)  # the MPI tests' uneven shards


def test_shard_owner_inverts_shard_range():
    """shard_owner(i) is the rank whose shard_range holds i, for every i, N, P."""
    for n in (1, 5, 37, 100):
        for p in range(1, min(n, 6) + 1):
            want = np.concatenate([np.full(hi - lo, r) for r, (lo, hi) in
                                   enumerate(shard_range(n, p, r) for r in range(p))])
            np.testing.assert_array_equal(shard_owner(np.arange(n), n, p), want)
    with pytest.raises(ValueError, match=r"row ids must lie in \[0, 37\)"):
        shard_owner(np.array([3, 37]), 37, 4)


def test_shard_range_refuses_impossible_worlds():
    with pytest.raises(ValueError, match=r"every rank needs at least one row \(N >= P\)"):
        shard_range(3, 4, 0)
    for size, rank in ((0, 0), (3, 3), (3, -1)):
        with pytest.raises(ValueError, match="not in a world of size"):
            shard_range(10, size, rank)


def test_init_shard_is_world_size_invariant():
    """P = 3 shards concatenated = the P = 1 matrix, across INIT_BLOCK streams."""
    n, d = 2 * INIT_BLOCK + 8864, 2  # 140000 rows: three random streams
    full = init_shard(n, d, 0, n, seed=3)
    shards = [init_shard(n, d, *shard_range(n, 3, r), seed=3) for r in range(3)]
    np.testing.assert_array_equal(np.concatenate(shards), full)
    # Rank 1's rows start inside the first stream and end inside the second.
    assert shard_range(n, 3, 1)[0] < INIT_BLOCK < shard_range(n, 3, 1)[1]
    bound = 1 / np.sqrt(d)
    assert np.abs(full).max() <= bound and np.abs(full).max() > 0.99 * bound
    assert not np.array_equal(full[:100], full[INIT_BLOCK:INIT_BLOCK + 100])  # own streams
    assert not np.array_equal(init_shard(n, d, 0, 100, seed=4), full[:100])
    assert init_shard(n, d, 5, 5).shape == (0, d)
