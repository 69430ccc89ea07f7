"""data_tools.digits: scikit-learn's 1,797 digits, packed with a fixed stratified split."""
import numpy as np
import pytest

from data_tools.digits import load_digits_uint8, main, make_digits, split_indices
from refimpl.data.packed import PackedDataset


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    train, test = make_digits(out)
    return PackedDataset(train), PackedDataset(test)


def test_sizes_and_classes(digits):
    train, test = digits
    assert len(train) + len(test) == 1797
    assert train.image_size == test.image_size == (32, 32)
    assert train.class_names == test.class_names == [str(d) for d in range(10)]
    for ds in (train, test):
        assert set(np.unique(ds.labels)) == set(range(10))  # every class in both splits
    # per class: round(0.2 * n_c) test images
    _, labels = load_digits_uint8(8)
    for c in range(10):
        n_c = int((labels == c).sum())
        assert int((test.labels == c).sum()) == round(0.2 * n_c)
    assert len(test) == 359 and len(train) == 1438


def test_manifest_and_indices(digits):
    train, test = digits
    m = test.manifest
    assert m["source"] == "sklearn.datasets.load_digits" and m["split"] == "test"
    assert m["seed"] == 0 and m["test_fraction"] == 0.2 and m["files"] is None
    tr, te = np.asarray(train.manifest["source_indices"]), np.asarray(m["source_indices"])
    assert len(np.intersect1d(tr, te)) == 0 and len(np.union1d(tr, te)) == 1797
    assert (np.diff(te) > 0).all()  # stored in original order
    tr2, te2 = split_indices(load_digits_uint8(8)[1], 0.2, 0)
    np.testing.assert_array_equal(te, te2)
    np.testing.assert_array_equal(tr, tr2)


def test_pixel_values(digits):
    from sklearn.datasets import load_digits
    train, _ = digits
    x = train.images
    assert x.dtype == np.uint8 and x.min() == 0 and x.max() == 255
    np.testing.assert_array_equal(x[..., 0], x[..., 1])  # gray replicated to RGB
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    # size 8: no resize, just v * 255 / 16 rounded
    raw = load_digits().images
    small, labels = load_digits_uint8(8)
    np.testing.assert_array_equal(small[..., 0], np.round(raw * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(labels, load_digits().target)
    assert set(np.unique(small)) <= {int(round(v * 255 / 16)) for v in range(17)}


@pytest.mark.parametrize("size", [9, 16, 32])
def test_upscale_is_pillow_bilinear_up_to_its_rounding(size):
    """Pillow's BILINEAR upscale is the same triangle filter with the same edge
    clamp; it only rounds to 8 bits between its two passes: +-1 at most."""
    Image = pytest.importorskip("PIL.Image")
    ours = load_digits_uint8(size)[0][..., 0]
    small = load_digits_uint8(8)[0][..., 0]
    pil = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.Resampling.BILINEAR))
                    for g in small])
    diff = np.abs(ours.astype(int) - pil)
    assert diff.max() <= 1
    print(f"size {size}: {int((diff > 0).sum())} of {diff.size} pixels differ from Pillow by 1")


def test_deterministic_and_seeded(tmp_path, digits):
    train, test = digits
    assert main([str(tmp_path / "again")]) == 0
    again = PackedDataset(tmp_path / "again" / "test")
    assert again.manifest["checksums"] == test.manifest["checksums"]
    _, te_seed1 = split_indices(load_digits_uint8(8)[1], 0.2, 1)
    assert not np.array_equal(te_seed1, test.manifest["source_indices"])


def test_cli_refuses_an_existing_output_folder(tmp_path, capsys):
    assert main([str(tmp_path / "d"), "--size", "8"]) == 0
    assert PackedDataset(tmp_path / "d" / "train").image_size == (8, 8)
    assert main([str(tmp_path / "d")]) == 1
    assert "already exists" in capsys.readouterr().err


def test_bad_split_fraction_size_and_seed_are_refused():
    labels = load_digits_uint8(8)[1]
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        split_indices(labels, 1.0)
    with pytest.raises(ValueError, match="every class must be in both splits"):
        split_indices(labels, 0.001)
    for size in (0, 7, 16.0):  # the tool only upscales the 8 x 8 scans
        with pytest.raises(ValueError, match=f"size must be an integer >= 8, got {size}"):
            load_digits_uint8(size)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        split_indices(labels, 0.2, -1)


def test_a_failing_test_split_leaves_no_lone_train(tmp_path, capsys, fail_test_split):
    fail_test_split()
    assert main([str(tmp_path / "d"), "--size", "8"]) == 1
    assert "No space left on device (simulated)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_too_large_size_is_one_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "d"), "--size", "100000"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("digits: error: --size 100000: 1797 digits of 100000x100000 needs about ")
    assert "GiB of memory, more than the" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
