"""Hardest-class neighbours: the K classes most similar to each class, across shards.

Contract (docs/design.md). For every class i, NK(i) holds the K classes j != i
with the largest cosine similarity <w_hat_i, w_hat_j> of the classifier's
rows, ties to the lower global id. ``hardest_neighbours(clf, comm, k)``
computes NK for every class from the sharded W and returns the whole table
(N, K) int64 on every rank, ordered by (similarity descending, id
ascending); ``neighbours_memory`` says what that table costs.

Bounded memory: never an N x N matrix. Each rank keeps its own normalized
rows (N_r x D) and one travelling shard: the shards go once around a ring
(``comm.ring_shift``, P - 1 shifts), and each rank keeps a running top-K of
its own rows against every shard it sees, one tile of (R x C) similarities
at a time. Per rank: O(N_r D + max N_s D + R C + N_r K), then the table,
N K ids, gathered on every rank (``all_gather_v``: the step needs the rows
of its global batch's labels, which any rank may own).

The running top-K, per tile S (R rows of mine x C travelling classes):

    first tile of a row chunk   t = the K-th largest of the tile (np.partition)
    later tiles                 t = the current K-th best similarity
    candidates                  S >= t  (few once the top-K has settled)
    merge                       sort current best + candidates by
                                (similarity desc, id asc), keep K

A candidate equal to t is kept as a candidate, so the tie rule decides
between it and the current K-th: the result is the exact top-K of the dense
similarity matrix, ties included. Cost: 2 N^2 D / P multiply-adds per rank
(the GEMM) plus one comparison per similarity.

On a GPU the running top-K stays on the device (``_tile_update_device``):
copying every tile to the host would move all N^2 / P similarities over
PCIe (6.6 TB at N = 1.28M). Its threshold needs no partition: the smallest
of the maxima of K disjoint column groups of the tile is at most the tile's
K-th largest (K distinct entries reach it), so

    t = max(current K-th best, min over K column groups of the group's max)

is never above the K-th best of (best + tile), and the candidates S >= t
hold the exact top-K, ties included, as above. Tiles are large there
(``TILE["gpu"]``: each costs a handful of kernel launches and one device
synchronization), and the row chunks run one after another on the device's
stream instead of on host threads.
"""
import numpy as np

from refimpl.backend import get_array_module, to_numpy
from refimpl.checks import check_int
from refimpl.layers.normalize import l2_normalize_forward
from refimpl.parallel.sharding import row_blocks, shard_range
from refimpl.threads import parallel_map

ROWS = 2048     # R: own rows per tile (a thread's unit of work)
COLUMNS = 4096  # C: travelling classes per tile
# (R, C) per device: on a GPU 8192 x 65536 float32 similarities (2 GiB) per tile.
TILE = {"cpu": (ROWS, COLUMNS), "gpu": (8192, 65536)}


def _merge(best_sim, best_id, cand_rows, cand_sim, cand_id, k):
    """Running top-K update: the K best of (best, candidates) per row.

    best_sim (R, K) float64, best_id (R, K) int64; candidates as flat arrays
    (row index in [0, R), similarity, global id). Order: similarity
    descending, then id ascending. Returns the new (best_sim, best_id).
    """
    R = best_sim.shape[0]
    rows = np.concatenate([np.repeat(np.arange(R), k), cand_rows])
    sims = np.concatenate([best_sim.ravel(), cand_sim])
    ids = np.concatenate([best_id.ravel(), cand_id])
    order = np.lexsort((ids, -sims, rows))                    # by row, sim desc, id asc
    rows, sims, ids = rows[order], sims[order], ids[order]
    first = np.searchsorted(rows, np.arange(R))               # each row's first entry
    keep = (np.arange(rows.size) - first[rows]) < k           # its first k entries
    return sims[keep].reshape(R, k), ids[keep].reshape(R, k)


