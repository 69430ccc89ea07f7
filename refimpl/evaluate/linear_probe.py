"""Linear probe: how linearly separable the classes are in frozen features.

Contract. ``linear_probe(train_features, train_labels, test_features,
test_labels)`` fits a multinomial logistic regression (softmax over the
classes; plain logistic regression when there are 2) on the train split's
features, which stay frozen (the encoder is not touched), and reports its
top-1 accuracy on both splits. Steps:

    mu, sigma = mean, std over the train rows (per feature; sigma = 0 -> 1)
    x'        = (x - mu) / sigma                 both splits, train statistics
    W, b      = argmin  C sum_i -log softmax(W x'_i + b)[y_i] + ||W||^2 / 2
    pred      = argmax (W x' + b)

The optimizer is scikit-learn's ``LogisticRegression`` (L-BFGS), not
written here: a linear probe is a measurement, and a well-tested convex
solver is the right instrument. Fixed hyper-parameters, the same for every
run so that numbers are comparable: C = 1.0 (L2 on W, not on b), at most
1000 iterations, tolerance 1e-4; ``random_state = seed`` (L-BFGS itself is
deterministic: the same features give the same numbers). ``converged`` in the
result says whether L-BFGS stopped before ``max_iter``.

It runs on one process, in float64 on the host: the features are small
(N x F, e.g. 50,000 x 512) next to the network, so under MPI every rank (or
just rank 0) calls it on the gathered features of
``refimpl.evaluate.features.extract_features``. Needs scikit-learn
(``pip install scikit-learn``, part of refimpl's ``data`` extra), imported
only when a probe runs.
"""
import warnings

import numpy as np

from refimpl.backend import to_numpy
from refimpl.checks import check_int

C_DEFAULT = 1.0        # inverse L2 strength (scikit-learn's C)
MAX_ITER_DEFAULT = 1000
TOL_DEFAULT = 1e-4


def linear_probe(train_features, train_labels, test_features, test_labels, C=C_DEFAULT,
                 max_iter=MAX_ITER_DEFAULT, tol=TOL_DEFAULT, seed=0):
    """Fit on train, score on both splits (module docstring).

    train_features (N, ...), test_features (M, ...): real arrays, rows
    flattened to the same D; train_labels (N,), test_labels (M,): int class
    ids >= 0 (unknown labels, -1, are an error: select the labeled rows),
    at least 2 classes in train. C > 0, max_iter >= 1, tol > 0, seed >= 0.

    Returns {"train_accuracy": float, "test_accuracy": float,
    "iterations": int (L-BFGS iterations), "converged": bool}.
    """
    LogisticRegression, ConvergenceWarning = _sklearn()
    xtr, ytr = _rows("train", train_features, train_labels)
    xte, yte = _rows("test", test_features, test_labels)
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"train and test features differ in size: {xtr.shape[1]} vs "
                         f"{xte.shape[1]} values per row")
    if len(np.unique(ytr)) < 2:
        raise ValueError(f"a linear probe needs at least 2 classes in train, got "
                         f"{np.unique(ytr).tolist()}")
    if not (np.isfinite(C) and C > 0 and np.isfinite(tol) and tol > 0):
        raise ValueError(f"C and tol must be positive and finite, got C={C!r}, tol={tol!r}")
    max_iter = check_int("max_iter", max_iter)
    seed = check_int("seed", seed, minimum=0)
    mu = xtr.mean(axis=0)                                      # (D,)
    sigma = xtr.std(axis=0)                                    # (D,)
    sigma[sigma == 0] = 1.0                                    # a constant feature stays 0
    xtr, xte = (xtr - mu) / sigma, (xte - mu) / sigma          # (N, D), (M, D)
    model = LogisticRegression(C=float(C), solver="lbfgs", max_iter=max_iter, tol=float(tol),
                               random_state=seed)
    with warnings.catch_warnings():
        # not converging within max_iter is reported in the result, not as a warning
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(xtr, ytr)
    iterations = int(np.max(model.n_iter_))
    return {"train_accuracy": float(np.mean(model.predict(xtr) == ytr)),
            "test_accuracy": float(np.mean(model.predict(xte) == yte)),
            "iterations": iterations, "converged": iterations < max_iter}


def linear_probe_accuracy(train_features, train_labels, test_features, test_labels,
                          C=C_DEFAULT, max_iter=MAX_ITER_DEFAULT, tol=TOL_DEFAULT, seed=0):
    """The test split's top-1 accuracy in [0, 1] of ``linear_probe`` (same arguments)."""
    return linear_probe(train_features, train_labels, test_features, test_labels, C=C,
                        max_iter=max_iter, tol=tol, seed=seed)["test_accuracy"]


def _rows(name, x, y):
    """Host float64 (n, D) features and int64 (n,) labels, checked."""
    x, y = to_numpy(x), to_numpy(y)
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{name}: features shaped {x.shape} and labels shaped {y.shape}; "
                         f"expected (n, ...) and (n,) with n >= 1")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name}: labels must be integer class ids, got {y.dtype}")
    if y.min() < 0:
        raise ValueError(f"{name}: {int(np.sum(y < 0))} labels are unknown (< 0): select "
                         f"the labeled rows first")
    x = x.reshape(len(x), -1).astype(np.float64)               # (n, D)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: features contain NaN or infinity")
    return x, y.astype(np.int64)


def _sklearn():
    """(LogisticRegression, ConvergenceWarning), or ImportError saying what to install."""
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
    except ImportError as e:
        raise ImportError("the linear probe needs scikit-learn: pip install scikit-learn "
                          "(or pip install 'refimpl[data]')") from e
    return LogisticRegression, ConvergenceWarning
