"""extract_features in one process: the network applied to the whole dataset in one
eval-mode batch, whatever the batch size; BatchNorm statistics untouched
(refimpl.evaluate.features). The P-rank version is tests/test_features_mpi.py."""
import numpy as np
import pytest

from refimpl.data.augment import eval_transform
from refimpl.data.synthetic import SyntheticDataset
from refimpl.evaluate.features import extract_features
from refimpl.models import build_model
from refimpl.parallel import SelfComm
from tolerances import LAYER64

N, SIZE = 23, 16


def tiny_net():
    """A float64 ResNet-18 of width 2 whose BN running statistics are not the defaults."""
    net = build_model("resnet18", stem="cifar", width=2, head_hidden=8, dim=8,
                      dtype=np.float64, seed=0)
    warm = SyntheticDataset(16, SIZE, 4, seed=5)
    # two train-mode forwards move every running mean/var away from 0/1, so eval
    # mode (running statistics) and train mode (batch statistics) differ
    for _ in range(2):
        net.forward(eval_transform(warm.read(np.arange(16)), SIZE, dtype=np.float64), train=True)
    return net


@pytest.fixture(scope="module")
def setup():
    net = tiny_net()
    data = SyntheticDataset(N, SIZE, 4, seed=1)
    x = eval_transform(data.read(np.arange(N)), SIZE, dtype=np.float64)   # (N, 3, S, S)
    want = {"pooled": net.features(x, train=False), "head": net.forward(x, train=False)}
    return net, data, x, want


@pytest.mark.parametrize("batch_size", [1, 5, 23, 256])
def test_extraction_equals_one_eval_batch(setup, batch_size):
    net, data, _, want = setup
    before = net.store.snapshot_buffers()
    comm = SelfComm()
    got = extract_features(net, data, comm, batch_size=batch_size)
    assert list(got) == ["pooled", "head"]
    assert got["pooled"].shape == (N, 16) and got["head"].shape == (N, 8)
    for kind in ("pooled", "head"):
        assert got[kind].dtype == np.float64
        err = np.max(np.abs(got[kind] - want[kind])) / np.max(np.abs(want[kind]))
        # eval mode: each image alone, through GEMMs blocked for another batch size
        assert err <= LAYER64, f"{kind} batch {batch_size}: {err:.2e}"
    # eval mode: running statistics and counters exactly as they were
    after = net.store.snapshot_buffers()
    np.testing.assert_array_equal(after[0], before[0])
    assert all(int(after[1][n]) == int(before[1][n]) for n in before[1])
    # one all_gather_v per kind, the counts known: no count exchange
    assert comm.counters == {"all_gather_v": {"calls": 2, "sent": N * 24 * 8,
                                              "received": N * 24 * 8}}


def test_eval_mode_is_not_batch_statistics(setup):
    """Negative control: train-mode BN (batch statistics) gives other features."""
    net, data, x, want = setup
    snap = net.store.snapshot_buffers()
    train_mode = net.features(x, train=True)
    net.store.restore_buffers(snap)
    assert np.max(np.abs(train_mode - want["pooled"])) > 1e-3  # O(1) apart, not rounding


def test_which_image_size_and_progress(setup):
    net, data, x, want = setup
    calls = []
    got = extract_features(net, data, SelfComm(), batch_size=10, which="head",
                           progress=lambda done, total: calls.append((done, total)))
    assert list(got) == ["head"] and calls == [(10, N), (20, N), (23, N)]
    np.testing.assert_allclose(got["head"], want["head"], rtol=0, atol=LAYER64)  # O(1) features
    # another input size: the same as transforming to that size by hand
    small = extract_features(net, data, SelfComm(), image_size=8, which=("pooled",))
    x8 = eval_transform(data.read(np.arange(N)), 8, dtype=np.float64)
    np.testing.assert_allclose(small["pooled"], net.features(x8, train=False), rtol=0,
                               atol=LAYER64)


def test_float32_network_gives_float32_features():
    net = build_model("resnet18", stem="cifar", width=2, head_hidden=8, dim=8,
                      dtype=np.float32, seed=0)
    got = extract_features(net, SyntheticDataset(5, SIZE, 4, seed=2), SelfComm())
    assert got["pooled"].dtype == np.float32 and got["head"].dtype == np.float32


def test_bad_which_and_batch_size_are_refused(setup):
    net, data, _, _ = setup
    with pytest.raises(ValueError, match="which must name"):
        extract_features(net, data, SelfComm(), which=("pooled", "logits"))
    with pytest.raises(ValueError, match="which must name"):
        extract_features(net, data, SelfComm(), which=())
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        extract_features(net, data, SelfComm(), batch_size=0)