def _tile_update(best_sim, best_id, S, col_ids, row_ids, k, first):
    """Merge one tile of similarities S (R, C) into the running top-K of its rows.

    col_ids (C,) and row_ids (R,): global ids of the tile's columns and rows;
    a row's own class is excluded (its similarity set to -inf in S, which
    this function owns). first: no earlier tile for these rows.
    """
    self_cols = np.searchsorted(col_ids, row_ids)             # where row i's own id would be
    has_self = (self_cols < col_ids.size) & (col_ids[np.minimum(self_cols, col_ids.size - 1)]
                                             == row_ids)
    S[np.nonzero(has_self)[0], self_cols[has_self]] = -np.inf  # j != i
    if first and S.shape[1] >= k:
        t = np.partition(S, S.shape[1] - k, axis=1)[:, S.shape[1] - k]  # K-th largest
    else:
        t = best_sim[:, k - 1].astype(S.dtype)                # exact: it came from an S
    # Rows whose maximum reaches their threshold, then their candidate columns:
    # one cheap pass over the tile, and the index work only where it is needed.
    rows = np.nonzero(S.max(axis=1) >= t)[0]
    if 2 * rows.size > S.shape[0]:                            # most rows: no gather
        r, c = np.nonzero(S >= t[:, None])
    else:
        r, c = np.nonzero(S[rows] >= t[rows, None])
        r = rows[r]
    return _merge(best_sim, best_id, r, S[r, c].astype(np.float64), col_ids[c], k)


def _tile_update_device(best_sim, best_id, S, col_lo, row_lo, k):
    """Merge one tile into the running top-K of its rows, on the tile's device.

    best_sim (R, K) float64 and best_id (R, K) int64 live where S (R, C)
    lives (NumPy or CuPy: only functions both have, with the same meaning).
    S holds the similarities of the rows with global ids row_lo, row_lo + 1,
    ... against the classes col_lo, col_lo + 1, ...; the entries j == i are
    set to -inf here (S is overwritten). Threshold: the module docstring's
    t, a lower bound of the K-th best of (best + tile); the candidates
    S >= t are merged like ``_merge`` does, by one lexsort of (row,
    similarity descending, id). One device synchronization: the number of
    candidates.
    """
    xp = get_array_module(S)
    R, C = S.shape
    a, c = max(row_lo, col_lo), min(row_lo + R, col_lo + C)
    if a < c:                                                 # j != i: a diagonal of ids
        i = xp.arange(a, c)
        S[i - row_lo, i - col_lo] = -xp.inf
    t = best_sim[:, k - 1].astype(S.dtype)                    # exact: it came from an S
    if C >= k:
        # K disjoint groups of g columns: each group's max is an entry of its
        # own, so at least K entries reach the smallest of them
        g = C // k
        bound = S[:, :g].max(axis=1)                          # (R,)
        for j in range(1, k):
            bound = xp.minimum(bound, S[:, j * g:(j + 1) * g].max(axis=1))
        t = xp.maximum(t, bound)
    flat = xp.flatnonzero(S >= t[:, None])                    # (n,) the candidates
    r = flat // C
    c = flat - r * C
    rows = xp.concatenate([xp.repeat(xp.arange(R), k), r])   # (R K + n,)
    sims = xp.concatenate([best_sim.ravel(), S[r, c].astype(xp.float64)])
    ids = xp.concatenate([best_id.ravel(), col_lo + c])
    # lexsort of one 2-D key array (CuPy's lexsort takes no tuple): the last
    # row is the primary key; ids and rows are exact in float64
    order = xp.lexsort(xp.stack([ids.astype(xp.float64), -sims, rows.astype(xp.float64)]))
    rows, sims, ids = rows[order], sims[order], ids[order]
    first = xp.searchsorted(rows, xp.arange(R))               # each row's first entry
    keep = (xp.arange(rows.size) - first[rows]) < k           # its first k entries
    return sims[keep].reshape(R, k), ids[keep].reshape(R, k)


