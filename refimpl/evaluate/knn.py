"""k-nearest-neighbour accuracy on features: cosine similarity, majority vote.

Contract: ``knn_majority_accuracy(train_features, train_labels,
test_features, test_labels, k)`` is the top-1 accuracy of this classifier:

    x_hat = x / max(||x||, 1e-12)              every feature row, in float32
    sim   = x_hat_test @ x_hat_train^T         cosine similarity, (N_test, N_train)
    NN(t) = the k training rows with the largest sim (ties: argpartition's order)
    pred  = the label with the most votes among NN(t), one vote per neighbour;
            a tied vote goes to the tied label whose nearest member is nearest

(a vote of rank r, nearest first, weighs ``1 + 1e-6 (k - r)``: the bonus,
smaller than 1 in total, only ever decides between equal counts).

This is a plain majority vote, not the similarity-weighted vote
(``exp(sim / 0.07)``) of InstDisc/PIC's kNN monitor. ``raw_pixel_knn_accuracy``
applies it to flattened pixels: on plain 8x8 digits it is about 98%
correct, on cluttered digits (``data_tools.clutter``) far less, which is
what a learned representation is compared against.

Computed on the host (device arrays are copied there), in chunks of
``chunk`` test rows, so memory is ``chunk * N_train`` similarities.
"""
import numpy as np

from refimpl.backend import to_numpy
from refimpl.checks import check_int


def knn_majority_accuracy(train_features, train_labels, test_features, test_labels, k=5,
                          chunk=1024):
    """Top-1 accuracy in [0, 1] of the cosine k-NN majority vote (module docstring).

    train_features (N, ...), test_features (M, ...): any real arrays, each
    row flattened to D values (the same D for both); train_labels (N,),
    test_labels (M,): any comparable labels (ints, strings). k in [1, N];
    chunk >= 1 test rows per similarity block.
    """
    xtr, xte = to_numpy(train_features), to_numpy(test_features)
    ytr, yte = to_numpy(train_labels), to_numpy(test_labels)
    for name, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        if y.ndim != 1 or x.ndim < 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{name}: {x.shape[0] if x.ndim else 0} feature rows but labels "
                             f"shaped {y.shape}; expected features (n, ...) and labels (n,)")
        if y.shape[0] == 0:
            raise ValueError(f"{name}: no rows")
    k = check_int("k", k, maximum=len(ytr))
    chunk = check_int("chunk", chunk)
    xtr, xte = _unit_rows(xtr), _unit_rows(xte)                # (N, D), (M, D) float32
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"train and test features differ in size: {xtr.shape[1]} vs "
                         f"{xte.shape[1]} values per row")
    classes, ytr_i = np.unique(ytr, return_inverse=True)       # ytr == classes[ytr_i]
    correct = 0
    for s in range(0, len(xte), chunk):
        sim = xte[s:s + chunk] @ xtr.T                          # (c, N)
        nn = np.argpartition(-sim, k - 1, axis=1)[:, :k]        # (c, k) k best, unordered
        order = np.argsort(-np.take_along_axis(sim, nn, axis=1), axis=1, kind="stable")
        nn = np.take_along_axis(nn, order, axis=1)              # (c, k) nearest first
        votes = np.zeros((len(nn), len(classes)))               # (c, classes)
        rows = np.arange(len(nn))
        for rank in range(k):
            # each vote is worth 1; the tiny rank bonus breaks ties toward the nearest
            np.add.at(votes, (rows, ytr_i[nn[:, rank]]), 1 + 1e-6 * (k - rank))
        pred = classes[np.argmax(votes, axis=1)]                # (c,)
        correct += int(np.sum(pred == yte[s:s + chunk]))
    return correct / len(yte)


def raw_pixel_knn_accuracy(train, test, k=5, chunk=1024):
    """``knn_majority_accuracy`` on raw pixels: each image flattened is its feature.

    train, test: (images (N, ...), labels (N,)) or a dataset with ``read()``
    and ``labels`` (``refimpl.data.datasets.open_dataset``; all its images
    are read).
    """
    (xtr, ytr), (xte, yte) = _images_and_labels(train), _images_and_labels(test)
    return knn_majority_accuracy(xtr, ytr, xte, yte, k=k, chunk=chunk)


def _unit_rows(x):
    """(n, ...) -> float32 (n, D) rows of unit L2 norm (norm clamped at 1e-12)."""
    x = x.reshape(len(x), -1).astype(np.float32)                # (n, D)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _images_and_labels(data):
    """(images, labels) from a tuple or from a dataset with read() and labels."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data
    if hasattr(data, "read") and hasattr(data, "labels"):
        labels = np.asarray(data.labels)
        return data.read(np.arange(len(labels))), labels
    raise TypeError(f"expected (images, labels) or a dataset with read() and labels, "
                    f"got {type(data).__name__}")
