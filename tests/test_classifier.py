"""The sharded cosine softmax (refimpl.parallel.classifier) in one process, on SelfComm.

``cosine_softmax_forward`` / ``_backward`` vs PyTorch autograd (one-hot and
smoothed targets) and vs centered finite differences; independence of the
block size and of the thread count; ``CosineClassifier``; its errors. The
P-rank checks (P = 1..4 under mpirun) live in test_parallel_mpi.py.
"""
import numpy as np
import pytest

from refimpl.oracle import check_tensor, numerical_grad
from refimpl.method.targets import target_entries
from refimpl.parallel import (CosineClassifier, SelfComm, cosine_softmax_backward,
                              cosine_softmax_forward)
from refimpl.parallel.sharding import init_shard
from parallel_problem import ALPHA, D, N, TAU, dense_target, make_problem, run, unit_rows
from tolerances import FD64, INDEPENDENT64, ROUNDINGS64, sum_bound


@pytest.mark.torch
@pytest.mark.parametrize("smoothed", [False, True], ids=["one_hot", "smoothed"])
def test_matches_pytorch(smoothed):
    """F.cross_entropy(F.normalize(z) @ F.normalize(W).T / tau, y), float64, block=5."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    z, labels, W, nb = make_problem(1)
    nb, alpha = (nb, ALPHA) if smoothed else (None, 0.0)
    loss, dz, dW, _ = run(z, labels, W, nb, alpha, block=5)
    tz, tW = torch.tensor(z, requires_grad=True), torch.tensor(W, requires_grad=True)
    y = torch.tensor(dense_target(labels, N, nb, alpha))
    tloss = F.cross_entropy(F.normalize(tz) @ F.normalize(tW).T / TAU, y)
    tloss.backward()
    check_tensor("loss", loss, tloss.detach().numpy(), INDEPENDENT64)
    check_tensor("dz", dz, tz.grad.numpy(), INDEPENDENT64)
    check_tensor("dW", dW, tW.grad.numpy(), INDEPENDENT64)
    assert loss.dtype == dz.dtype == dW.dtype == np.float64


def test_gradients_match_finite_differences():
    """dz and dW vs centered differences of the loss, smoothed targets, 3 blocks."""
    z, labels, W, nb = make_problem(2, n=7, d=4, b=5, k=2)
    W *= np.array([[0.3], [1], [2], [5], [1], [0.7], [3]])  # rows of different norms

    targets = target_entries(labels, 7, nb, ALPHA)

    def loss_of(z_, W_):
        return cosine_softmax_forward(z_, labels, W_, SelfComm(), 7, TAU, targets,
                                      block=3)[0]

    _, dz, dW, _ = run(z, labels, W, nb, ALPHA, block=3)
    check_tensor("dz", dz, numerical_grad(lambda z_: loss_of(z_, W), z.copy(), 1.0), FD64)
    check_tensor("dW", dW, numerical_grad(lambda W_: loss_of(z, W_), W.copy(), 1.0), FD64)


def test_block_size_invariance():
    """block = 1, 3, 37 (one block) and 4096 agree to rounding."""
    z, labels, W, nb = make_problem(3)
    ref = run(z, labels, W, nb, ALPHA, block=4096, topk=(1, 5))
    for block in (1, 3, 37):
        out = run(z, labels, W, nb, ALPHA, block=block, topk=(1, 5))
        for name, a, b in zip(("loss", "dz", "dW"), out[:3], ref[:3]):
            # sums over N = 37 classes in blocks: sum_bound(37, cond=10) = 8.2e-14
            check_tensor(f"{name} block={block}", a, b, 1e-13)
        assert out[3] == ref[3]


def test_threads_give_the_same_bits(threads):
    """2 threads give bitwise the results of 1 thread (blocks combined in order)."""
    z, labels, W, nb = make_problem(4)
    threads(1)  # whatever REFIMPL_NUM_THREADS says
    one = run(z, labels, W, nb, ALPHA, block=5, topk=(1, 5))
    threads(2)
    two = run(z, labels, W, nb, ALPHA, block=5, topk=(1, 5))
    for name, a, b in zip(("loss", "dz", "dW"), one[:3], two[:3]):  # same order on any split
        assert np.array_equal(a, b), f"{name} differs with 2 threads"
    assert one[3] == two[3]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("alpha", [0.0, ALPHA])
def test_reused_buffers_equal_the_readable_blocks(threads, monkeypatch, dtype, alpha):
    """The CPU path's per-thread block buffers give bitwise what the readable
    blocks (the GPU's path) give: loss, dz, dW, the logits and accuracy, with a
    ragged last block, a zero row (clamped norm), and 1 or 2 threads; a second
    call with another B reallocates them."""
    from refimpl.parallel import classifier
    z, labels, W, nb = make_problem(5, n=101, b=12)
    W[7] = 0.0
    z, W = z.astype(dtype), W.astype(dtype)
    for n_threads, b in ((1, 12), (2, 12), (2, 6)):
        threads(n_threads)
        out = {}
        for reuse in (False, True):
            monkeypatch.setattr(classifier, "REUSE_BUFFERS", reuse)
            out[reuse] = run(z[:b], labels[:b], W, nb, alpha, block=16, topk=(1, 5))
        for name, a, r in zip(("loss", "dz", "dW"), out[True][:3], out[False][:3]):
            assert np.array_equal(a, r), f"{name}: reused buffers differ ({n_threads} threads)"
        assert out[True][3] == out[False][3]


def test_classifier_object_equals_functional_and_writes_grad():
    """CosineClassifier = the functional pair; backward overwrites clf.grad."""
    z, labels, _, nb = make_problem(6)
    comm = SelfComm()
    clf = CosineClassifier(N, D, comm, tau=TAU, dtype=np.float64, block=5)
    grad = clf.grad
    targets = target_entries(labels, N, nb, ALPHA)
    loss, acc = clf.forward(z, labels, targets, topk=(1, 5))
    dz = clf.backward()
    ref_loss, ref_dz, ref_dW, ref_acc = run(z, labels, clf.weight, nb, ALPHA, block=5,
                                            topk=(1, 5))
    assert np.array_equal(loss, ref_loss) and acc == ref_acc
    assert np.array_equal(dz, ref_dz) and np.array_equal(clf.grad, ref_dW)
    assert clf.grad is grad and clf.cache is None  # the optimizer's view stays valid
    first = clf.grad.copy()
    clf.forward(z, labels, targets)
    clf.backward()
    np.testing.assert_array_equal(clf.grad, first)  # written, not accumulated (2x)
    assert np.abs(first).max() > 0


def test_classifier_write_rows_and_normalized_blocks():
    """write_rows writes W in place (the optimizer's view sees it); the blocks
    cover the shard in order, normalized, with global ids."""
    comm = SelfComm()
    clf = CosineClassifier(N, D, comm, dtype=np.float64, block=5)
    view = clf.weight.ravel()
    rows = np.random.default_rng(0).standard_normal((3, D))
    clf.write_rows(np.array([4, 0, 36]), rows)
    np.testing.assert_array_equal(clf.weight[[4, 0, 36]], rows)
    assert np.shares_memory(view, clf.weight) and view[4 * D] == rows[0, 0]
    blocks = list(clf.normalized_blocks())
    assert [(a, c) for a, c, _ in blocks] == [(a, min(a + 5, N)) for a in range(0, N, 5)]
    check_tensor("w_hat", np.concatenate([w for _, _, w in blocks]), unit_rows(clf.weight),
                 ROUNDINGS64)  # the same sum of 8 squares, a root and a division
    with pytest.raises(ValueError, match=r"owns rows \[0, 37\)"):
        clf.write_rows(np.array([37]), rows[:1])
    with pytest.raises(ValueError, match=r"rows must have shape \(2, 8\)"):
        clf.write_rows(np.array([1, 2]), rows)


def test_classifier_initial_weight():
    """The weight is init_shard's rows, float32 unless asked otherwise."""
    clf = CosineClassifier(N, D, SelfComm(), seed=2)
    assert (clf.lo, clf.hi) == (0, N) and clf.weight.dtype == np.float32
    np.testing.assert_array_equal(clf.weight, init_shard(N, D, 0, N, 2).astype(np.float32))
    assert clf.grad.shape == (N, D) and clf.grad.dtype == np.float32
    clf64 = CosineClassifier(N, D, SelfComm(), dtype=np.float64, seed=2)
    np.testing.assert_array_equal(clf64.weight, init_shard(N, D, 0, N, 2))


# ------------------------------------------------------------------ errors

def forward_with(problem, **changed):
    """cosine_softmax_forward of make_problem's (z, labels, W) on SelfComm, N
    classes, TAU, with some arguments changed."""
    z, labels, W, _ = problem
    args = dict(z=z, labels=labels, w=W, comm=SelfComm(), num_classes=N, tau=TAU)
    return cosine_softmax_forward(**{**args, **changed})


def test_bad_inputs_are_refused_naming_the_problem():
    """Labels out of range, of another shape or not integers, W of the wrong
    rows or D or dtype, a tau that is not > 0 and finite: ValueError naming it."""
    problem = make_problem(7)
    _, labels, W, _ = problem
    comm = SelfComm()

    def fwd(**changed):
        return forward_with(problem, **changed)

    for bad in (-1, N):
        lab = labels.copy()
        lab[4] = bad
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, {N}\)"):
            fwd(labels=lab)
    with pytest.raises(ValueError, match=r"labels must be integer instance ids of shape \(12,\)"):
        fwd(labels=labels[:11])
    with pytest.raises(ValueError, match="labels must be integer instance ids"):
        fwd(labels=labels + 0.5)  # float labels are not silently truncated
    with pytest.raises(ValueError, match=rf"owns rows \[0, {N}\).*must have {N} rows, got 36"):
        fwd(w=W[:36])
    with pytest.raises(ValueError, match="must share D"):
        fwd(w=W[:, :7])
    for tau in (0.0, -0.1, np.nan, np.inf):
        with pytest.raises(ValueError, match="tau must be > 0 and finite"):
            fwd(tau=tau)
    with pytest.raises(ValueError, match="tau must be > 0"):
        CosineClassifier(N, D, comm, tau=0.0)
    with pytest.raises(ValueError, match="z and w must have one dtype"):
        fwd(w=W.astype(np.float32))  # a float64 network with a float32 classifier


def test_bad_targets_are_refused_naming_the_problem():
    """Targets handed to the classifier are checked too: shape, range, label first, weights."""
    problem = make_problem(7)
    _, labels, _, nb = problem
    ids, wts = target_entries(labels, N, nb, ALPHA)
    bad_targets = [((ids[:-1], wts[:-1]), r"targets must be \(ids, weights\), both of shape"),
                   ((ids + N, wts), rf"target ids must be integer class ids in \[0, {N}\)"),
                   ((ids[:, ::-1], wts), r"target ids\[:, 0\] must be the labels"),
                   ((ids, 2 * wts), "rows summing to 1"),
                   ((ids, -wts), "non-negative")]
    for targets, msg in bad_targets:
        with pytest.raises(ValueError, match=msg):
            forward_with(problem, targets=targets)


def test_backward_refuses_a_bad_dout_or_dw_out_and_keeps_its_cache_usable():
    problem = make_problem(7)
    _, _, cache = forward_with(problem)
    with pytest.raises(ValueError, match="dw_out must be"):
        cosine_softmax_backward(1.0, cache, dw_out=np.empty((N, D + 1)))
    with pytest.raises(ValueError, match="dout must be a scalar"):
        cosine_softmax_backward(np.ones(2), cache)
    cosine_softmax_backward(1.0, cache)  # the failed calls left the cache usable


def test_backward_does_not_modify_its_cache_and_scales_with_dout():
    problem = make_problem(7)
    # Backward does not modify its cache: a second call gives the same bits.
    _, _, cache = forward_with(problem)
    E = cache["E"].copy()
    first = cosine_softmax_backward(1.0, cache)
    np.testing.assert_array_equal(cache["E"], E)
    for a, b in zip(first, cosine_softmax_backward(1.0, cache)):
        np.testing.assert_array_equal(a, b)
    # dout scales every gradient (the (dout, cache) contract of every backward).
    for a, b in zip(cosine_softmax_backward(2.5, cache), first):
        # 2.5 * dlogits rounds each term before the sums over N = 37 classes
        check_tensor("dout = 2.5", a, 2.5 * b, sum_bound(N, cond=6))
