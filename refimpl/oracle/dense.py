"""The dense, single-process cosine classifier: the reference of the sharded one.

Contract. ``dense_cosine_softmax(z, labels, W, tau, targets, topk)`` computes
from the layers alone (``l2_normalize``, a plain matrix product, the dense
``softmax_cross_entropy``), on the whole global batch and the whole W,

    logits = normalize(z) @ normalize(W).T / tau          (B, N)
    loss   = cross_entropy(logits, y)                      y dense (B, N)

and the gradients dz (B, D), dW (N, D) by the layers' backwards, plus the
top-k accuracy by the same tie rule as the sharded classifier (the label's
rank = #{larger logits} + #{tied logits with a lower id}). It holds the
B x N logits that the sharded classifier never builds: use it on small N,
to check ``parallel.classifier`` on any number of ranks.
"""
import numpy as np

from refimpl.layers.loss import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from refimpl.layers.normalize import l2_normalize_backward, l2_normalize_forward


def dense_targets(labels, num_classes, targets=None):
    """y (B, N) float64: one-hot of labels, or the sparse (ids, weights) scattered."""
    labels = np.asarray(labels)
    if targets is None:
        ids, weights = labels.reshape(-1, 1), np.ones((labels.shape[0], 1))
    else:
        ids, weights = (np.asarray(t) for t in targets)
    y = np.zeros((labels.shape[0], num_classes))
    np.add.at(y, (np.arange(labels.shape[0])[:, None], ids), weights)
    return y


def label_ranks(logits, labels):
    """(B,) rank of each row's label: #{l_j > l_y} + #{j < y : l_j == l_y}."""
    B, N = logits.shape
    ly = logits[np.arange(B), labels][:, None]                       # (B, 1)
    before = np.arange(N)[None, :] < np.asarray(labels)[:, None]
    return (logits > ly).sum(1) + ((logits == ly) & before).sum(1)


def dense_cosine_softmax(z, labels, W, tau, targets=None, topk=None):
    """(loss float, dz (B, D), dW (N, D), acc {k: fraction}) of the whole classifier.

    z (B, D) unnormalized features of the global batch; labels (B,); W (N, D);
    tau > 0; targets None or (ids, weights) as the sharded classifier takes
    them; topk None or e.g. (1, 5). Host (NumPy) arrays, any float dtype.
    """
    zh, zc = l2_normalize_forward(z)                                 # (B, D)
    wh, wc = l2_normalize_forward(W)                                 # (N, D)
    L = zh @ wh.T / tau                                              # (B, N)
    y = dense_targets(labels, W.shape[0], targets).astype(L.dtype)
    loss, cache = softmax_cross_entropy_forward(L, y)
    dL = softmax_cross_entropy_backward(1.0, cache)                  # (B, N)
    dz = l2_normalize_backward(dL @ wh / tau, zc)                    # (B, D)
    dW = l2_normalize_backward(dL.T @ zh / tau, wc)                  # (N, D)
    acc = {}
    if topk:
        rank = label_ranks(L, labels)
        acc = {int(k): float(np.mean(rank < k)) for k in topk}
    return float(loss), dz, dW, acc
