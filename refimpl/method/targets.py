"""Smoothed labels of the hardest classes: the targets of the instance classifier.

Contract (docs/design.md, "Smoothed labels of the hardest classes"). For instance
i with neighbour set NK(i), the K classes j != i nearest to class i,

    y_i = (1 - alpha) e_i + (alpha / K) sum_{j in NK(i)} e_j,

and alpha = 0 gives plain instance classification (y_i = e_i). A target
row has at most K + 1 non-zero entries, so it is passed around sparse: the
ids of the entries and their weights, ``(ids (B, T), weights (B, T))`` with
the instance's own id first (T = 1 one-hot, T = K + 1 smoothed). The sharded
classifier takes them as they are (``CosineClassifier.forward(targets=...)``)
and each rank uses the entries that fall in its own rows.
"""
import numpy as np


def _check_labels(labels, num_classes, alpha):
    """labels as a NumPy array; ValueError unless they are instance ids and 0 <= alpha < 1."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} "
                         f"of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) (the instance ids), "
                         f"got values in [{labels.min()}, {labels.max()}]")
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must lie in [0, 1), got {alpha}")
    return labels


def target_entries(labels, num_classes, neighbours=None, alpha=0.0):
    """The non-zero entries of the targets y, as (ids (B, T), weights (B, T)).

    labels      (B,) int, global instance ids in [0, N)
    neighbours  None, or (N, K) int: NK(i), the K classes nearest to class i
    alpha       smoothing weight in [0, 1); 0 gives one-hot targets (T = 1),
                and alpha > 0 needs the table
    One-hot: T = 1, weight 1. Smoothed: T = K + 1, weights (1 - alpha) then
    alpha / K each. Host arrays (NumPy): they are tiny.
    """
    labels = _check_labels(labels, num_classes, alpha)
    if alpha > 0 and neighbours is None:
        raise ValueError(f"alpha = {alpha} smooths over the neighbour table, but none was "
                         f"given (pass neighbours, or alpha = 0 for one-hot targets)")
    if alpha == 0:
        return labels.astype(np.int64).reshape(-1, 1), np.ones((labels.size, 1))
    neighbours = np.asarray(neighbours)
    if neighbours.ndim != 2 or neighbours.shape[0] != num_classes or neighbours.shape[1] < 1:
        raise ValueError(f"neighbours must have shape ({num_classes}, K) with K >= 1, "
                         f"got {neighbours.shape}")
    return entries_from_rows(labels, num_classes, neighbours[labels], alpha)


def entries_from_rows(labels, num_classes, near, alpha):
    """``target_entries`` from the batch's own neighbour rows, near = NK(labels) (B, K).

    What a caller holding only the rows it needs uses (a trace records
    the batch's rows, not the N x K table). Same checks and result.
    """
    labels = _check_labels(labels, num_classes, alpha)
    near = np.asarray(near)
    B = labels.shape[0]
    if near.ndim != 2 or near.shape[0] != B or near.shape[1] < 1:
        raise ValueError(f"neighbour rows must have shape ({B}, K) with K >= 1, got {near.shape}")
    K = near.shape[1]
    if near.size and (near.dtype.kind not in "iu" or near.min() < 0 or near.max() >= num_classes):
        raise ValueError(f"neighbours must hold integer class ids in [0, {num_classes}), "
                         f"got {near.dtype} values in [{near.min()}, {near.max()}]")
    if np.any(near == labels[:, None]):
        b = int(np.nonzero(np.any(near == labels[:, None], axis=1))[0][0])
        raise ValueError(f"neighbours of class {labels[b]} include the class itself: "
                         f"NK(i) holds K classes j != i")
    ids = np.concatenate([labels.astype(np.int64).reshape(-1, 1), near.astype(np.int64)],
                         axis=1)                                    # (B, K+1)
    weights = np.empty(ids.shape)
    weights[:, 0] = 1 - alpha
    weights[:, 1:] = alpha / K
    return ids, weights
