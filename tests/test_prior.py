"""The contrastive prior in one process: batches, in-place rows, the reference, errors.

The P-rank prior against one process is tests/test_prior_mpi.py; the dense
reference ``dense_prior`` lives in tests/prior_worker.py (shared by both).
"""
import numpy as np
import pytest
from prior_worker import dense_prior, tiny_net

from refimpl.data.synthetic import SyntheticDataset
from refimpl.method.prior import contrastive_prior, prior_batches, prior_summary
from refimpl.optim.sgd import SGD
from refimpl.parallel import CosineClassifier, SelfComm
from tolerances import LAYER64

N, D, B, SIZE = 37, 8, 12, 8


@pytest.mark.parametrize("n, batch, P", [(37, 12, 1), (37, 12, 4), (36, 12, 3), (5, 12, 3),
                                         (1, 4, 2), (100, 8, 8)])
def test_batches_write_every_id_exactly_once(n, batch, P):
    batches = prior_batches(n, batch, P, seed=1)
    assert len(batches) == -(-n // batch)
    ids = np.concatenate([i for i, _ in batches])
    write = np.concatenate([w for _, w in batches])
    assert all(i.shape == w.shape == (batch,) and i.dtype == np.int64 and w.dtype == bool
               for i, w in batches)
    # Written: a permutation of 0..n-1, in the first n slots; the padding
    # after it repeats the start of the order (several times when n < B).
    assert np.array_equal(np.sort(ids[write]), np.arange(n))
    assert np.array_equal(write, np.arange(ids.size) < n)
    assert np.array_equal(ids[n:], ids[np.arange(n, ids.size) % n])
    # The same batches for every world size that divides B.
    for p in (1, 2, 4):
        if batch % p == 0:
            other = prior_batches(n, batch, p, seed=1)
            assert all(np.array_equal(a, c) and np.array_equal(b, d)
                       for (a, b), (c, d) in zip(batches, other))


def test_batch_order_is_random_and_seeded():
    a = np.concatenate([i for i, _ in prior_batches(50, 10, 1, seed=0)])
    assert not np.array_equal(a, np.arange(50))
    assert np.array_equal(a, np.concatenate([i for i, _ in prior_batches(50, 10, 2, seed=0)]))
    assert not np.array_equal(a, np.concatenate([i for i, _ in prior_batches(50, 10, 1, seed=1)]))


def test_batch_size_not_divisible_by_world_size_is_an_error():
    with pytest.raises(ValueError, match="batch size 12 is not divisible by world size 5"):
        prior_batches(37, 12, 5)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        prior_batches(37, 0, 1)


def setup(seed=0, n=N):
    """A tiny float64 net, a classifier of n rows with an SGD on a view of it, a dataset."""
    comm = SelfComm()
    net = tiny_net(seed)
    clf = CosineClassifier(n, D, comm, dtype=np.float64, seed=0)
    return comm, net, clf, SyntheticDataset(n, size=SIZE)


def test_prior_writes_W_in_place_and_equals_the_dense_reference():
    comm, net, clf, dataset = setup()
    weight = clf.weight
    opt = SGD(clf.weight.ravel(), clf.grad.ravel(), lr=0.1, momentum=0.9)  # holds a view
    clf.grad[...] = np.random.default_rng(0).normal(size=clf.grad.shape)   # not to be touched
    grad0, params0 = clf.grad.copy(), net.store.data.copy()
    buffers0 = net.store.buffer_data.copy()
    done = []
    report = contrastive_prior(net, clf, dataset, comm, B, seed=2, progress=done.append)

    ref = dense_prior(tiny_net(), dataset, prior_batches(N, B, 1, seed=2), SIZE)
    assert clf.weight is weight and np.shares_memory(opt.params, clf.weight)
    # unit rows (absolute error = scaled) of a tiny net, batched two ways
    assert np.max(np.abs(opt.params.reshape(N, D) - ref)) <= LAYER64   # the optimizer sees it
    assert np.max(np.abs(np.linalg.norm(clf.weight, axis=1) - 1)) <= LAYER64  # (D + 3) u
    # No gradient, no parameter update; BN in train mode: running statistics moved.
    assert np.array_equal(net.store.data, params0)
    assert not np.any(net.store.grad) and np.array_equal(clf.grad, grad0)
    assert not np.allclose(net.store.buffer_data, buffers0)
    T = -(-N // B)
    assert all(int(net.store.buffers[n]) == T for n in net.store.counter_names())
    assert done == [12, 12, 12, 1] and sum(done) == N
    assert report["rows"] == N and report["batches"] == T and report["computed"] == T * B
    assert report["bytes_sent"] == report["bytes_received"] == N * D * 8
    assert comm.counters["all_to_all_v"] == {"calls": T, "sent": N * D * 8,
                                             "received": N * D * 8}
    assert report["seconds"] > 0 and "37 rows of W" in prior_summary(report)


def test_prior_equals_reference_with_grouped_bn_and_train_transform():
    """BN in groups (what P ranks with local BN compute) and the random transform."""
    comm, net, clf, dataset = setup()
    net.bn.groups = 3
    contrastive_prior(net, clf, dataset, comm, B, seed=4, transform="train")
    ref_net = tiny_net()
    ref_net.bn.groups = 3
    ref = dense_prior(ref_net, dataset, prior_batches(N, B, 1, seed=4), SIZE, "train", 4)
    assert np.max(np.abs(clf.weight - ref)) <= LAYER64
    assert np.array_equal(net.store.buffer_data, ref_net.store.buffer_data)  # same process
    # The eval transform gives other rows (the check can fail): other images, an O(1)
    # change of unit rows, far above rounding (1e-12).
    plain = dense_prior(tiny_net(), dataset, prior_batches(N, B, 1, seed=4), SIZE)
    assert np.max(np.abs(clf.weight - plain)) > 1e-3


def broken(kind):
    batches = [(i.copy(), w.copy()) for i, w in prior_batches(N, B, 1, seed=0)]
    doubled, missing = int(batches[-1][0][-1]), int(batches[0][0][2])
    if kind in ("doubled", "both"):
        batches[-1][1][-1] = True              # a padding entry written: its id twice
    if kind in ("missing", "both"):
        batches[0][1][2] = False               # its id never written
    return batches, doubled, missing


@pytest.mark.parametrize("kind", ["doubled", "missing", "both"])
def test_doubled_or_missing_row_is_an_error_naming_the_ids(kind):
    comm, net, clf, dataset = setup()
    batches, doubled, missing = broken(kind)
    with pytest.raises(ValueError, match="must be written exactly once") as e:
        contrastive_prior(net, clf, dataset, comm, batches=batches)
    msg = str(e.value)
    assert (f"1 row(s) written more than once (ids {doubled} x2)" in msg) == (kind != "missing")
    assert (f"1 row(s) never written (ids {missing})" in msg) == (kind != "doubled")


def test_many_missing_rows_are_counted_and_a_few_named():
    comm, net, clf, dataset = setup()
    batches = prior_batches(N, B, 1, seed=0)[:1]               # 12 of 37 rows written
    missing = np.setdiff1d(np.arange(N), batches[0][0])
    with pytest.raises(ValueError) as e:
        contrastive_prior(net, clf, dataset, comm, batches=batches)
    shown = ", ".join(str(i) for i in missing[:10])
    assert f"25 row(s) never written (ids {shown}, ...)" in str(e.value)


class TwoRanks:
    """Rank 0 of a pretend 2-rank world: enough to build its shard, and for the
    argument checks, which raise before any collective (but the classifier's
    agreement check: the pretend rank 1 brings what rank 0 brings)."""
    size, rank = 2, 0

    def all_gather(self, x):
        return np.concatenate([x, x])


def test_bad_arguments_are_clear_errors():
    comm, net, clf, dataset = setup()
    with pytest.raises(ValueError, match="the dataset has 36 instances but the classifier "
                                         "has N = 37 rows"):
        contrastive_prior(net, clf, SyntheticDataset(36, size=SIZE), comm, B)
    half = CosineClassifier(N, D, TwoRanks(), dtype=np.float64)
    with pytest.raises(ValueError, match="batch size 5 is not divisible by world size 2"):
        contrastive_prior(net, half, dataset, TwoRanks(), 5)
    with pytest.raises(ValueError, match="made for another communicator"):
        contrastive_prior(net, half, dataset, comm, B)
    with pytest.raises(ValueError, match="prior batch 0 has 5 entries, not divisible"):
        contrastive_prior(net, half, dataset, TwoRanks(),
                          batches=[(np.arange(5), np.ones(5, dtype=bool))])
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 37\)"):
        contrastive_prior(net, clf, dataset, comm, batches=[(np.array([0, 37]),
                                                             np.ones(2, dtype=bool))])
    with pytest.raises(ValueError, match="write must be a bool array"):
        contrastive_prior(net, clf, dataset, comm, batches=[(np.arange(2), np.ones(2))])
    with pytest.raises(ValueError, match="features have dim 8 but the classifier's rows "
                                         "have 4"):
        contrastive_prior(net, CosineClassifier(N, 4, comm), dataset, comm, B)
    with pytest.raises(ValueError, match="transform must be one of"):
        contrastive_prior(net, clf, dataset, comm, B, transform="random")
    with pytest.raises(ValueError, match="needs batch_size"):
        contrastive_prior(net, clf, dataset, comm)
    # None of these touched the network or the classifier.
    assert all(int(net.store.buffers[n]) == 0 for n in net.store.counter_names())
