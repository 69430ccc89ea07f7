"""Weighted cosine kNN (InstDisc/PIC's monitor) against a dense NumPy reference;
neighbour label agreement on a hand-made table (refimpl.evaluate.knn, .agreement)."""
import numpy as np
import pytest

from refimpl.evaluate.agreement import neighbour_label_agreement
from refimpl.evaluate.knn import (raw_pixel_weighted_knn_accuracy, weighted_knn_accuracy,
                                  weighted_knn_predict)


def dense_weighted_knn(bank, bank_labels, queries, k, temperature, num_classes):
    """The reference: whole similarity matrix, a full stable sort, a loop over votes."""
    b = bank.reshape(len(bank), -1)
    q = queries.reshape(len(queries), -1)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    sim = q @ b.T                                             # (M, N)
    pred = np.empty(len(q), dtype=np.int64)
    for i in range(len(q)):
        nearest = np.argsort(-sim[i], kind="stable")[:k]      # ties: lower index first
        scores = np.zeros(num_classes)
        for j in nearest:
            scores[bank_labels[j]] += np.exp(sim[i, j] / temperature)
        pred[i] = np.argmax(scores)                           # ties: lower class
    return pred


def blobs(seed, n_bank=300, n_query=120, dim=16, classes=6, spread=1.5, dtype=np.float64):
    """Gaussian class centres plus noise: the votes are neither unanimous nor random."""
    g = np.random.default_rng(seed)
    centres = g.normal(size=(classes, dim))
    yb, yq = g.integers(0, classes, n_bank), g.integers(0, classes, n_query)
    xb = centres[yb] + spread * g.normal(size=(n_bank, dim))
    xq = centres[yq] + spread * g.normal(size=(n_query, dim))
    return xb.astype(dtype), yb, xq.astype(dtype), yq


@pytest.mark.parametrize("temperature", [0.07, 1.0])
def test_weighted_knn_equals_dense_reference(temperature):
    xb, yb, xq, yq = blobs(0)
    got = weighted_knn_predict(xb, yb, xq, ks=(1, 5, 20), temperature=temperature,
                               num_classes=6, chunk=50)
    for k in (1, 5, 20):  # exact: the closest cosines here are 5e-7 apart, rounding 1e-15
        want = dense_weighted_knn(xb, yb, xq, k, temperature, 6)
        np.testing.assert_array_equal(got[k], want, err_msg=f"k={k} T={temperature}")
    acc = weighted_knn_accuracy(xb, yb, xq, yq, ks=(1, 5, 20), temperature=temperature,
                                num_classes=6)
    for k in (1, 5, 20):
        assert acc[k] == np.mean(got[k] == yq)
    # the problem discriminates: neither chance (1/6) nor perfect
    assert 0.3 < acc[20] < 0.95


def test_weighted_knn_float32_agrees_with_float64_reference():
    xb, yb, xq, yq = blobs(1, dtype=np.float32)
    got = weighted_knn_predict(xb, yb, xq, ks=(5, 20))
    for k in (5, 20):
        want = dense_weighted_knn(xb.astype(np.float64), yb, xq.astype(np.float64), k,
                                  0.07, 6)
        # float32 similarities may reorder near-equal neighbours: allow one query in 120
        assert np.sum(got[k] != want) <= 1, k


def test_chunks_order_of_ks_and_image_shaped_rows_agree():
    xb, yb, xq, _ = blobs(2)
    ref = weighted_knn_predict(xb, yb, xq, ks=(20, 3), num_classes=6)
    assert list(ref) == [20, 3]                              # the caller's order
    for chunk in (1, 7, 119, 120, 1000):
        got = weighted_knn_predict(xb, yb, xq, ks=(3, 20), num_classes=6, chunk=chunk)
        for k in (3, 20):
            np.testing.assert_array_equal(got[k], ref[k])
    # rows are flattened: (n, 4, 4) features are the same as (n, 16)
    got = weighted_knn_predict(xb.reshape(-1, 4, 4), yb, xq.reshape(-1, 4, 4), ks=3)
    np.testing.assert_array_equal(got[3], ref[3])
    # a single k, and every bank row as neighbour (k = N)
    assert list(weighted_knn_predict(xb, yb, xq, ks=len(xb))) == [len(xb)]


