"""Top-k accuracy of the sharded classifier, counted while each block of logits is in cache.

Contract. The label's rank in row b of the logits is

    rank_b = #{j : l_bj > l_b,label} + #{j < label : l_bj == l_b,label}

(ties: the lower class id ranks first, like ``argmax``), and the label is in
the top k when rank_b < k. No rank holds its logits after the forward pass
(the classifier keeps exp(l - m) instead), so each block of classes is
counted while it exists, against the label's logit as every rank can know it
then:

  1. ``label_logit_guess``: the rank that owns a label's row computes its
     logit as a dot product; one all_reduce (SUM) of B values gives every
     rank the guesses g_b. A dot product and the GEMM's entry differ by at
     most ``label_logit_slack`` s_b = 4 D eps ||Z_hat_b / tau|| (the rounding
     bound of a D-term dot product, twice, with room).
  2. ``topk_candidates``, per block: the classes with l_bj > g_b + s_b beat
     the label for sure and are counted; those within [g_b - s_b, g_b + s_b]
     (a handful: the label itself and near-ties) are kept, at most k_max per
     row, the highest first (ties: the lower id first).
  3. ``topk_accuracy``: the loss's message brings the label's exact logit
     (the GEMM's); the kept candidates are compared with it by the rule
     above, and one all_reduce (SUM) of B counts gives the global rank.

The kept candidates that beat the label are the first ones of that order, so
keeping k_max of them per row loses nothing: a rank below k_max is counted
exactly, and one of k_max or more stays at k_max or more. The slack assumes
IEEE float32/float64 GEMMs (not TF32 tensor cores).
"""
import numpy as np

from refimpl.backend import get_array_module, scatter_add, to_numpy
from refimpl.layers.normalize import l2_normalize_forward


def label_logit_guess(Zt, w, labels, lo, hi):
    """(B,) the logit of each row's label where this rank owns its row, else 0.

    Zt (B, D) = Z_hat / tau; w (N_r, D) the shard of rows [lo, hi); labels
    (B,) host ints. A dot product per row: within ``label_logit_slack`` of
    the GEMM's value. Summed over the ranks, every row has its guess.
    """
    xp = get_array_module(Zt)
    guess = xp.zeros(Zt.shape[0], dtype=Zt.dtype)
    mine = np.nonzero((labels >= lo) & (labels < hi))[0]
    if mine.size:
        rows = xp.asarray(mine)
        what, _ = l2_normalize_forward(w[xp.asarray(labels[mine] - lo)])   # (n, D)
        guess[rows] = xp.sum(Zt[rows] * what, axis=1)
    return guess


def label_logit_slack(Zt):
    """(B,) s_b = 4 D eps ||Zt_b||: two D-term dot products of Zt_b with a
    unit row differ by at most 2 gamma_D ||Zt_b|| (gamma_D ~ D eps / 2)."""
    xp = get_array_module(Zt)
    D = Zt.shape[1]
    return (4 * D * np.finfo(Zt.dtype).eps) * xp.sqrt(xp.sum(Zt * Zt, axis=1))


def topk_candidates(L, first, guess, slack, kmax):
    """One block's share of the ranks: -> (above (B,), (rows, classes, values)).

    L (B, n) the logits of classes [first, first + n); guess, slack (B,).
    above: per row, the classes with a logit > guess + slack (they beat the
    label). The candidates: the entries within [guess - slack, guess + slack],
    at most kmax per row, the highest logits first, ties to the lower class.
    """
    xp = get_array_module(L)
    beat = L > (guess + slack)[:, None]                              # (B, n) bool
    near = L >= (guess - slack)[:, None]
    near ^= beat                                                     # within the slack
    # flatnonzero + divmod: NumPy's 2-D nonzero is much slower; the bool rows
    # summed as bytes: faster than count_nonzero(axis=1)
    rows, cols = xp.divmod(xp.flatnonzero(near), L.shape[1])
    above = beat.view(xp.uint8).sum(axis=1, dtype=xp.int64)
    return above, _first_per_row(rows, cols + first, L[rows, cols], kmax)


def _first_per_row(rows, classes, values, kmax):
    """The entries sorted by (row, value descending, class), at most kmax per row."""
    xp = get_array_module(values)
    if rows.size == 0:
        return rows, classes, values
    order = xp.lexsort(xp.stack([classes, -values, rows]))           # last key first
    rows, classes, values = rows[order], classes[order], values[order]
    start = xp.searchsorted(rows, rows, side="left")                 # each row's first entry
    keep = xp.arange(rows.size) - start < kmax
    return rows[keep], classes[keep], values[keep]


def topk_accuracy(parts, l_label, labels, topk, comm):
    """{k: fraction of the B rows whose label is in the top k}, over all shards.

    parts    per block of this rank's classes, in block order:
             ``topk_candidates``' (above, (rows, classes, values))
    l_label  (B,) the exact logit of each row's label (the loss's message)
    labels   (B,) host int, the label of each row
    topk     iterable of k (each <= the kmax the candidates were kept for)
    One all_reduce of B values.
    """
    xp = get_array_module(l_label)
    kmax = max(int(k) for k in topk)
    above = sum(a for a, _ in parts)                                 # (B,) sure winners
    rows, classes, values = (xp.concatenate([c[i] for _, c in parts]) for i in range(3))
    rows, classes, values = _first_per_row(rows, classes, values, kmax)
    lab = xp.asarray(labels)
    beats = (values > l_label[rows]) | ((values == l_label[rows]) & (classes < lab[rows]))
    counts = above.astype(l_label.dtype)
    scatter_add(counts, rows[beats], 1)
    rank = to_numpy(comm.all_reduce(counts, "sum"))                  # (B,)
    return {int(k): float(np.mean(rank < k)) for k in topk}
