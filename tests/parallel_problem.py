"""The one-process problem the refimpl.parallel tests share (test_classifier,
test_topk, test_targets, test_train_step, test_data_parallel, test_blocks).

A small cosine-classifier problem (z, distinct labels, W, a neighbour table)
in float64, one SelfComm forward + backward of the sharded classifier, and a
tiny ResNet-18 step. The P-rank checks (P = 1..4 under mpirun) live in
test_parallel_mpi.py.
"""
import numpy as np

from refimpl.method.targets import target_entries
from refimpl.models import build_model
from refimpl.optim.sgd import SGD
from refimpl.parallel import (CosineClassifier, SelfComm, cosine_softmax_backward,
                              cosine_softmax_forward)

N, D, B, TAU, K, ALPHA = 37, 8, 12, 0.15, 3, 0.2


def unit_rows(x):
    """Each row divided by its L2 norm."""
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_problem(seed, n=N, d=D, b=B, k=K):
    """z (b, d), distinct labels (b,), W (n, d), neighbour table (n, k), float64.

    Each z is near the row of its label, so top-k accuracy is neither 0 nor 1.
    """
    r = np.random.default_rng(seed)
    W = r.standard_normal((n, d))
    labels = r.permutation(n)[:b]
    z = 1.5 * unit_rows(W[labels]) + r.standard_normal((b, d))
    nb = np.array([r.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    return z, labels, W, nb


def dense_target(labels, n, nb=None, alpha=0.0):
    """y (B, n) by hand: 1 at the label, or (1 - alpha) there and alpha/K at each neighbour."""
    y = np.zeros((len(labels), n))
    for b, lab in enumerate(labels):
        y[b, lab] += 1 - alpha
        if nb is not None:
            y[b, nb[lab]] += alpha / nb.shape[1]
    return y


def run(z, labels, W, nb=None, alpha=0.0, block=5, topk=None, tau=TAU):
    """One SelfComm forward + backward: (loss, dz, dW, acc)."""
    targets = target_entries(labels, W.shape[0], nb, alpha) if alpha else None
    loss, acc, cache = cosine_softmax_forward(z, labels, W, SelfComm(), W.shape[0], tau,
                                              targets, topk, block)
    dz, dW = cosine_softmax_backward(1.0, cache)
    return loss, dz, dW, acc


def small_net(seed=0):
    """A tiny float64 ResNet-18 encoder + head (width 2, head 8 -> D)."""
    return build_model("resnet18", stem="cifar", width=2, head_hidden=8, dim=D,
                       dtype=np.float64, seed=seed)


def make_step(seed=0):
    """(net, clf, net_opt, clf_opt, x, labels) of a small float64 step."""
    net = small_net()
    clf = CosineClassifier(N, D, SelfComm(), dtype=np.float64)
    net_opt = SGD(net.store.data, net.store.grad, lr=0.1, momentum=0.9)
    clf_opt = SGD(clf.weight.ravel(), clf.grad.ravel(), lr=0.1, momentum=0.9)
    r = np.random.default_rng(seed)
    return net, clf, net_opt, clf_opt, r.standard_normal((B, 3, 8, 8)), r.permutation(N)[:B]
