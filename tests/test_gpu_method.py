"""The method on the GPU against the CPU: the contrastive prior, the ring neighbour
search, the smoothed targets, augmentation, feature extraction with the kNN monitor,
the linear probe.

Every test is marked ``gpu`` and names the device under test as
``gpu_util.DEVICE`` (so ``benchmarks/gpu_check.sh --dry`` runs them on the CPU:
RUNS_DRY). The same inputs, built on the host, run once on the CPU and once on
the device; each result must stay on its device with its dtype and agree with
the CPU's (``gpu_util.check_close``): float64 within INDEPENDENT64 (the same
equations, other kernels and summation orders), float32 within INDEPENDENT32
for one evaluation, or through a whole network as close to the float64 truth
as the CPU's float32 is. Integer results (neighbour tables, targets, kNN
predictions) are compared exactly, on data whose ties are exact.

The P = 2 cases run ``tests/gpu_worker.py`` under mpirun: both ranks share
the one GPU of the check's machine (each rank takes the GPU of its
node-local rank, modulo the number of GPUs).
"""
import numpy as np
import pytest

from refimpl.backend import to_numpy
from refimpl.data.augment import AugmentConfig, augment_batch, eval_transform
from refimpl.data.synthetic import SyntheticDataset
from refimpl.evaluate.knn import weighted_knn_predict
from refimpl.method.neighbours import dense_hardest_neighbours, hardest_neighbours
from refimpl.method.targets import target_entries
from refimpl.parallel import CosineClassifier, SelfComm, cosine_softmax_backward, \
    cosine_softmax_forward

import gpu_worker as W
from gpu_util import DEVICE, check_close, check_placed, on_device
from mpi_run import ROOT, run_ranks
from tolerances import INDEPENDENT32, INDEPENDENT64

pytestmark = pytest.mark.gpu
RUNS_DRY = True
DTYPES = pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
WORKER = ROOT / "tests" / "gpu_worker.py"


def on_two_ranks(task, tmp_path):
    """tests/gpu_worker.py TASK on 2 ranks sharing the device: rank 0's arrays."""
    out = tmp_path / f"{task}.npz"
    proc, _ = run_ranks(2, WORKER, task, DEVICE, out, timeout=300)
    assert proc.returncode == 0, f"mpirun -np 2 failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    with np.load(out) as z:
        assert int(z["size"]) == 2
        return {k: z[k] for k in z.files}


# ------------------------------------------------------------ the contrastive prior

@DTYPES
@pytest.mark.parametrize("transform", ["eval", "train"])
def test_prior_rows_match_cpu(dtype, transform):
    """W's rows after the prior (BN in train mode, the eval transform or epoch 0's
    augmentation on the device), the BN running statistics, the routed bytes."""
    comm = SelfComm()
    dev = W.prior_result(comm, DEVICE, dtype, transform=transform)
    cpu = W.prior_result(comm, "cpu", dtype, transform=transform)
    truth = W.prior_result(comm, "cpu", np.float64, transform=transform) \
        if dtype == np.float32 else {"W": None, "buffers": None}
    for key in ("W", "buffers"):
        assert dev[key].dtype == dtype
        check_close(f"prior {transform} {key}", dev[key], cpu[key], dtype, truth[key])
    np.testing.assert_array_equal(dev["bytes"], cpu["bytes"])
    norms = np.linalg.norm(dev["W"].astype(np.float64), axis=1)
    np.testing.assert_allclose(norms, 1, atol=10 * np.finfo(dtype).eps)  # every row written


def test_prior_on_the_device_writes_its_weight_in_place():
    """The optimizer's view of W sees the prior's rows (write_rows keeps the array)."""
    net = W.tiny_net(DEVICE)
    clf = CosineClassifier(W.N_PRIOR, W.D, SelfComm(), dtype=np.float64, device=DEVICE)
    view = clf.weight.ravel()
    before = to_numpy(view).copy()
    from refimpl.method.prior import contrastive_prior
    contrastive_prior(net, clf, SyntheticDataset(W.N_PRIOR, size=W.SIZE), SelfComm(), W.B)
    check_placed("W", clf.weight, np.float64)
    assert not np.array_equal(to_numpy(view), before)
    np.testing.assert_array_equal(to_numpy(view), to_numpy(clf.weight).ravel())


@pytest.mark.mpi
def test_prior_on_two_ranks_sharing_the_device_matches_one_cpu_process(tmp_path):
    """Sync BN, float64: 2 ranks on the device = 1 CPU process (P ranks = 1 rank)."""
    got = on_two_ranks("prior", tmp_path)
    want = W.prior_result(SelfComm(), "cpu")
    check_close("prior P=2 W", got["W"], want["W"], np.float64)
    check_close("prior P=2 buffers", got["buffers"], want["buffers"], np.float64)