def test_hand_computed_example_temperature_decides():
    """Query (1, 0). Bank: (1, 0) class 0 at cosine 1; (0.8, +-0.6) class 1 at cosine 0.8.

    k = 3, T = 1:    class 0 scores e^1 = 2.72, class 1 scores 2 e^0.8 = 4.45 -> class 1.
    k = 3, T = 0.07: class 0 scores e^14.3 = 1.6e6, class 1 2 e^11.4 = 1.8e5 -> class 0.
    k = 1: the nearest alone, class 0 (a majority vote of 3 would say class 1).
    """
    bank = np.array([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    labels = np.array([0, 1, 1])
    q = np.array([[1.0, 0.0]])
    assert weighted_knn_predict(bank, labels, q, ks=3, temperature=1.0)[3].tolist() == [1]
    assert weighted_knn_predict(bank, labels, q, ks=(1, 3))[3].tolist() == [0]
    assert weighted_knn_predict(bank, labels, q, ks=(1, 3))[1].tolist() == [0]
    assert weighted_knn_accuracy(bank, labels, np.vstack([q, q]), np.array([1, 0]), ks=3,
                                 temperature=1.0) == {3: 0.5}
    # scale does not matter (cosine): the same bank 10x longer
    assert weighted_knn_predict(10 * bank, labels, q, ks=3, temperature=1.0)[3].tolist() == [1]


def test_tie_rules():
    q = np.array([[1.0, 0.0]])
    # equal similarities: the lower bank index is the nearer neighbour
    twins = np.array([[0.6, 0.8], [0.6, 0.8], [0.0, 1.0]])
    assert weighted_knn_predict(twins, np.array([2, 1, 0]), q, ks=1)[1].tolist() == [2]
    assert weighted_knn_predict(twins, np.array([1, 2, 0]), q, ks=1)[1].tolist() == [1]
    # k = 2 of three equal similarities: indices 0 and 1, never 2
    triplets = np.array([[0.6, 0.8], [0.6, 0.8], [0.6, 0.8], [-1.0, 0.0]])
    for labels, want in (([1, 1, 0, 0], 1), ([0, 1, 1, 1], 0), ([1, 0, 0, 0], 0)):
        got = weighted_knn_predict(triplets, np.array(labels), q, ks=2, num_classes=2)
        assert got[2].tolist() == [want], labels
    # equal class scores (mirror images of the query): the lower class wins
    mirror = np.array([[0.6, 0.8], [0.6, -0.8]])
    assert weighted_knn_predict(mirror, np.array([3, 1]), q, ks=2)[2].tolist() == [1]
    assert weighted_knn_predict(mirror, np.array([1, 3]), q, ks=2)[2].tolist() == [1]
    # a zero feature is at cosine 0 from everything (no division by zero)
    zero = np.array([[0.0, 0.0], [-1.0, 0.0]])
    assert weighted_knn_predict(zero, np.array([4, 2]), q, ks=1)[1].tolist() == [4]


def test_raw_pixel_weighted_knn_reads_datasets():
    from refimpl.data.synthetic import SyntheticDataset
    train, test = SyntheticDataset(120, 16, 4, seed=0), SyntheticDataset(30, 16, 4, seed=1)
    acc = raw_pixel_weighted_knn_accuracy(train, test, ks=(5, 20))
    images = ((train.read(np.arange(120)), train.labels),
              (test.read(np.arange(30)), test.labels))
    assert raw_pixel_weighted_knn_accuracy(*images, ks=(5, 20)) == acc
    want = dense_weighted_knn(images[0][0].astype(np.float32), train.labels,
                              images[1][0].astype(np.float32), 5, 0.07, 4)
    assert acc[5] == np.mean(want == test.labels)


def test_weighted_knn_errors():
    xb, yb, xq, yq = blobs(3, n_bank=10, n_query=4)
    with pytest.raises(ValueError, match="k = 11 needs at least 11 bank rows"):
        weighted_knn_predict(xb, yb, xq, ks=(5, 11))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        weighted_knn_predict(xb, yb, xq, ks=0)
    with pytest.raises(ValueError, match="distinct"):
        weighted_knn_predict(xb, yb, xq, ks=(5, 5))
    bad = yb.copy()
    bad[3] = -1
    with pytest.raises(ValueError, match="1 labels are unknown"):
        weighted_knn_predict(xb, bad, xq, ks=1)
    with pytest.raises(ValueError, match="bank_labels: expected shape"):
        weighted_knn_predict(xb, yb[:9], xq, ks=1)
    with pytest.raises(ValueError, match="differ in size"):
        weighted_knn_predict(xb, yb, xq[:, :5], ks=1)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        weighted_knn_predict(xb, yb, xq, ks=1, num_classes=2)
    with pytest.raises(ValueError, match="temperature"):
        weighted_knn_predict(xb, yb, xq, ks=1, temperature=0.0)
    with pytest.raises(ValueError, match="chunk must be"):
        weighted_knn_predict(xb, yb, xq, ks=1, chunk=0)
    nan = xq.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="queries: features contain NaN"):
        weighted_knn_predict(xb, yb, nan, ks=1)
    with pytest.raises(ValueError, match="integers"):
        weighted_knn_predict(xb, yb.astype(float), xq, ks=1)
    with pytest.raises(ValueError, match="query_labels: 1 labels are unknown"):
        weighted_knn_accuracy(xb, yb, xq, np.array([0, 1, -1, 2]), ks=1)
    with pytest.raises(ValueError, match="4 rows but query_labels"):
        weighted_knn_accuracy(xb, yb, xq, yq[:3], ks=1)


def test_neighbour_label_agreement_hand_made_table():
    labels = np.array([0, 0, 1, 1, -1])
    nb = np.array([[1, 2],    # 0: 1 agrees, 2 does not        -> 1 of 2
                   [0, 4],    # 1: 0 agrees, 4 unknown          -> 1 of 1
                   [3, 3],    # 2: both agree                   -> 2 of 2
                   [0, 1],    # 3: neither agrees               -> 0 of 2
                   [0, 2]])   # 4: unknown row, ignored
    assert neighbour_label_agreement(nb, labels) == 4 / 7
    assert neighbour_label_agreement(nb, np.array([0, 1, 2, 3, 4])) == 0.0
    assert neighbour_label_agreement(nb, np.full(5, -1)) is None
    assert neighbour_label_agreement(nb[:, :0], labels) is None       # K = 0
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\)"):
        neighbour_label_agreement(nb + 1, labels)
    with pytest.raises(ValueError, match="N = 4"):
        neighbour_label_agreement(nb, labels[:4])
