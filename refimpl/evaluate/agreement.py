"""Neighbour label agreement: do an instance's hardest-class neighbours share its label?

Contract. PIC's smoothing (docs/design.md) moves target mass from instance i to its
K hardest-class neighbours NK(i), the K instances whose classifier rows are
most similar to row i. That helps only if those neighbours tend to show the
same kind of object; with ground-truth labels (never used by training) this
is measured as the fraction of (i, j in NK(i)) pairs that share a label:

    agreement = #{(i, j): j in NK(i), y_j = y_i} / #{(i, j): j in NK(i)}

over the pairs where both labels are known (y >= 0; -1 means unknown, and
such rows and entries are left out). None when no pair has two known
labels. Chance level with C balanced classes is about 1 / C; logged every
epoch next to the kNN monitor.

Host NumPy (device arrays are copied), O(N K) time and memory.
"""
import numpy as np

from refimpl.backend import to_numpy


def neighbour_label_agreement(neighbours, labels):
    """Fraction in [0, 1] of neighbour pairs with equal known labels, or None.

    neighbours (N, K) int: row i holds NK(i), instance ids in [0, N) (the
    table of ``refimpl.method.neighbours.hardest_neighbours``); labels (N,)
    int: the class of each instance, -1 for unknown. Pairs where either label
    is unknown are ignored; None when no pair is left (no labels known).
    """
    nb, y = to_numpy(neighbours), to_numpy(labels)
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-d integer array, got {y.dtype} {y.shape}")
    if nb.ndim != 2 or nb.shape[0] != y.shape[0]:
        raise ValueError(f"neighbours must be (N, K) with N = {y.shape[0]} (one row per "
                         f"label), got shape {nb.shape}")
    if nb.size and not np.issubdtype(nb.dtype, np.integer):
        raise ValueError(f"neighbours must hold integer instance ids, got {nb.dtype}")
    if nb.size and (nb.min() < 0 or nb.max() >= len(y)):
        raise ValueError(f"neighbour ids must lie in [0, {len(y)}), got values in "
                         f"[{nb.min()}, {nb.max()}]")
    mine = np.broadcast_to(y[:, None], nb.shape)              # (N, K) y_i
    theirs = y[nb]                                            # (N, K) y_j
    known = (mine >= 0) & (theirs >= 0)                       # (N, K) pairs that count
    pairs = int(known.sum())
    if pairs == 0:
        return None
    return float(np.sum((mine == theirs) & known)) / pairs
