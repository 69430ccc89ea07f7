"""Top-k accuracy of the sharded classifier (refimpl.parallel.topk), ties included,
against a brute-force count of the dense logits."""
import numpy as np
import pytest

from refimpl.oracle.dense import label_ranks
from parallel_problem import ALPHA, B, D, N, TAU, make_problem, run, unit_rows


def reference_ranks(z, W, labels, tau=TAU):
    """(rank, naive rank) of each label on the dense logits.

    rank: the oracle's rule (ties: lower id first); naive = #{j: l_j > l_y}
    (the label first among ties), for a negative control.
    """
    L = (unit_rows(z) @ unit_rows(W).T) * (1.0 / tau)                    # (B, N)
    ly = L[np.arange(len(labels)), labels][:, None]
    return label_ranks(L, labels), (L > ly).sum(1)


@pytest.mark.parametrize("alpha", [0.0, ALPHA])
def test_topk_accuracy_with_ties(alpha):
    """Tied logits: the lower class id ranks first (like argmax)."""
    z, labels, W, nb = make_problem(5)
    # Rows 3 and 20 both normalize to e_0 exactly; z = c e_0 ties them exactly.
    e0 = np.eye(D)[0]
    W[3], W[20] = 3 * e0, 0.5 * e0
    labels[:2] = [20, 3]
    z[:2] = [2 * e0, 4 * e0]
    rank, naive = reference_ranks(z, W, labels)
    assert rank[0] == 1 and rank[1] == 0  # label 20 is beaten by the tie at 3
    topk = (1, 2, 5)
    _, _, _, acc = run(z, labels, W, nb, alpha, block=5, topk=topk)
    assert acc == {k: float(np.mean(rank < k)) for k in topk}
    assert 0 < acc[1] < 1 and 0 < acc[5] < 1
    # Ranking the label first among ties would give another top-1: the tie case matters.
    assert np.mean(naive < 1) != acc[1]


@pytest.mark.parametrize("block", [3, 64])
def test_topk_accuracy_with_many_ties(block):
    """Ties among more classes than k, across blocks: a zero feature (every
    logit 0) and ten equal rows. Each rank keeps at most max(k) candidates
    per row (topk.py); the ranks below that are still exact."""
    z, labels, W, nb = make_problem(8)
    e0 = np.eye(D)[0]
    W[:10] = e0 * np.arange(1, 11)[:, None]          # rows 0..9 all normalize to e_0
    z[0], labels[0] = 0.0, 6                          # every logit 0: rank 6
    z[1], labels[1] = 3 * e0, 2                       # the top logit, tied ten ways: rank 2
    z[2], labels[2] = 3 * e0, 9                       # rank 9
    labels[3:] = np.setdiff1d(np.arange(10, N), labels[3:])[:B - 3]  # distinct labels
    zhat = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)  # clamped, like F.normalize
    rank = label_ranks((zhat @ unit_rows(W).T) / TAU, labels)
    assert rank[:3].tolist() == [6, 2, 9]
    for topk in ((1, 3, 7), (1, 10)):
        for alpha in (0.0, ALPHA):
            _, _, _, acc = run(z, labels, W, nb, alpha, block=block, topk=topk)
            assert acc == {k: float(np.mean(rank < k)) for k in topk}, (topk, alpha)