def hardest_neighbours(clf, comm, k, rows=None, columns=None, device_topk=None):
    """(N, K) int64 on every rank: NK(i), the K hardest classes of every class i.

    clf: this rank's ``parallel.CosineClassifier`` (its rows [lo, hi) of W);
    comm: the communicator (one ring_shift per step of the ring, one
    all_gather_v of the result); k: K, 1 <= K < N. rows, columns: the tile
    size (any value gives the same table; default ``TILE`` of W's device).
    device_topk: None (the host top-K for NumPy arrays, the device top-K for
    CuPy ones) or a bool to choose (the tests run the device's on NumPy).
    Row i lists NK(i) by similarity descending, ties to the lower id; the
    table is a host (NumPy) array on either device.
    """
    N, P, r = clf.num_classes, comm.size, comm.rank
    k = check_int("K (neighbours per class)", k)
    if k >= N:
        raise ValueError(f"K = {k} neighbours per class needs N > K classes, got N = {N}")
    xp = get_array_module(clf.weight)
    on_device = xp is not np if device_topk is None else bool(device_topk)
    tile = TILE["cpu" if xp is np else "gpu"]
    rows = check_int("rows", tile[0] if rows is None else rows)
    columns = check_int("columns", tile[1] if columns is None else columns)
    own = xp.concatenate([w for _, _, w in clf.normalized_blocks()], axis=0)  # (N_r, D)
    lo, hi = clf.lo, clf.hi
    chunks = row_blocks(hi - lo, rows)
    full = xp.full if on_device else np.full
    best = [(full((c - a, k), -np.inf), full((c - a, k), N, dtype=np.int64))
            for a, c in chunks]
    travelling = own                                          # rank r's rows first
    for step in range(P):
        src = (r - step) % P                                  # whose rows travel here now
        s_lo, s_hi = shard_range(N, P, src)

        def chunk_update(i):
            a, c = chunks[i]
            sim, ids = best[i]
            row_ids = np.arange(lo + a, lo + c)
            for t, (ta, tc) in enumerate(row_blocks(s_hi - s_lo, columns)):
                S = own[a:c] @ travelling[ta:tc].T            # (R, C) cosines, a new array
                if on_device:
                    sim, ids = _tile_update_device(sim, ids, S, s_lo + ta, lo + a, k)
                else:
                    sim, ids = _tile_update(sim, ids, to_numpy(S),
                                            np.arange(s_lo + ta, s_lo + tc), row_ids, k,
                                            first=step == 0 and t == 0)
            return sim, ids

        # host threads for the host top-K; one after another on a device (its
        # kernels are parallel already, and a pool thread has no current GPU)
        best = (parallel_map(chunk_update, range(len(chunks))) if xp is np and not on_device
                else [chunk_update(i) for i in range(len(chunks))])
        if step < P - 1:
            prev_lo, prev_hi = shard_range(N, P, (src - 1) % P)
            travelling = comm.ring_shift(travelling, (prev_hi - prev_lo, own.shape[1]))
    local = (np.concatenate([to_numpy(ids) for _, ids in best]) if best
             else np.zeros((0, k), np.int64))                 # (N_r, K) on the host
    counts = [b - a for a, b in (shard_range(N, P, q) for q in range(P))]
    return comm.all_gather_v(local, counts)                   # (N, K)


def dense_hardest_neighbours(W, k):
    """The reference: NK from the dense N x N similarity of W (N, D), one process.

    Same normalization (in W's dtype), order and tie rule as
    ``hardest_neighbours``; holds N^2 floats, so for tests and small N only.
    """
    Wn, _ = l2_normalize_forward(to_numpy(W))                # on the host
    S = (Wn @ Wn.T).astype(np.float64)                        # (N, N)
    np.fill_diagonal(S, -np.inf)
    N = S.shape[0]
    ids = np.broadcast_to(np.arange(N), S.shape)
    order = np.lexsort((ids, -S), axis=1)                     # sim desc, then id asc
    return order[:, :k].astype(np.int64)


def neighbours_memory(num_classes, k, itemsize=8):
    """Bytes of the (N, K) neighbour table held on every rank."""
    return int(num_classes) * int(k) * int(itemsize)
