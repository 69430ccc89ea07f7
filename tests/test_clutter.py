"""Cluttered digits: deterministic, split by original digit, raw-pixel kNN collapses
(refimpl.evaluate.knn, tested here on the data it was written for)."""
import numpy as np
import pytest

from data_tools import clutter as C
from data_tools.digits import load_digits_arrays
from refimpl.evaluate.knn import knn_majority_accuracy, raw_pixel_knn_accuracy


@pytest.fixture(scope="module")
def digits():
    return load_digits_arrays()


def test_placements_are_deterministic(digits):
    d, y = digits
    idx = np.array([3, 10, 500])
    a = C.clutter_arrays(d, y, idx, size=24, copies=3, seed=1)
    b = C.clutter_arrays(d, y, idx, size=24, copies=3, seed=1)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    images, labels, ids = a
    assert images.shape == (9, 24, 24, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(ids, np.repeat(idx, 3))
    np.testing.assert_array_equal(labels, y[ids])
    # copies of one digit differ; another seed gives other placements
    assert not np.array_equal(images[0], images[1])
    other = C.clutter_arrays(d, y, idx, size=24, copies=3, seed=2)[0]
    assert not np.array_equal(other[0], images[0])


def test_make_clutter_splits_by_original_digit(tmp_path, digits):
    from refimpl.data.packed import PackedDataset
    d, y = digits
    train_p, test_p = C.make_clutter(tmp_path / "c", size=16, copies=2, seed=0)
    train, test = PackedDataset(train_p), PackedDataset(test_p)
    tr = np.asarray(train.manifest["source_indices"])
    te = np.asarray(test.manifest["source_indices"])
    assert len(train) == 2 * len(np.unique(tr)) and len(test) == 2 * len(np.unique(te))
    assert not set(tr) & set(te)                       # no digit in both splits
    assert set(tr) | set(te) == set(range(len(d)))     # every digit used
    np.testing.assert_array_equal(train.labels, y[tr])
    assert train.image_size == (16, 16) and train.class_names == [str(c) for c in range(10)]
    # the same digits as the plain digits' split
    from data_tools.digits import split_indices
    np.testing.assert_array_equal(np.unique(te), split_indices(y, 0.2, 0)[1])
    # the CLI refuses to overwrite
    assert C.main([str(tmp_path / "c"), "--size", "16"]) == 1


def test_knn_tie_goes_to_the_nearest():
    train = (np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]]), np.array([0, 1, 2]))
    test = (np.array([[1.0, 0.05], [-0.05, 1.0]]), np.array([0, 1]))
    assert raw_pixel_knn_accuracy(train, test, k=1) == 1.0
    assert raw_pixel_knn_accuracy(train, test, k=3) == 1.0  # 3-way tie: nearest wins
    with pytest.raises(ValueError, match="k must be"):
        raw_pixel_knn_accuracy(train, test, k=4)
    # the feature function itself: the same numbers, and its checks
    assert knn_majority_accuracy(*train, *test, k=3) == 1.0
    with pytest.raises(ValueError, match="differ in size"):
        knn_majority_accuracy(train[0], train[1], np.ones((2, 3)), test[1], k=1)
    with pytest.raises(ValueError, match="3 feature rows but labels shaped"):
        knn_majority_accuracy(train[0], train[1][:2], *test, k=1)
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        knn_majority_accuracy(*train, *test, k=1, chunk=0)


def test_knn_reads_datasets_and_chunks_agree():
    from refimpl.data.synthetic import SyntheticDataset
    train, test = SyntheticDataset(200, 16, 4, seed=0), SyntheticDataset(50, 16, 4, seed=1)
    acc = raw_pixel_knn_accuracy(train, test, k=3)
    images = (train.read(np.arange(200)), train.labels), (test.read(np.arange(50)), test.labels)
    assert raw_pixel_knn_accuracy(*images, k=3) == acc
    assert raw_pixel_knn_accuracy(*images, k=3, chunk=7) == acc


def test_raw_pixel_knn_collapses_on_clutter(digits):
    from data_tools.digits import load_digits_uint8, split_indices
    d, y = digits
    tr, te = split_indices(y, 0.2, 0)
    plain_x, plain_y = load_digits_uint8(32)
    plain = raw_pixel_knn_accuracy((plain_x[tr], plain_y[tr]), (plain_x[te], plain_y[te]), k=5)
    ctr = C.clutter_arrays(d, y, tr, size=32, copies=1, seed=0)
    cte = C.clutter_arrays(d, y, te, size=32, copies=1, seed=0)
    clutter = raw_pixel_knn_accuracy(ctr[:2], cte[:2], k=5)
    print(f"raw-pixel 5-NN accuracy: plain digits {plain:.3f}, clutter {clutter:.3f}")
    assert plain > 0.9
    assert clutter < 0.5
    assert clutter > 0.15  # still above chance (0.1): the digits are there


def test_a_failing_test_split_leaves_no_lone_train(tmp_path, capsys, fail_test_split):
    fail_test_split()
    assert C.main([str(tmp_path / "c"), "--size", "8", "--copies", "1"]) == 1
    assert "No space left on device (simulated)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_too_large_size_is_one_clear_error(tmp_path, capsys):
    assert C.main([str(tmp_path / "c"), "--size", "100000"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("clutter: error: --size 100000 --copies 4: 5752 images of 100000x100000 "
                          "in one split needs about ")
    assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
