"""refimpl.parallel in one process: everything the size-1 communicator can check.

- the sharded cosine softmax (``cosine_softmax_forward`` / ``_backward``) vs
  PyTorch autograd (one-hot and smoothed targets) and vs centered finite
  differences; independence of the block size and of the thread count;
  top-k accuracy (ties included) vs a brute-force count; its errors;
- ``shard_range``, ``init_shard`` (world-size invariant), ``CosineClassifier``;
- ``SelfComm``'s collectives and byte counters, ``detect_cuda_aware_mpi``,
  ``abort_on_error``, ``check_replicated`` / ``checksum``;
- ``train_step`` with ``SelfComm``, ``set_batchnorm_mode`` and the one-process
  stand-in for per-rank BatchNorm, ``net.bn.groups``;
- ``train.step.forward_backward`` / ``update``: what a trace needs, and errors.

The P-rank checks (P = 1..4 under mpirun) live in test_parallel_mpi.py.
"""
import io

import numpy as np
import pytest

from refimpl.oracle import check_tensor, numerical_grad
from refimpl.method.targets import target_entries
from refimpl.models import build_model
from refimpl.optim.sgd import SGD
from refimpl.oracle.dense import dense_cosine_softmax, label_ranks
from refimpl.parallel import (CosineClassifier, SelfComm, abort_on_error, check_replicated,
                              cosine_softmax_backward, cosine_softmax_forward,
                              detect_cuda_aware_mpi, set_batchnorm_mode, shard_owner,
                              shard_range)
from refimpl.parallel.data_parallel import checksum
from refimpl.parallel.sharding import INIT_BLOCK, init_shard
from refimpl.train.step import forward_backward, train_step, update
from tolerances import FD64, INDEPENDENT64, LAYER64, ROUNDINGS64, SHORT64, sum_bound

N, D, B, TAU, K, ALPHA = 37, 8, 12, 0.15, 3, 0.2


# ----------------------------------------------------------------- helpers

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


def reference_ranks(z, W, labels, tau=TAU):
    """(rank, naive rank) of each label on the dense logits.

    rank: the oracle's rule (ties: lower id first); naive = #{j: l_j > l_y}
    (the label first among ties), for a negative control.
    """
    L = (unit_rows(z) @ unit_rows(W).T) * (1.0 / tau)                    # (B, N)
    ly = L[np.arange(len(labels)), labels][:, None]
    return label_ranks(L, labels), (L > ly).sum(1)


def small_net(seed=0):
    """A tiny float64 ResNet-18 encoder + head (width 2, head 8 -> D)."""
    return build_model("resnet18", stem="cifar", width=2, head_hidden=8, dim=D,
                       dtype=np.float64, seed=seed)



# ------------------------------------------------- cosine softmax: values

def test_target_entries_match_dense_target():
    """target_entries' sparse (ids, weights) scatter to the hand-built dense y."""
    _, labels, _, nb = make_problem(0)
    for alpha, table in ((0.0, None), (0.0, nb), (ALPHA, nb), (0.5, nb[:, :1])):
        ids, wts = target_entries(labels, N, table, alpha)
        y = np.zeros((B, N))
        np.add.at(y, (np.arange(B)[:, None], ids), wts)
        check_tensor(f"y alpha={alpha}", y, dense_target(labels, N, table, alpha), ROUNDINGS64)
    assert ids.shape == (B, 2)  # the last case: K = 1
    assert target_entries(labels, N, nb, 0.0)[0].shape == (B, 1)  # alpha 0: one-hot
    with pytest.raises(ValueError, match="alpha = 0.2 smooths over the neighbour table"):
        target_entries(labels, N, None, ALPHA)


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


# ------------------------------------------------- cosine softmax: errors

