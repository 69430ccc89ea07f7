"""k-nearest-neighbour classifiers on features: cosine similarity, two votes.

Contract. Both classifiers normalize every feature row (x / max(||x||, 1e-12))
and find, for each test row, the k train rows ("the bank") of largest cosine
similarity; they differ in how those k neighbours vote.

``weighted_knn_predict`` / ``weighted_knn_accuracy``: the similarity-weighted
vote of InstDisc (Wu et al. 2018), the kNN monitor PIC reports (k = 20 and
200, T = 0.07):

    s_j     = <q_hat, b_hat_j>                       cosine similarity to bank row j
    NN_k(q) = the k rows with the largest s_j        (ties: the lower bank index)
    score_c = sum_{j in NN_k(q), y_j = c} exp(s_j / T)
    pred    = argmax_c score_c                       (ties: the lower class)

Labels are class ids in [0, C); unknown labels (-1) are an error (they cannot
vote, and a query without a label cannot be scored). All ks are read off one
ordered top-max(k) selection. ``raw_pixel_weighted_knn_accuracy`` applies it to
flattened pixels: the baseline a learned representation is compared against,
measured by the same rule.

``knn_majority_accuracy`` (the older, plain majority vote):

    x_hat = x / max(||x||, 1e-12)              every feature row, in float32
    sim   = x_hat_test @ x_hat_train^T         cosine similarity, (N_test, N_train)
    NN(t) = the k training rows with the largest sim (ties: argpartition's order)
    pred  = the label with the most votes among NN(t), one vote per neighbour;
            a tied vote goes to the tied label whose nearest member is nearest

(a vote of rank r, nearest first, weighs ``1 + 1e-6 (k - r)``: the bonus,
smaller than 1 in total, only ever decides between equal counts). Its labels
may be any comparable values. ``raw_pixel_knn_accuracy`` applies it to
flattened pixels: on plain 8x8 digits it is about 98% correct, on cluttered
digits (``data_tools.clutter``) far less.

Everything is computed on the host (device arrays are copied there), in
chunks of ``chunk`` test rows, so memory is O(chunk * N_train) similarities.
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


# ---- the similarity-weighted vote of InstDisc / PIC --------------------------

def weighted_knn_predict(bank, bank_labels, queries, ks=(20, 200), temperature=0.07,
                         num_classes=None, chunk=1024):
    """Class predictions of the weighted cosine kNN, one array per k.

    bank (N, ...) features with labels bank_labels (N,) int in [0, C);
    queries (M, ...) features of the same size D per row (rows are flattened).
    ks: one k or a sequence of them, each in [1, N]; temperature T > 0;
    num_classes C (default: max(bank_labels) + 1); chunk >= 1 queries per
    similarity block. Returns {k: pred int64 (M,)} in the order of ks.

    For each query q (the rule of InstDisc, Wu et al. 2018, used by PIC):

        x_hat    = x / max(||x||, 1e-12)              every bank and query row
        s_j      = <q_hat, b_hat_j>                   cosine similarity, (N,)
        NN_k(q)  = the k indices j with the largest s_j (ties: lower j first)
        score_c  = sum_{j in NN_k(q), y_j = c} exp(s_j / T)
        pred     = argmax_c score_c                   (ties: the lower class)

    Arithmetic: similarities in float64 when bank or queries are float64,
    else in float32 (ints and uint8 pixels included); weights and class
    scores always in float64 (exp(1 / T) must fit: T >= 1/700). All ks come
    from one ordered top-max(ks) selection per query, so k = 20 and 200 cost
    one similarity block. Memory: O(chunk * N): the similarities, one
    partitioned copy of them and two bool masks, plus chunk * C scores;
    device arrays are copied to the host first.
    """
    ks, temperature = _check_ks(ks), _check_temperature(temperature)
    chunk = check_int("chunk", chunk)
    xb, xq = _feature_rows("bank", bank), _feature_rows("queries", queries)
    yb = _class_labels("bank_labels", bank_labels, len(xb))
    if xb.shape[1] != xq.shape[1]:
        raise ValueError(f"bank and queries differ in size: {xb.shape[1]} vs "
                         f"{xq.shape[1]} values per row")
    if max(ks) > len(xb):
        raise ValueError(f"k = {max(ks)} needs at least {max(ks)} bank rows, the bank has "
                         f"{len(xb)}")
    if num_classes is None:
        num_classes = int(yb.max()) + 1
    num_classes = check_int("num_classes", num_classes)
    if yb.max() >= num_classes:
        raise ValueError(f"bank_labels must lie in [0, {num_classes}), got a {int(yb.max())}")
    dtype = np.result_type(xb.dtype, xq.dtype)                # float32 or float64
    xb, xq = _unit(xb.astype(dtype, copy=False)), _unit(xq.astype(dtype, copy=False))
    preds = {k: np.empty(len(xq), dtype=np.int64) for k in ks}
    order = sorted(ks)
    for s in range(0, len(xq), chunk):
        sim = xq[s:s + chunk] @ xb.T                          # (c, N)
        nn = _ordered_top(sim, order[-1])                     # (c, kmax) nearest first
        c = len(nn)
        w = np.exp(np.take_along_axis(sim, nn, axis=1).astype(np.float64)
                   / temperature)                             # (c, kmax) float64 weights
        cell = np.arange(c)[:, None] * num_classes + yb[nn]   # (c, kmax) flat (row, class)
        scores = np.zeros(c * num_classes)                    # (c * C,)
        done = 0
        for k in order:
            # the votes of ranks [done, k) added to those of the smaller k's
            scores += np.bincount(cell[:, done:k].ravel(), weights=w[:, done:k].ravel(),
                                  minlength=c * num_classes)
            done = k
            # argmax returns the first maximum: ties go to the lower class
            preds[k][s:s + c] = np.argmax(scores.reshape(c, num_classes), axis=1)
    return {k: preds[k] for k in ks}


def weighted_knn_accuracy(bank, bank_labels, queries, query_labels, ks=(20, 200),
                          temperature=0.07, num_classes=None, chunk=1024):
    """{k: top-1 accuracy in [0, 1]} of ``weighted_knn_predict``'s predictions.

    query_labels (M,): int class ids; every one must be known (>= 0): select
    the labeled rows first. Other arguments as ``weighted_knn_predict``.
    """
    yq = _class_labels("query_labels", query_labels, None)
    preds = weighted_knn_predict(bank, bank_labels, queries, ks, temperature, num_classes,
                                 chunk)
    some = next(iter(preds.values()))
    if len(some) != len(yq):
        raise ValueError(f"queries: {len(some)} rows but query_labels shaped {yq.shape}")
    return {k: float(np.mean(p == yq)) for k, p in preds.items()}


def raw_pixel_weighted_knn_accuracy(train, test, ks=(20, 200), temperature=0.07,
                                    num_classes=None, chunk=1024):
    """``weighted_knn_accuracy`` on raw pixels: each image flattened is its feature.

    train (the bank), test (the queries): (images (N, ...), labels (N,)) or a
    dataset with ``read()`` and ``labels``. Pixels are used as they are
    (uint8 -> float32, no mean subtraction), as in ``raw_pixel_knn_accuracy``.
    """
    (xtr, ytr), (xte, yte) = _images_and_labels(train), _images_and_labels(test)
    return weighted_knn_accuracy(xtr, ytr, xte, yte, ks, temperature, num_classes, chunk)


def _ordered_top(sim, k):
    """sim (c, N) -> (c, k) indices of each row's k largest, exact ties.

    Order: similarity descending, then index ascending. The threshold v is
    the k-th largest value (``np.partition``, O(N) per row); every entry above
    v is in, and the remaining places go to the entries equal to v in index
    order, so ties at the threshold are decided like a stable full sort.
    """
    c, N = sim.shape
    v = np.partition(sim, N - k, axis=1)[:, N - k:N - k + 1]  # (c, 1) k-th largest
    keep = sim > v                                            # (c, N) surely in
    equal = sim == v                                          # (c, N) in, if there is room
    room = k - keep.sum(axis=1)                               # (c,) >= 1
    crowded = np.nonzero(equal.sum(axis=1) > room)[0]         # rows with too many ties
    if crowded.size:
        rank = np.cumsum(equal[crowded], axis=1)              # (e, N) 1, 2, ... over ties
        equal[crowded] &= rank <= room[crowded, None]         # the lowest indices win
    idx = np.nonzero(keep | equal)[1].reshape(c, k)           # (c, k) index ascending
    # a stable sort by similarity keeps equal similarities in index order
    order = np.argsort(-np.take_along_axis(sim, idx, axis=1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)             # (c, k) nearest first


def _feature_rows(name, x):
    """Host (n, D) rows of x (n, ...): float64 stays float64, all else float32."""
    x = to_numpy(x)
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{name}: needs at least one row, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name}: features must be real numbers, got {x.dtype}")
    x = x.reshape(len(x), -1)                                 # (n, D)
    x = x if x.dtype == np.float64 else x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: features contain NaN or infinity")
    return x


def _unit(x):
    """(n, D) -> rows divided by max(||row||, 1e-12), dtype kept (a zero row stays 0)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _class_labels(name, y, n):
    """int64 (n,) class ids >= 0 (n=None: any length), else ValueError."""
    y = to_numpy(y)
    if y.ndim != 1 or (n is not None and y.shape[0] != n):
        raise ValueError(f"{name}: expected shape ({n if n is not None else 'n'},), "
                         f"got {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name}: class ids must be integers, got {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"{name}: {int(np.sum(y < 0))} labels are unknown (< 0); unknown "
                         f"labels cannot vote or be scored: select the labeled rows first")
    return y


def _check_ks(ks):
    """A non-empty tuple of distinct positive ints (a single int allowed)."""
    ks = (ks,) if np.ndim(ks) == 0 else tuple(ks)
    if not ks:
        raise ValueError("ks must name at least one k")
    ks = tuple(check_int("k", k) for k in ks)
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks must be distinct, got {ks}")
    return ks


def _check_temperature(t):
    """A float T with 1/700 <= T < inf: exp(s / T) for |s| <= 1 fits a float64."""
    try:
        t = float(t)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a positive number, got {t!r}") from None
    if not (np.isfinite(t) and t >= 1 / 700):
        raise ValueError(f"temperature must be finite and >= 1/700 (exp(1/T) must fit a "
                         f"float64), got {t!r}")
    return t
