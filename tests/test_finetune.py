"""Phase 2's pieces in one process: the labeled subset, the batch stream, the model's names.

The subset must be the same ids for every P and rerun (a pure function of
the labels, the fraction and the seed), class-balanced with at least one
image per class, and nested (1% inside 10% for one seed); the batch stream
must not depend on P and must key every entry's augmentation by its pass.
"""
import numpy as np
import pytest

from refimpl.data.synthetic import SyntheticDataset
from refimpl.finetune.labels import class_quotas, label_subset
from refimpl.finetune.model import FineTuneNet
from refimpl.finetune.sampler import batch_of_step


def shapes_labels():
    """The benchmark's shapes: 2,000 images, 8 classes of unequal sizes."""
    return SyntheticDataset(2000, size=8, num_classes=8, seed=0).labels


def test_one_percent_is_class_balanced_seeded_and_the_same_every_time():
    y = shapes_labels()
    ids = label_subset(y, 0.01, seed=0)
    assert ids.size == 20 and ids.dtype == np.int64 and np.all(np.diff(ids) > 0)
    per_class = np.bincount(y[ids], minlength=8)
    assert per_class.min() >= 2 and per_class.max() - per_class.min() <= 1  # 20 = 4 x 2 + 4 x 3
    np.testing.assert_array_equal(ids, label_subset(y.copy(), 0.01, seed=0))  # a rerun
    assert not np.array_equal(ids, label_subset(y, 0.01, seed=1))
    # nested: one seed's 1% lies inside its 10%, which lies inside 100% = every image
    ten = label_subset(y, 0.1, seed=0)
    assert ten.size == 200 and np.all(np.isin(ids, ten))
    np.testing.assert_array_equal(label_subset(y, 1.0, seed=0), np.arange(2000))


def test_at_least_one_image_per_class_even_when_the_fraction_asks_for_fewer():
    y = np.repeat(np.arange(10), [3, 50, 50, 50, 50, 50, 50, 50, 50, 50])
    ids = label_subset(y, 0.001, seed=2)  # 0.001 x 453 rounds to 0
    assert np.array_equal(np.bincount(y[ids], minlength=10), np.ones(10, dtype=np.int64))


def test_quotas_fill_small_classes_up_to_their_size():
    # 30 images over classes of 2, 100, 100: the small class gives what it cannot take away
    assert class_quotas([2, 100, 100], 30).tolist() == [2, 14, 14]
    assert class_quotas([5, 5, 5], 15).tolist() == [5, 5, 5]
    assert class_quotas([4, 9, 9, 9], 7).tolist() == [1, 2, 2, 2]


@pytest.mark.parametrize("labels,fraction,message", [
    (np.arange(4), 0.0, "in (0, 1]"),
    (np.arange(4), 1.5, "in (0, 1]"),
    (np.array([0, 1, -1]), 0.5, "1 images have no label"),
    (np.array([0, 2, 2]), 0.5, "class 1 has no training image"),
])
def test_bad_subsets_are_refused(labels, fraction, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        label_subset(labels, fraction, seed=0)


def test_batch_stream_passes_and_world_size_invariance():
    ids = np.array([3, 8, 11, 20, 42], dtype=np.int64)  # 5 labeled images
    batches = [batch_of_step(ids, 4, seed=7, step=t) for t in range(5)]
    stream = np.concatenate([b for b, _ in batches])  # 20 entries = 4 passes of 5
    passes = np.concatenate([q for _, q in batches])
    assert passes.tolist() == [q for q in range(4) for _ in range(5)]
    for q in range(4):  # each pass visits every labeled image once, in its own order
        assert sorted(stream[passes == q].tolist()) == ids.tolist()
    assert stream[:5].tolist() != stream[5:10].tolist()
    # a batch larger than the labeled set holds images of several passes, each once per pass
    big, q = batch_of_step(ids, 12, seed=7, step=0)
    assert q.tolist() == [0] * 5 + [1] * 5 + [2] * 2 and np.all(np.isin(big, ids))
    # a function of (ids, B, seed, step) alone: what every rank of every P computes
    again, _ = batch_of_step(ids.copy(), 4, seed=7, step=3)
    np.testing.assert_array_equal(again, batches[3][0])


def test_model_has_torchvision_names_and_phase_one_encoder_init():
    """Encoder keys, then fc.weight (C, F) and fc.bias last, as torchvision's resnet18(
    num_classes=C); the encoder's initial values are models.Network's for the same seed."""
    from refimpl.models.network import build_model
    net = FineTuneNet("resnet18", "cifar", 4, num_classes=7, dtype=np.float64, seed=5)
    names = net.store.names()
    assert names[0] == "conv1.weight" and names[-2:] == ["fc.weight", "fc.bias"]
    assert net.store.shapes["fc.weight"] == (7, 32) and net.encoder_size == \
        net.store.offsets["fc.weight"][0] and net.store.offsets["fc.bias"][1] == net.store.data.size
    phase1 = build_model("resnet18", "cifar", 4, dtype=np.float64, seed=5)
    E = net.encoder_size
    np.testing.assert_array_equal(net.store.data[:E], phase1.store.data[:E])
    assert np.abs(net.store.params["fc.weight"]).max() <= 1 / np.sqrt(32)  # nn.Linear's init
