"""Synthetic shapes x textures: a pure function of (seed, index), cheap labels, specs;
and the data_tools.synthetic writer, which packs the same pixels."""
import numpy as np
import pytest

from data_tools.synthetic import main as synthetic_main
from data_tools.synthetic import write_synthetic
from refimpl.data import synthetic as S
from refimpl.data.synthetic import SyntheticDataset, open_synthetic, parse_spec


def test_pixels_are_a_pure_function_of_seed_and_index():
    ds = SyntheticDataset(1000, size=24, num_classes=32, seed=7)
    a = ds.read(np.arange(0, 40))
    assert a.shape == (40, 24, 24, 3) and a.dtype == np.uint8
    # the same indices in another order, alone, and mixed with others
    b = ds.read(np.array([39, 5, 999, 17, 0]))
    np.testing.assert_array_equal(b[0], a[39])
    np.testing.assert_array_equal(b[1], a[5])
    np.testing.assert_array_equal(b[3], a[17])
    np.testing.assert_array_equal(b[4], a[0])
    np.testing.assert_array_equal(ds.read([17])[0], a[17])
    # a fresh object with the same arguments agrees; another seed does not
    np.testing.assert_array_equal(SyntheticDataset(1000, 24, 32, 7).read(np.arange(40)), a)
    c = SyntheticDataset(1000, 24, 32, 8).read(np.arange(40))
    assert all(not np.array_equal(a[i], c[i]) for i in range(40))
    # images are not blank and differ from each other
    assert a.std(axis=(1, 2, 3)).min() > 10
    assert len({im.tobytes() for im in a}) == 40


def test_labels_for_imagenet_size_are_cheap_and_consistent():
    ds = open_synthetic("synthetic:n=1281167,size=32,classes=10,seed=0")
    labels = ds.labels
    assert labels.shape == (1281167,) and labels.dtype == np.int64
    counts = np.bincount(labels, minlength=10)
    assert counts.size == 10 and counts.min() > 0.09 * 1281167  # about balanced
    assert len(ds) == 1281167 and ds.image_size == (32, 32)
    assert ds.class_names[:3] == ["disk-solid", "square-stripes", "diamond-checker"]
    # the labels depend on (seed, index) only: a prefix of a smaller dataset agrees
    np.testing.assert_array_equal(SyntheticDataset(500, seed=0).labels, labels[:500])
    assert not np.array_equal(SyntheticDataset(500, seed=1).labels, labels[:500])
    x = ds.read(np.array([0, 1281166]))
    assert x.shape == (2, 32, 32, 3)


def test_classes_cover_distinct_shape_texture_pairs():
    pairs = {S.class_shape_texture(c) for c in range(S.MAX_CLASSES)}
    assert len(pairs) == S.MAX_CLASSES == 32
    names = SyntheticDataset(10, num_classes=32).class_names
    assert len(set(names)) == 32


def test_spec_parsing_and_errors():
    assert parse_spec("synthetic:n=5") == {"n": 5, "size": 32, "classes": 10, "seed": 0,
                                            "offset": 0}
    assert parse_spec("synthetic: n=5 , size=16,seed=3") == {"n": 5, "size": 16, "classes": 10,
                                                              "seed": 3, "offset": 0}
    bad = {"synthetic:n=5,colour=3": "unknown key",
           "synthetic:size=32": "required",
           "synthetic:n=five": "integer",
           "synthetic:n=5,n=6": "twice",
           "synthetic:n=5,size": "key=value",
           "cifar:n=5": "starts with"}
    for spec, msg in bad.items():
        with pytest.raises(ValueError, match=msg):
            open_synthetic(spec)
    with pytest.raises(ValueError, match="num_classes must be <= 32"):
        open_synthetic("synthetic:n=5,classes=33")
    with pytest.raises(ValueError, match="offset \\+ num_classes must be <= 32, got 30 \\+ 8"):
        open_synthetic("synthetic:n=5,classes=8,offset=30")
    with pytest.raises(ValueError, match="num_images must be a positive integer, got 0"):
        open_synthetic("synthetic:n=0")
    with pytest.raises(ValueError, match="size must be an integer >= 8, got 4"):
        open_synthetic("synthetic:n=5,size=4")
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        SyntheticDataset(5, seed=-1)
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        open_synthetic("synthetic:n=5").read([5])