def test_errors():
    """Bad inputs raise ValueError naming the problem; backward leaves its cache intact."""
    z, labels, W, nb = make_problem(7)
    comm = SelfComm()

    def fwd(**changed):
        args = dict(z=z, labels=labels, w=W, comm=comm, num_classes=N, tau=TAU)
        return cosine_softmax_forward(**{**args, **changed})

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
    for alpha in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\)"):
            target_entries(labels, N, nb, alpha)
    for table in (nb[:-1], nb[:, 0], nb[:, :0]):
        with pytest.raises(ValueError, match=rf"neighbours must have shape \({N}, K\)"):
            target_entries(labels, N, table, ALPHA)
    for value in (-1, N):  # a neighbour id that no shard owns
        table = nb.copy()
        table[labels[3], 1] = value
        with pytest.raises(ValueError, match=rf"neighbours must hold integer class ids in \[0, {N}\)"):
            target_entries(labels, N, table, ALPHA)
    table = nb.copy()
    table[labels[3], 0] = labels[3]
    with pytest.raises(ValueError, match="include the class itself"):
        target_entries(labels, N, table, ALPHA)
    # the batch's rows alone give the same entries as the table, and the same checks
    from refimpl.method.targets import entries_from_rows
    for a, b in zip(entries_from_rows(labels, N, nb[labels], ALPHA), target_entries(labels, N, nb, ALPHA)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=rf"neighbour rows must have shape \({labels.size}, K\)"):
        entries_from_rows(labels, N, nb[labels][:-1], ALPHA)
    with pytest.raises(ValueError, match="include the class itself"):
        entries_from_rows(labels, N, table[labels], ALPHA)
    from refimpl.oracle.replay import targets_from_rows
    from refimpl.oracle.trace import TraceError
    twice = np.concatenate([labels[:2], labels[:1]])       # id labels[0] twice
    rows = nb[twice]
    np.testing.assert_array_equal(targets_from_rows(twice, rows, N, ALPHA)[0][:, 1:], rows)
    rows[2] = nb[labels[1]]                                  # ... with another row the second time
    with pytest.raises(TraceError, match="neighbour rows differ for one id that appears twice"):
        targets_from_rows(twice, rows, N, ALPHA)
    # Targets handed to the classifier are checked too: shape, range, label first, weights.
    ids, wts = target_entries(labels, N, nb, ALPHA)
    bad_targets = [((ids[:-1], wts[:-1]), r"targets must be \(ids, weights\), both of shape"),
                   ((ids + N, wts), rf"target ids must be integer class ids in \[0, {N}\)"),
                   ((ids[:, ::-1], wts), r"target ids\[:, 0\] must be the labels"),
                   ((ids, 2 * wts), "rows summing to 1"),
                   ((ids, -wts), "non-negative")]
    for targets, msg in bad_targets:
        with pytest.raises(ValueError, match=msg):
            fwd(targets=targets)
    _, _, cache = fwd()
    with pytest.raises(ValueError, match="dw_out must be"):
        cosine_softmax_backward(1.0, cache, dw_out=np.empty((N, D + 1)))
    with pytest.raises(ValueError, match="dout must be a scalar"):
        cosine_softmax_backward(np.ones(2), cache)
    cosine_softmax_backward(1.0, cache)  # the failed calls left the cache usable
    with pytest.raises(ValueError, match=r"every rank needs at least one row \(N >= P\)"):
        shard_range(3, 4, 0)
    for size, rank in ((0, 0), (3, 3), (3, -1)):
        with pytest.raises(ValueError, match="not in a world of size"):
            shard_range(10, size, rank)
    # Backward does not modify its cache: a second call gives the same bits.
    _, _, cache = fwd()
    E = cache["E"].copy()
    first = cosine_softmax_backward(1.0, cache)
    np.testing.assert_array_equal(cache["E"], E)
    for a, b in zip(first, cosine_softmax_backward(1.0, cache)):
        np.testing.assert_array_equal(a, b)
    # dout scales every gradient (the (dout, cache) contract of every backward).
    for a, b in zip(cosine_softmax_backward(2.5, cache), first):
        # 2.5 * dlogits rounds each term before the sums over N = 37 classes
        check_tensor("dout = 2.5", a, 2.5 * b, sum_bound(N, cond=6))


