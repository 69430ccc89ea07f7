"""The sharding rule of the classifier: which rank owns which rows of W.

Contract. Rank r of P owns the contiguous rows

    [floor(r N / P), floor((r + 1) N / P))               (``shard_range``)

of the N x D classifier weight W. Uneven shards are normal (N = 37 over 4
ranks: 9, 9, 9, 10 rows); every rank owns at least one row (N >= P).
``shard_owner`` is the inverse map, global row id -> rank, and
``init_shard`` draws the initial rows of a shard so that the whole W is the
same for every P.
"""
import numpy as np

from refimpl.backend import rng as make_rng


def shard_range(num_classes, size, rank):
    """Rows [lo, hi) of the N x D weight that rank ``rank`` of ``size`` owns."""
    num_classes, size, rank = int(num_classes), int(size), int(rank)
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"shard_range: rank {rank} is not in a world of size {size}")
    if num_classes < size:
        raise ValueError(f"the classifier has N = {num_classes} classes for {size} ranks: "
                         f"every rank needs at least one row (N >= P)")
    return rank * num_classes // size, (rank + 1) * num_classes // size


def shard_owner(ids, num_classes, size):
    """int64 array like ``ids``: the rank that owns each global row id.

    ids: integer array of row ids in [0, N). The inverse of ``shard_range``:
    owner(i) = the r with floor(r N / P) <= i < floor((r + 1) N / P).
    """
    ids = np.asarray(ids)
    starts = np.array([shard_range(num_classes, size, r)[0] for r in range(size)])  # (P,)
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        raise ValueError(f"row ids must lie in [0, {num_classes}), got values in "
                         f"[{ids.min()}, {ids.max()}]")
    return np.searchsorted(starts, ids, side="right").astype(np.int64) - 1


INIT_BLOCK = 65536  # rows per random stream of the initial weight


def init_shard(num_classes, dim, lo, hi, seed=0, dtype=np.float64):
    """Rows [lo, hi) of the initial N x D weight, the same for every P.

    nn.Linear's default (no bias): uniform(-1/sqrt(D), 1/sqrt(D)). The full
    matrix is drawn in blocks of INIT_BLOCK rows, block k from
    ``rng(seed, "init", 2, k)``, so a rank draws only the blocks its rows
    touch and every world size sees the same W. (The contrastive prior
    overwrites these rows before training.) Drawn in float64, stored as
    ``dtype`` block by block (no full-size float64 temporary).
    """
    bound = 1.0 / np.sqrt(dim)
    out = np.empty((hi - lo, dim), dtype=dtype)
    for k in range(lo // INIT_BLOCK, (hi - 1) // INIT_BLOCK + 1 if hi > lo else 0):
        a, c = k * INIT_BLOCK, min((k + 1) * INIT_BLOCK, num_classes)
        rows = make_rng(seed, "init", 2, k).uniform(-bound, bound, (c - a, dim))
        s, e = max(a, lo), min(c, hi)
        out[s - lo:e - lo] = rows[s - a:e - a]
    return out


def row_blocks(n, block):
    """[(a, c), ...]: rows 0..n-1 of a shard in consecutive blocks of at most ``block``."""
    return [(a, min(a + block, n)) for a in range(0, n, block)]