# ------------------------------------------------------------ neighbours and targets

def test_ring_on_the_device_equals_the_dense_table_with_ties():
    """Exactly tied cosines (duplicated rows, multiples of 1/16): the device's table is
    the dense one, ties to the lower id, for both precisions, both top-K paths (on the
    device, and the host one with device similarities), default and small tiles."""
    rows = W.tie_rows()
    want = dense_hardest_neighbours(rows, W.K)
    got = W.neighbour_tables(SelfComm(), DEVICE, rows)
    for name, table in got.items():
        assert isinstance(table, np.ndarray) and table.dtype == np.int64, name
        np.testing.assert_array_equal(table, want, err_msg=name)
    for dtype in (np.float64, np.float32):
        clf = CosineClassifier(len(rows), rows.shape[1], SelfComm(), dtype=dtype, device=DEVICE)
        clf.weight[...] = on_device(rows, dtype)
        for topk_on_device in (True, False):
            np.testing.assert_array_equal(
                hardest_neighbours(clf, SelfComm(), W.K, 16, 24, device_topk=topk_on_device),
                want)
    assert want[0, 0] == 1 and want[1, 0] == 0  # the twins tie at cosine 1: the ids decide


def test_ring_on_the_device_random_rows_pick_the_cpus_similarities():
    """Random float32 rows (no exact ties): the device's GEMM rounds otherwise than
    the CPU's, so near-ties may swap; the similarities it picks, row by row, are the
    dense table's to float32 rounding."""
    g = np.random.default_rng(1)
    rows = g.standard_normal((3000, 32)).astype(np.float32)
    clf = CosineClassifier(3000, 32, SelfComm(), dtype=np.float32, device=DEVICE)
    clf.weight[...] = on_device(rows)
    got = hardest_neighbours(clf, SelfComm(), 7, 1024, 2048)
    want = dense_hardest_neighbours(rows, 7)
    unit = rows.astype(np.float64) / np.linalg.norm(rows.astype(np.float64), axis=1,
                                                    keepdims=True)

    def sims(table):
        return np.einsum("nd,nkd->nk", unit, unit[table])
    np.testing.assert_allclose(sims(got), sims(want), rtol=0, atol=1e-6)
    assert np.mean(np.all(got == want, axis=1)) > 0.99
    assert not np.any(got == np.arange(3000)[:, None])


@pytest.mark.mpi
def test_ring_on_two_ranks_sharing_the_device_equals_the_dense_table(tmp_path):
    """P = 2 (uneven shards of 30 and 31 rows), one ring_shift through the device."""
    got = on_two_ranks("neighbours", tmp_path)
    want = dense_hardest_neighbours(W.tie_rows(), W.K)
    for name in ("float64_default", "float64_small", "float32_default", "float32_small"):
        np.testing.assert_array_equal(got[name], want, err_msg=name)


@DTYPES
def test_smoothed_targets_from_the_device_table_give_the_cpus_step(dtype):
    """The targets of a batch from the device's table (host arrays either way) and the
    classifier's loss and gradients with them, on the device against the CPU."""
    rows = W.tie_rows()
    N, D = rows.shape
    labels = np.random.default_rng(3).permutation(N)[:12]
    z = np.random.default_rng(4).standard_normal((12, D))
    res = {}
    for device in ("cpu", DEVICE):
        clf = CosineClassifier(N, D, SelfComm(), dtype=dtype, device=device)
        clf.weight[...] = on_device(rows, dtype, device)
        table = hardest_neighbours(clf, SelfComm(), W.K)
        targets = target_entries(labels, N, table, 0.2)
        loss, acc, cache = cosine_softmax_forward(on_device(z, dtype, device), labels,
                                                  clf.weight, SelfComm(), N, 0.15, targets,
                                                  topk=(1, 5))
        dz, dw = cosine_softmax_backward(1.0, cache)
        for name, t in (("loss", loss), ("dz", dz), ("dW", dw)):
            check_placed(name, t, dtype, device)
        res[device] = (targets, loss, dz, dw, acc)
    for i in (0, 1):
        np.testing.assert_array_equal(res[DEVICE][0][i], res["cpu"][0][i])
    for name, i in (("loss", 1), ("dz", 2), ("dW", 3)):
        check_close(f"smoothed step {name}", res[DEVICE][i], res["cpu"][i], dtype)
    # top-k counts compare the label's logit with its twin's (equal rows): equal on
    # both devices unless one rounds the two apart, which moves one row of 12
    for k in (1, 5):
        assert abs(res[DEVICE][4][k] - res["cpu"][4][k]) <= 1 / 12 + 1e-12, (k, res[DEVICE][4])


# ------------------------------------------------------------ augmentation