# ------------------------------------------------------ sharding and init

def test_shard_range_partitions_rows():
    """Contiguous, covering, balanced shards [floor(rN/P), floor((r+1)N/P))."""
    for n in range(1, 51):
        for p in range(1, min(n, 6) + 1):
            ranges = [shard_range(n, p, r) for r in range(p)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(ranges[r][1] == ranges[r + 1][0] for r in range(p - 1))
            sizes = [hi - lo for lo, hi in ranges]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
            assert ranges == [(r * n // p, (r + 1) * n // p) for r in range(p)]
    assert shard_range(37, 4, 3) == (27, 37)  # the MPI tests' uneven shards


def test_shard_owner_inverts_shard_range():
    """shard_owner(i) is the rank whose shard_range holds i, for every i, N, P."""
    for n in (1, 5, 37, 100):
        for p in range(1, min(n, 6) + 1):
            want = np.concatenate([np.full(hi - lo, r) for r, (lo, hi) in
                                   enumerate(shard_range(n, p, r) for r in range(p))])
            np.testing.assert_array_equal(shard_owner(np.arange(n), n, p), want)
    with pytest.raises(ValueError, match=r"row ids must lie in \[0, 37\)"):
        shard_owner(np.array([3, 37]), 37, 4)


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


def test_init_shard_is_world_size_invariant():
    """P = 3 shards concatenated = the P = 1 matrix, across INIT_BLOCK streams."""
    n, d = 2 * INIT_BLOCK + 8864, 2  # 140000 rows: three random streams
    full = init_shard(n, d, 0, n, seed=3)
    shards = [init_shard(n, d, *shard_range(n, 3, r), seed=3) for r in range(3)]
    np.testing.assert_array_equal(np.concatenate(shards), full)
    # Rank 1's rows start inside the first stream and end inside the second.
    assert shard_range(n, 3, 1)[0] < INIT_BLOCK < shard_range(n, 3, 1)[1]
    bound = 1 / np.sqrt(d)
    assert np.abs(full).max() <= bound and np.abs(full).max() > 0.99 * bound
    assert not np.array_equal(full[:100], full[INIT_BLOCK:INIT_BLOCK + 100])  # own streams
    assert not np.array_equal(init_shard(n, d, 0, 100, seed=4), full[:100])
    assert init_shard(n, d, 5, 5).shape == (0, d)


def test_classifier_initial_weight():
    """The weight is init_shard's rows, float32 unless asked otherwise."""
    clf = CosineClassifier(N, D, SelfComm(), seed=2)
    assert (clf.lo, clf.hi) == (0, N) and clf.weight.dtype == np.float32
    np.testing.assert_array_equal(clf.weight, init_shard(N, D, 0, N, 2).astype(np.float32))
    assert clf.grad.shape == (N, D) and clf.grad.dtype == np.float32
    clf64 = CosineClassifier(N, D, SelfComm(), dtype=np.float64, seed=2)
    np.testing.assert_array_equal(clf64.weight, init_shard(N, D, 0, N, 2))


# --------------------------------------------------------------- SelfComm

class DoublingComm(SelfComm):
    """SelfComm whose sum all-reduce doubles, as if a second rank held the same
    values: makes the write-back of an in-place all-reduce visible."""

    def _allreduce(self, send, recv, op):
        recv[...] = (recv if send is None else send) * (2 if op == "sum" else 1)


def test_selfcomm_collectives_copy_and_count():
    """Size-1 collectives return copies and count the bytes exactly."""
    comm = SelfComm()
    x = np.arange(12.0).reshape(3, 4)
    x0 = x.copy()
    for name, out in (("all_gather", comm.all_gather(x)),
                      ("reduce_scatter", comm.reduce_scatter(x)),
                      ("all_reduce_sum", comm.all_reduce(x, "sum")),
                      ("all_reduce_max", comm.all_reduce(x, "max"))):
        np.testing.assert_array_equal(out, x0)
        assert out.dtype == x.dtype and not np.shares_memory(out, x), name
        out += 100  # the result is the caller's: the input does not change
        np.testing.assert_array_equal(x, x0)
        assert comm.counters[name] == {"calls": 1, "sent": 96, "received": 96}, name
    assert comm.bcast(x) is x
    np.testing.assert_array_equal(x, x0)
    assert comm.counters["bcast"] == {"calls": 1, "sent": 96, "received": 0}
    assert comm.bytes_sent() == 5 * 96 and comm.bytes_received() == 4 * 96
    comm.all_gather(x[:, ::2].T)  # non-contiguous input, (2, 3)
    assert comm.counters["all_gather"] == {"calls": 2, "sent": 96 + 48, "received": 96 + 48}
    comm.reset_counters()
    assert comm.counters == {} and comm.bytes_sent() == 0 and comm.bytes_received() == 0


def test_selfcomm_errors():
    """Unknown op, a missing root and a scalar gather raise, counting nothing."""
    comm = SelfComm()
    with pytest.raises(ValueError, match=r"op must be one of \('sum', 'max'\), got 'min'"):
        comm.all_reduce(np.ones(3), "min")
    with pytest.raises(ValueError, match="root 1 does not exist"):
        comm.bcast(np.ones(3), root=1)
    with pytest.raises(ValueError, match="leading row axis"):
        comm.all_gather(np.array(1.0))
    assert comm.counters == {}


@pytest.mark.parametrize("comm_cls", [SelfComm, DoublingComm])
def test_all_reduce_in_place_on_a_view(comm_cls):
    """inplace=True on a strided view writes the result back into the view."""
    comm = comm_cls()
    factor = 2 if comm_cls is DoublingComm else 1
    buf = np.arange(10.0)
    view = buf[::2]
    assert not view.flags.c_contiguous
    assert comm.all_reduce(view, "sum", inplace=True) is view
    np.testing.assert_array_equal(buf[::2], factor * np.arange(0.0, 10, 2))
    np.testing.assert_array_equal(buf[1::2], np.arange(1.0, 10, 2))  # untouched
    assert comm.counters["all_reduce_sum"] == {"calls": 1, "sent": 40, "received": 40}
    flat = np.arange(4.0)
    assert comm.all_reduce(flat, inplace=True) is flat
    np.testing.assert_array_equal(flat, factor * np.arange(4.0))
    # Not in place: the input keeps its values whatever the result is.
    y = np.arange(3.0)
    np.testing.assert_array_equal(comm.all_reduce(y), factor * np.arange(3.0))
    np.testing.assert_array_equal(y, np.arange(3.0))


def test_detect_cuda_aware_mpi_env(monkeypatch):
    """REFIMPL_CUDA_AWARE_MPI=1/0 decides; any other value is an error."""
    monkeypatch.setenv("REFIMPL_CUDA_AWARE_MPI", "1")
    assert detect_cuda_aware_mpi() is True
    monkeypatch.setenv("REFIMPL_CUDA_AWARE_MPI", "0")
    assert detect_cuda_aware_mpi() is False
    for value in ("yes", "", "true", "2"):
        monkeypatch.setenv("REFIMPL_CUDA_AWARE_MPI", value)
        with pytest.raises(ValueError, match="REFIMPL_CUDA_AWARE_MPI must be 0 or 1"):
            detect_cuda_aware_mpi()


class AbortRecorder(SelfComm):
    """SelfComm that records its abort() calls."""

    def __init__(self):
        super().__init__()
        self.aborts = []

    def abort(self, code=1):
        self.aborts.append(code)


def test_abort_on_error_reports_and_propagates():
    """The rank's message and traceback go to the stream; the error propagates."""
    comm, stream = AbortRecorder(), io.StringIO()
    err = RuntimeError("rank work failed on purpose")
    with pytest.raises(RuntimeError) as info:
        with abort_on_error(comm, stream=stream):
            raise err
    assert info.value is err and comm.aborts == [1]
    text = stream.getvalue()
    assert text.startswith("refimpl: rank 0/1 failed:\nTraceback (most recent call last):")
    assert "RuntimeError: rank work failed on purpose" in text
    # Plain SelfComm: abort is a no-op and the exception still propagates.
    with pytest.raises(KeyError, match="x"):
        with abort_on_error(SelfComm(), stream=io.StringIO()):
            raise KeyError("x")


def test_abort_on_error_exits_and_passthrough():
    """No error: nothing printed, no abort. Any sys.exit (0 included) inside ends
    the job (the other ranks may wait in a collective). A passthrough type
    (an error every rank raises together) propagates without an abort."""
    comm = AbortRecorder()
    stream = io.StringIO()
    with abort_on_error(comm, stream=stream):
        pass
    assert stream.getvalue() == "" and comm.aborts == []
    for code in (0, None, 3):
        stream = io.StringIO()
        with pytest.raises(SystemExit) as info:
            with abort_on_error(comm, stream=stream):
                raise SystemExit(code)
        assert info.value.code == code
        assert f"rank 0/1 left early (sys.exit({code!r}))" in stream.getvalue()
    assert comm.aborts == [1, 1, 1]
    stream = io.StringIO()
    with pytest.raises(KeyError):
        with abort_on_error(comm, stream=stream, passthrough=(KeyError,)):
            raise KeyError("every rank")
    assert stream.getvalue() == "" and comm.aborts == [1, 1, 1]


class StaleRank1(SelfComm):
    """all_gather as if a rank 1 held different bytes for the second array."""

    def all_gather(self, x):
        table = np.concatenate([x, x])
        table[1, 1] += 1
        return table


def test_check_replicated_and_checksum():
    """Equal replicas pass; one changed bit changes the CRC; a stale rank is named."""
    a = np.arange(5.0)
    assert check_replicated(SelfComm(), {"a": a, "b": np.ones((2, 3))}) is None
    c = checksum(a)
    assert checksum(a.copy()) == c
    b = a.copy()
    b[3] = np.nextafter(b[3], 10)  # one bit of one element
    assert checksum(b) != c
    m = np.arange(12.0).reshape(3, 4)
    assert checksum(m[:, ::2]) == checksum(np.ascontiguousarray(m[:, ::2]))
    with pytest.raises(RuntimeError, match=r"differ between ranks: b \(ranks \[1\] differ"):
        check_replicated(StaleRank1(), {"a": a, "b": b})


# ------------------------------------------------------------- train_step

def make_step(seed=0):
    """(net, clf, net_opt, clf_opt, x, labels) of a small float64 step."""
    net = small_net()
    clf = CosineClassifier(N, D, SelfComm(), dtype=np.float64)
    net_opt = SGD(net.store.data, net.store.grad, lr=0.1, momentum=0.9)
    clf_opt = SGD(clf.weight.ravel(), clf.grad.ravel(), lr=0.1, momentum=0.9)
    r = np.random.default_rng(seed)
    return net, clf, net_opt, clf_opt, r.standard_normal((B, 3, 8, 8)), r.permutation(N)[:B]


def test_train_step_updates_parameters():
    """One SelfComm step = the layers by hand, then p -= lr * grad."""
    net, clf, net_opt, clf_opt, x, labels = make_step()
    nb = make_problem(0)[3]
    p0, w0 = net.store.data.copy(), clf.weight.copy()
    targets = target_entries(labels, N, nb, ALPHA)
    loss, acc = train_step(net, clf, x, labels, SelfComm(), net_opt, clf_opt,
                           targets=targets, topk=(1,))
    assert type(loss) is float and np.isfinite(loss) and set(acc) == {1}
    # The same step by hand: network forward, classifier, network backward.
    ref = small_net()
    z_loss, _, cache = cosine_softmax_forward(ref.forward(x, train=True), labels, w0,
                                              SelfComm(), N, TAU, targets)
    dz, dW = cosine_softmax_backward(1.0, cache)
    ref.backward(dz)
    # the same functions in one process (measured 0); sum_bound(37, cond=10) = 8.2e-14
    # allows another blocking of the classes
    check_tensor("loss", loss, z_loss, 1e-13)
    check_tensor("net grad", net.store.grad, ref.store.grad, 1e-13)
    check_tensor("classifier grad", clf.grad, dW, 1e-13)
    assert np.abs(ref.store.grad).max() > 0 and np.abs(dW).max() > 0
    # First momentum step: p -= lr * grad (two roundings).
    check_tensor("params", net.store.data, p0 - 0.1 * net.store.grad, ROUNDINGS64)
    check_tensor("classifier", clf.weight, w0 - 0.1 * clf.grad, ROUNDINGS64)
    assert not np.array_equal(net.store.data, p0) and not np.array_equal(clf.weight, w0)


def test_train_step_nan_raises_before_any_update():
    """A NaN loss raises FloatingPointError naming the step; nothing is updated,
    and the BatchNorm running statistics and counters are put back."""
    net, clf, net_opt, clf_opt, x, labels = make_step()
    train_step(net, clf, x, labels, SelfComm(), net_opt, clf_opt)  # momentum is non-zero
    p0, w0 = net.store.data.copy(), clf.weight.copy()
    buffers0 = {n: np.array(v, copy=True) for n, v in net.store.buffers.items()}
    x[5, 1, 2, 3] = np.nan
    with pytest.raises(FloatingPointError, match="the loss is nan at step 7; no parameter"):
        train_step(net, clf, x, labels, SelfComm(), net_opt, clf_opt, step=7)
    np.testing.assert_array_equal(net.store.data, p0)
    np.testing.assert_array_equal(clf.weight, w0)
    for n, v in buffers0.items():
        np.testing.assert_array_equal(net.store.buffers[n], v, err_msg=n)
    assert clf.cache is None  # the exp buffer E is not kept alive by the failed step


def test_forward_backward_returns_what_a_trace_needs():
    """z, dz, the per-row log-sum-exp and the gradients, before any weight moves;
    update() then moves them; a bad learning rate is refused before anything moves."""
    net, clf, net_opt, clf_opt, x, labels = make_step()
    p0, w0 = net.store.data.copy(), clf.weight.copy()
    out = forward_backward(net, clf, x, labels, SelfComm(), topk=(1, 5))
    np.testing.assert_array_equal(net.store.data, p0)
    np.testing.assert_array_equal(clf.weight, w0)
    ref = small_net()
    z = ref.forward(x, train=True)
    check_tensor("z", out.z, z, SHORT64)  # the same forward in one process (measured 0)
    loss, dz, dW, acc = dense_cosine_softmax(z, labels, w0, TAU, topk=(1, 5))
    check_tensor("loss", out.loss, loss, 1e-13)  # 37 classes: sum_bound(37, cond=10) = 8.2e-14
    check_tensor("dz", out.dz, dz, LAYER64)
    check_tensor("classifier grad", clf.grad, dW, LAYER64)
    assert out.acc == acc
    L = unit_rows(z) @ unit_rows(w0).T / TAU
    lse = np.log(np.exp(L - L.max(1, keepdims=True)).sum(1)) + L.max(1)
    check_tensor("logsumexp", out.logsumexp, lse, SHORT64)  # logits of 8 terms, 37 exps
    for bad in (float("nan"), -0.1, float("inf")):
        with pytest.raises(ValueError, match="learning rate must be finite and >= 0"):
            update(net, SelfComm(), net_opt, clf_opt, lr=bad)
    np.testing.assert_array_equal(net.store.data, p0)
    update(net, SelfComm(), net_opt, clf_opt, lr=0.1)
    check_tensor("params", net.store.data, p0 - 0.1 * net.store.grad, ROUNDINGS64)


def test_set_batchnorm_mode():
    """'sync' installs a sum all-reduce hook in encoder and head; 'local' removes it."""
    net, comm = small_net(), SelfComm()
    with pytest.raises(ValueError, match=r"bn mode must be one of \('local', 'sync'\)"):
        set_batchnorm_mode(net, comm, "bogus")
    assert net.bn.allreduce is None
    # One setting: every BatchNorm of encoder and head holds the network's object.
    assert net.head.bn.mode is net.bn and net.encoder.bn1.mode is net.bn
    assert all(bn.mode is net.bn for b in net.encoder.blocks for _, bn in b.layers)
    set_batchnorm_mode(net, comm, "sync")
    assert callable(net.bn.allreduce)
    v = np.arange(3.0)
    np.testing.assert_array_equal(net.bn.allreduce(v), v)  # the sum over 1 rank
    assert comm.counters["all_reduce_sum"]["calls"] == 1
    set_batchnorm_mode(net, comm, "local")
    assert net.bn.allreduce is None


def test_sync_bn_step_equals_local_bn_step_on_one_rank():
    """On one rank synchronized BN is plain BN (one-pass variance: to rounding)."""
    losses, params = [], []
    for mode in ("local", "sync"):
        net, clf, net_opt, clf_opt, x, labels = make_step()
        set_batchnorm_mode(net, clf.comm, mode)
        losses.append(train_step(net, clf, x, labels, clf.comm, net_opt, clf_opt)[0])
        params.append(net.store.data.copy())
    check_tensor("loss", losses[1], losses[0], LAYER64)
    check_tensor("params", params[1], params[0], LAYER64)


# -------------------------------------------------------------- bn_groups

def test_bn_groups_validation():
    """bn groups must be a positive integer dividing the batch, without sync BN."""
    net = small_net()
    for bad in (0, 1.5, -2, "abc", float("nan"), True):
        with pytest.raises(ValueError, match="bn groups must be a positive integer"):
            net.bn.groups = bad
    assert net.bn.groups == 1
    net.bn.groups = 3
    with pytest.raises(ValueError, match="a batch of 10 does not split into 3 equal groups"):
        net.forward(np.zeros((10, 3, 8, 8)), train=True)
    set_batchnorm_mode(net, SelfComm(), "sync")
    with pytest.raises(ValueError, match="cannot be combined"):
        net.forward(np.zeros((12, 3, 8, 8)), train=True)


def test_bn_groups_equal_separate_batches():
    """bn groups = 3 = three models on the three parts (local BN on 3 ranks)."""
    x = np.random.default_rng(8).standard_normal((B, 3, 8, 8))
    grouped = small_net()
    grouped.bn.groups = 3
    z = grouped.forward(x, train=True)
    parts = [small_net() for _ in range(3)]
    z_ref = np.concatenate([net.forward(x[4 * g:4 * g + 4], train=True)
                            for g, net in enumerate(parts)])
    check_tensor("z", z, z_ref, LAYER64)
    # The running statistics follow part 0 only (rank 0's, in a P-rank run): means over
    # <= 256 values per channel, reduced over another array shape.
    check_tensor("buffers", grouped.store.buffer_data, parts[0].store.buffer_data, LAYER64)
    # part 1's statistics are other numbers (O(1) apart), not a rounding away
    assert not np.allclose(parts[1].store.buffer_data, parts[0].store.buffer_data)
    # Negative control: the whole batch in one group gives another z (O(1), not 1e-12).
    assert np.abs(small_net().forward(x, train=True) - z).max() > 1e-3