def test_open_dataset_dispatches_to_synthetic():
    from refimpl.data.datasets import open_dataset
    ds = open_dataset("synthetic:n=20,size=16,classes=4,seed=2")
    assert isinstance(ds, SyntheticDataset) and len(ds) == 20 and ds.num_classes == 4
    assert ds.labels.max() < 4


def test_cli_packs_the_same_images(tmp_path):
    from refimpl.data.packed import PackedDataset
    out = tmp_path / "syn"
    assert synthetic_main([str(out), "--n", "37", "--size", "16", "--classes", "5",
                           "--seed", "4"]) == 0
    packed = PackedDataset(out)
    ds = SyntheticDataset(37, size=16, num_classes=5, seed=4)
    np.testing.assert_array_equal(packed.read(np.arange(37)), ds.read(np.arange(37)))
    np.testing.assert_array_equal(packed.labels, ds.labels)
    assert packed.class_names == ds.class_names
    assert synthetic_main([str(out), "--n", "3"]) == 1  # exists, no --overwrite
    # written in chunks of 4: the same images
    chunked = PackedDataset(write_synthetic(tmp_path / "chunked", 37, 16, 5, 4, chunk=4))
    np.testing.assert_array_equal(chunked.images, packed.images)
    with pytest.raises(ValueError, match="chunk must be a positive integer, got 0"):
        write_synthetic(tmp_path / "never", 3, chunk=0)


def test_too_large_size_is_one_clear_error(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "data_tools.synthetic", str(tmp_path / "out"),
                        "--n", "10", "--size", "100000"], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.startswith("synthetic: error: --size 100000: rendering one 100000x100000 image "
                               "needs about 894 GiB of memory, more than the ")
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_render_stays_within_the_writers_memory_estimate():
    import tracemalloc
    from data_tools.synthetic import RENDER_BYTES_PER_PIXEL
    for n, size in ((64, 32), (4, 128), (1, 256)):
        tracemalloc.start()
        S.render(0, np.arange(n), size, 32)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak <= RENDER_BYTES_PER_PIXEL * n * size * size, (n, size, peak / (n * size * size))


def test_chunks_shrink_to_the_available_memory(tmp_path, monkeypatch):
    from data_tools import memory
    from data_tools import synthetic as tool
    from refimpl.data.packed import PackedDataset
    rendered = []
    real_read = SyntheticDataset.read
    monkeypatch.setattr(SyntheticDataset, "read",
                        lambda self, idx: rendered.append(len(idx)) or real_read(self, idx))
    per_image = tool.RENDER_BYTES_PER_PIXEL * 16 * 16
    monkeypatch.setattr(tool, "available_memory", lambda: 6 * per_image)  # room for 3 at half
    monkeypatch.setattr(memory, "available_memory", lambda: 6 * per_image)
    ds = PackedDataset(write_synthetic(tmp_path / "a", 10, size=16))
    assert rendered == [3, 3, 3, 1]
    np.testing.assert_array_equal(ds.images, SyntheticDataset(10, size=16).read(np.arange(10)))
    monkeypatch.setattr(memory, "available_memory", lambda: per_image - 1)
    with pytest.raises(ValueError, match=r"--size 16: rendering one 16x16 image needs about "
                                         r"2\.29e-05 GiB of memory, more than the 2\.29e-05 GiB"):
        write_synthetic(tmp_path / "b", 10, size=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_offset_draws_disjoint_classes_with_the_same_nuisances():
    """classes=8,offset=8: labels 0..7 drawn as classes 8..15, whose (shape, texture)
    pairs are none of classes 0..7's; the labels and the nuisances (the hash) are the
    ones of offset 0, so only the class's look changes."""
    a = open_synthetic("synthetic:n=64,size=16,classes=8,seed=3")
    b = open_synthetic("synthetic:n=64,size=16,classes=8,seed=3,offset=8")
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not set(a.class_names) & set(b.class_names) and len(set(b.class_names)) == 8
    assert b.spec.endswith(",offset=8") and a.spec.endswith("seed=3")
    same = a.labels == 0  # class 0 is a solid disk, class 8 a striped disk
    assert not np.array_equal(a.read(np.flatnonzero(same)), b.read(np.flatnonzero(same)))
    np.testing.assert_array_equal(b.read(np.arange(5)), S.render(3, np.arange(5), 16, 8, 8))