AUGMENT = {
    "simclr": AugmentConfig(),
    "fixed order, no crop": AugmentConfig(crop=False, jitter_order="fixed"),
    "always jitter and gray, full hue": AugmentConfig(jitter_p=1.0, gray_p=1.0, hue=0.5),
    "flipped, moco crop, not normalized": AugmentConfig(flip_p=1.0, crop_scale=(0.2, 1.0),
                                                        normalize=False),
}
# pixels of order 1 (normalized: within about [-2.2, 2.7]), a few roundings each
PIXEL_TOL = {np.float64: INDEPENDENT64, np.float32: INDEPENDENT32}


@DTYPES
@pytest.mark.parametrize("name", list(AUGMENT))
def test_augmentation_on_the_device_matches_cpu(dtype, name):
    """The same seeds: the same crops, flips, jitter and gray on the device's pixels."""
    images = SyntheticDataset(32, size=12, seed=2).read(np.arange(32))
    ids = np.arange(1000, 1032)
    cpu = augment_batch(images, ids, 7, 3, 10, AUGMENT[name], "cpu", dtype)
    dev = augment_batch(images, ids, 7, 3, 10, AUGMENT[name], DEVICE, dtype)
    check_placed(f"augment {name}", dev, dtype)
    assert dev.shape == (32, 3, 10, 10) and dev.flags.c_contiguous
    np.testing.assert_allclose(to_numpy(dev), cpu, rtol=0, atol=PIXEL_TOL[dtype],
                               err_msg=f"augment {name} ({np.dtype(dtype).name})")


@DTYPES
def test_eval_transform_on_the_device_matches_cpu(dtype):
    images = SyntheticDataset(8, size=12, seed=3).read(np.arange(8))[:, :, 1:]  # 12 x 11
    cpu = eval_transform(images, 16, device="cpu", dtype=dtype)
    dev = eval_transform(images, 16, device=DEVICE, dtype=dtype)
    check_placed("eval transform", dev, dtype)
    np.testing.assert_allclose(to_numpy(dev), cpu, rtol=0, atol=PIXEL_TOL[dtype])


# ------------------------------------------------------------ features, kNN, linear probe

@DTYPES
def test_features_on_the_device_match_cpu(dtype):
    """extract_features (eval-mode BN with moved statistics, several batches):
    pooled and head features on the device against the CPU; the BN statistics
    are not touched."""
    comm = SelfComm()
    dev = W.features_result(comm, DEVICE, dtype)
    cpu = W.features_result(comm, "cpu", dtype)
    truth = W.features_result(comm, "cpu", np.float64) if dtype == np.float32 else {}
    for kind in ("pooled", "head"):
        assert isinstance(dev[kind], np.ndarray) and dev[kind].dtype == dtype
        check_close(f"features {kind}", dev[kind], cpu[kind], dtype, truth.get(kind))


def test_knn_and_linear_probe_of_device_features_match_cpu():
    """Float64 features of a bank and queries extracted on the device: the weighted
    kNN's predictions are the CPU's, and so is the linear probe's accuracy."""
    bank_set, query_set = SyntheticDataset(96, W.SIZE, 4, seed=1), \
        SyntheticDataset(40, W.SIZE, 4, seed=2)
    feats = {}
    for device in ("cpu", DEVICE):
        from refimpl.evaluate.features import extract_features
        net = W.tiny_net(device, moved_bn=True)
        feats[device] = [extract_features(net, d, SelfComm(), batch_size=32)["pooled"]
                         for d in (bank_set, query_set)]
    for i in (0, 1):
        check_close("kNN features", feats[DEVICE][i], feats["cpu"][i], np.float64)
    preds = {d: weighted_knn_predict(f[0], bank_set.labels, f[1], ks=(5, 20))
             for d, f in feats.items()}
    for k in (5, 20):
        np.testing.assert_array_equal(preds[DEVICE][k], preds["cpu"][k])
    pytest.importorskip("sklearn")
    from refimpl.evaluate.linear_probe import linear_probe
    probe = {d: linear_probe(f[0], bank_set.labels, f[1], query_set.labels)
             for d, f in feats.items()}
    assert abs(probe[DEVICE]["test_accuracy"] - probe["cpu"]["test_accuracy"]) <= 1 / 40
    assert abs(probe[DEVICE]["train_accuracy"] - probe["cpu"]["train_accuracy"]) <= 1 / 96


@pytest.mark.mpi
def test_features_on_two_ranks_sharing_the_device_match_one_cpu_process(tmp_path):
    """Each rank encodes its contiguous share on the device; the gathered features
    equal one CPU process's."""
    got = on_two_ranks("features", tmp_path)
    want = W.features_result(SelfComm(), "cpu")
    for kind in ("pooled", "head"):
        check_close(f"features P=2 {kind}", got[kind], want[kind], np.float64)
