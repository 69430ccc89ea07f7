"""Hardest-class neighbours in one process (the P-rank ring is in test_parallel_mpi.py).

``hardest_neighbours`` (the tiled running top-K) against ``dense_hardest_neighbours``
(the N x N matrix) and against a brute force written here with Python's
sorted(); exact ties (rows of +-1/2 entries have exactly representable
cosines; duplicated rows tie exactly), tile sizes, K = 1 and K = N - 1,
zero rows, errors. The device top-K (``_tile_update_device``, what a GPU
runs) is checked here on NumPy arrays against the same references.
"""
import numpy as np
import pytest

from refimpl.method.neighbours import (_tile_update, _tile_update_device,
                                       dense_hardest_neighbours, hardest_neighbours,
                                       neighbours_memory)
from refimpl.parallel import CosineClassifier, SelfComm


def classifier(W, dtype=np.float64):
    clf = CosineClassifier(W.shape[0], W.shape[1], SelfComm(), dtype=dtype)
    clf.weight[...] = W
    return clf


def brute_force(W, k):
    """NK(i) by Python: sort j != i by (-cos, j); float64 cosines of exact data."""
    Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
    S = Wn @ Wn.T
    return np.array([sorted((j for j in range(len(W)) if j != i),
                            key=lambda j: (-S[i, j], j))[:k] for i in range(len(W))])


def tie_rows(n, d=16, seed=0):
    """Rows of +-1/2: norm 2, cosines multiples of 1/16 (exact); some rows duplicated."""
    W = np.random.default_rng(seed).choice([-0.5, 0.5], size=(n, d))
    W[1:30:3] = W[0:29:3]
    return W


@pytest.mark.parametrize("rows,columns", [(2048, 4096), (7, 11), (1, 1), (64, 2)])
def test_exact_ties_match_brute_force(rows, columns):
    """Many exactly tied cosines: the lower id wins, whatever the tile size."""
    W = tie_rows(60)
    want = brute_force(W, 5)
    got = hardest_neighbours(classifier(W), SelfComm(), 5, rows, columns)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(dense_hardest_neighbours(W, 5), want)
    # ties really decide: a duplicated row's twin comes first, at cosine 1
    assert got[0, 0] == 1 and got[1, 0] == 0
    Wn = W / 2
    S = Wn @ Wn.T
    assert any(S[i, got[i, 4]] == S[i, got[i, 3]] for i in range(60))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_random_rows_match_dense(dtype):
    clf = CosineClassifier(500, 32, SelfComm(), dtype=dtype, seed=3)
    ref = dense_hardest_neighbours(clf.weight, 8)
    # Exact ids from cosines computed in tiles and in one GEMM: they agree while no two
    # cosines near a row's 8th are within rounding of each other. The closest pair here
    # is 4.9e-7 apart, about float32's rounding of a 32-term dot product, so this holds
    # because both round each dot product alike (on every kernel tried; not promised).
    for rows, columns in ((2048, 4096), (37, 101)):
        got = hardest_neighbours(clf, SelfComm(), 8, rows, columns)
        np.testing.assert_array_equal(got, ref)
        assert got.dtype == np.int64 and got.shape == (500, 8)
    assert not np.any(got == np.arange(500)[:, None])  # j != i


def test_k_extremes_and_zero_rows():
    W = np.random.default_rng(1).standard_normal((9, 4))
    W[4] = 0  # a zero row: cosine 0 with everything (F.normalize's clamp)
    for k in (1, 8):
        np.testing.assert_array_equal(
            hardest_neighbours(classifier(W), SelfComm(), k, 3, 2), brute_force_zero(W, k))


def brute_force_zero(W, k):
    n = np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-12)
    S = (W / n) @ (W / n).T
    return np.array([sorted((j for j in range(len(W)) if j != i),
                            key=lambda j: (-S[i, j], j))[:k] for i in range(len(W))])


def test_errors_and_memory():
    clf = classifier(np.eye(4))
    for k in (4, 10):
        with pytest.raises(ValueError, match=f"K = {k} neighbours per class needs N > K"):
            hardest_neighbours(clf, SelfComm(), k)
    for k in (0, 1.5):
        with pytest.raises(ValueError, match="must be a positive integer"):
            hardest_neighbours(clf, SelfComm(), k)
    assert neighbours_memory(1_281_167, 5) == 1_281_167 * 5 * 8  # 51 MB per rank


@pytest.mark.parametrize("rows,columns", [(8192, 65536), (7, 11), (1, 1), (64, 2), (5, 5)])
def test_device_topk_on_numpy_matches_brute_force_with_ties(rows, columns):
    """The GPU's running top-K (its group-maximum threshold, one lexsort), run on
    NumPy arrays: the exact tables of the host top-K, ties to the lower id,
    whatever the tile (columns < K: no group bound, every entry a candidate)."""
    W = tie_rows(60)
    want = brute_force(W, 5)
    got = hardest_neighbours(classifier(W), SelfComm(), 5, rows, columns, device_topk=True)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int64


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_device_topk_on_numpy_equals_host_topk_on_random_rows(dtype):
    clf = CosineClassifier(700, 16, SelfComm(), dtype=dtype, seed=5)
    for rows, columns in ((128, 256), (700, 700), (33, 64)):
        host = hardest_neighbours(clf, SelfComm(), 6, rows, columns, device_topk=False)
        dev = hardest_neighbours(clf, SelfComm(), 6, rows, columns, device_topk=True)
        np.testing.assert_array_equal(dev, host)


def test_device_tile_update_equals_host_tile_update():
    """One tile merged into a running top-K that already holds entries: the same
    (similarity, id) rows from both merges, the own class excluded."""
    g = np.random.default_rng(2)
    R, C, k = 9, 40, 4
    S = np.round(g.standard_normal((R, C)), 1)                # many exact ties
    best_sim = -np.sort(-np.round(g.standard_normal((R, k)), 1), axis=1)
    best_id = np.tile(np.arange(1000, 1000 + k), (R, 1))     # ids outside the tile
    host = _tile_update(best_sim.copy(), best_id.copy(), S.copy(), np.arange(100, 100 + C),
                        np.arange(103, 103 + R), k, first=False)
    dev = _tile_update_device(best_sim.copy(), best_id.copy(), S.copy(), 100, 103, k)
    np.testing.assert_array_equal(dev[0], host[0])
    np.testing.assert_array_equal(dev[1], host[1])
    assert not np.any(dev[1] == np.arange(103, 103 + R)[:, None])  # j != i
