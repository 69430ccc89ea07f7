"""Linear probe on frozen features: separable blobs are solved, random labels stay
at chance, the same input gives the same numbers (refimpl.evaluate.linear_probe)."""
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")

from refimpl.evaluate.linear_probe import linear_probe, linear_probe_accuracy  # noqa: E402


def blobs(seed, n_train=400, n_test=200, dim=32, classes=5, spread=0.3, offset=5.0):
    """Well separated Gaussian blobs, far from the origin and on different scales."""
    g = np.random.default_rng(seed)
    centres = g.normal(size=(classes, dim))
    scale = np.exp(g.uniform(-3, 3, dim))                      # standardization matters
    ytr, yte = g.integers(0, classes, n_train), g.integers(0, classes, n_test)
    xtr = (offset + centres[ytr] + spread * g.normal(size=(n_train, dim))) * scale
    xte = (offset + centres[yte] + spread * g.normal(size=(n_test, dim))) * scale
    return xtr.astype(np.float32), ytr, xte.astype(np.float32), yte


def test_separable_blobs_are_solved():
    xtr, ytr, xte, yte = blobs(0)
    result = linear_probe(xtr, ytr, xte, yte)
    assert result["train_accuracy"] == 1.0 and result["test_accuracy"] == 1.0
    assert result["converged"] and 0 < result["iterations"] < 1000
    assert linear_probe_accuracy(xtr, ytr, xte, yte) == 1.0
    # image-shaped rows are flattened
    assert linear_probe_accuracy(xtr.reshape(-1, 4, 8), ytr, xte.reshape(-1, 4, 8), yte) == 1.0


def test_random_labels_stay_near_chance_on_test():
    g = np.random.default_rng(1)
    xtr, xte = g.normal(size=(600, 32)), g.normal(size=(2000, 32))
    ytr, yte = g.integers(0, 4, 600), g.integers(0, 4, 2000)
    result = linear_probe(xtr, ytr, xte, yte)
    # it memorizes some of the train noise, but nothing carries over to test
    assert result["train_accuracy"] > 0.3
    assert abs(result["test_accuracy"] - 0.25) < 0.04          # 4 standard errors


def test_deterministic_and_constant_features_allowed():
    xtr, ytr, xte, yte = blobs(2, spread=3.0)                  # overlapping: not trivial
    xtr[:, 0], xte[:, 0] = 7.0, 7.0                            # a constant feature (std 0)
    a = linear_probe(xtr, ytr, xte, yte)
    b = linear_probe(xtr.copy(), ytr, xte.copy(), yte)
    assert a == b and 0.3 < a["test_accuracy"] < 1.0
    # few iterations: not converged, reported rather than warned
    assert linear_probe(xtr, ytr, xte, yte, max_iter=2)["converged"] is False


def test_bad_labels_shapes_and_regularization_are_refused():
    xtr, ytr, xte, yte = blobs(3, n_train=20, n_test=10)
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe(xtr, np.zeros(20, dtype=np.int64), xte, yte)
    bad = ytr.copy()
    bad[0] = -1
    with pytest.raises(ValueError, match="train: 1 labels are unknown"):
        linear_probe(xtr, bad, xte, yte)
    with pytest.raises(ValueError, match="differ in size"):
        linear_probe(xtr, ytr, xte[:, :3], yte)
    with pytest.raises(ValueError, match="test: features shaped"):
        linear_probe(xtr, ytr, xte, yte[:5])
    with pytest.raises(ValueError, match="C and tol"):
        linear_probe(xtr, ytr, xte, yte, C=0.0)


def test_missing_scikit_learn_says_what_to_install(monkeypatch):
    xtr, ytr, xte, yte = blobs(3, n_train=20, n_test=10)
    # without scikit-learn: an ImportError that says what to install
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        linear_probe(xtr, ytr, xte, yte)
