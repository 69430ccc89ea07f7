"""The packed dataset format: round trip, streaming writer, memory map, every error;
and open_dataset, which opens a packed folder, a synthetic spec or a dataset."""
import json
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from refimpl.data.datasets import open_dataset
from refimpl.data.packed import (FORMAT_VERSION, PackedDataset, PackedFormatError, PackedWriter,
                                 write_packed)
from refimpl.data.synthetic import SyntheticDataset


def _data(n=7, h=5, w=4, seed=0):
    r = np.random.default_rng(seed)
    return (r.integers(0, 256, (n, h, w, 3), dtype=np.uint8),
            r.integers(-1, 3, n).astype(np.int64))


def _rewrite_manifest(path, **changes):
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))


def test_round_trip_and_manifest(tmp_path):
    images, labels = _data()
    out = write_packed(tmp_path / "ds", images, labels,
                       {"source": "test", "class_names": ["a", "b", "c"], "note": 42})
    ds = PackedDataset(out)
    assert len(ds) == 7 and ds.image_size == (5, 4) and ds.class_names == ["a", "b", "c"]
    assert isinstance(ds.images, np.memmap) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.labels.dtype == np.int64
    m = ds.manifest
    assert m["format_version"] == FORMAT_VERSION and m["num_images"] == 7
    assert m["image_size"] == [5, 4] and m["source"] == "test" and m["note"] == 42
    assert m["files"] is None and m["skipped"] == []
    assert set(m["checksums"]) == {"images.npy", "labels.npy"}
    assert ds.verify()
    # Nothing but the dataset is left next to it (the temp folder was renamed).
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_read_order_and_duplicates(tmp_path):
    images, labels = _data(n=10)
    ds = PackedDataset(write_packed(tmp_path / "ds", images, labels))
    idx = [7, 2, 2, 9, 0, 7]
    got = ds.read(idx)
    assert type(got) is np.ndarray and got.dtype == np.uint8 and got.shape == (6, 5, 4, 3)
    np.testing.assert_array_equal(got, images[idx])
    got[:] = 0  # a copy: the dataset is untouched
    np.testing.assert_array_equal(ds.read([7]), images[[7]])
    assert ds.read(np.array([], dtype=np.int64)).shape == (0, 5, 4, 3)
    with pytest.raises(IndexError, match="10 out of range"):
        ds.read([1, 10])
    with pytest.raises(IndexError, match="-1 out of range"):
        ds.read([-1])


def test_streaming_writer_truncate(tmp_path):
    images, labels = _data(n=6)
    with PackedWriter(tmp_path / "ds", 10, 5, 4, manifest={"files": [f"f{i}" for i in range(6)]}) as w:
        w.write(0, images[:4], labels[:4])
        w.write(4, images[4:])  # no labels -> -1
        for bad in (0, 11, 2.0):
            with pytest.raises(ValueError, match=r"num_images must be an integer in \[1, 10\]"):
                w.truncate(bad)
        w.truncate(6)
    ds = PackedDataset(tmp_path / "ds")
    assert len(ds) == 6 and ds.manifest["files"][5] == "f5"
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, np.r_[labels[:4], [-1, -1]])
    assert ds.verify()
    assert np.load(tmp_path / "ds" / "images.npy").shape == (6, 5, 4, 3)  # plain np.load agrees


def test_writer_exception_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with PackedWriter(tmp_path / "ds", 3, 2, 2) as w:
            w.write(0, np.zeros((1, 2, 2, 3), np.uint8))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_unwritten_rows(tmp_path):
    with pytest.raises(ValueError, match="never written"):
        with PackedWriter(tmp_path / "ds", 3, 2, 2) as w:
            w.write(0, np.zeros((2, 2, 2, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_write_validation(tmp_path):
    images, labels = _data()
    with pytest.raises(ValueError, match="uint8"):
        write_packed(tmp_path / "a", images.astype(np.float32), labels)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        write_packed(tmp_path / "a", images[..., :2], labels)
    with pytest.raises(ValueError, match="labels must be shaped"):
        write_packed(tmp_path / "a", images, labels[:3])
    with pytest.raises(ValueError, match="integers"):
        write_packed(tmp_path / "a", images, labels.astype(np.float64))
    with pytest.raises(ValueError, match=">= -1"):
        write_packed(tmp_path / "a", images, labels - 5)
    with pytest.raises(ValueError, match="out of range"):
        write_packed(tmp_path / "a", images, np.full(7, 3), {"class_names": ["x", "y"]})
    with pytest.raises(ValueError, match="files"):
        write_packed(tmp_path / "a", images, labels, {"files": ["only-one"]})
    with pytest.raises(ValueError, match="contradicts"):
        write_packed(tmp_path / "a", images, labels, {"num_images": 3})
    with pytest.raises(ValueError, match="at least one"):
        write_packed(tmp_path / "a", images[:0], labels[:0])
    with pytest.raises(ValueError, match="num_images must be a positive integer, got 0"):
        PackedWriter(tmp_path / "a", 0, 2, 2)
    with pytest.raises(ValueError, match="width must be a positive integer, got 2.0"):
        PackedWriter(tmp_path / "a", 3, 2, 2.0)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_and_overwrite(tmp_path):
    images, labels = _data()
    write_packed(tmp_path / "ds", images, labels)
    with pytest.raises(FileExistsError, match="already exists"):
        write_packed(tmp_path / "ds", images, labels)
    write_packed(tmp_path / "ds", images[:2], labels[:2], overwrite=True)
    assert len(PackedDataset(tmp_path / "ds")) == 2
    # overwrite never deletes a folder that is not a packed dataset
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="refusing"):
        write_packed(tmp_path / "photos", images, labels, overwrite=True)
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "photos"]


def test_open_errors(tmp_path):
    images, labels = _data()
    with pytest.raises(PackedFormatError, match="no such dataset folder"):
        PackedDataset(tmp_path / "nope")
    for missing in ("images.npy", "labels.npy", "manifest.json"):
        path = write_packed(tmp_path / missing, images, labels)
        (path / missing).unlink()
        with pytest.raises(PackedFormatError, match=f"missing {missing}"):
            PackedDataset(path)


def test_bad_manifest(tmp_path):
    images, labels = _data()
    path = write_packed(tmp_path / "ds", images, labels)
    good = (path / "manifest.json").read_text()
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(PackedFormatError, match="not valid JSON"):
        PackedDataset(path)
    (path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(PackedFormatError, match="JSON object"):
        PackedDataset(path)
    (path / "manifest.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(PackedFormatError, match="missing keys"):
        PackedDataset(path)
    (path / "manifest.json").write_text(good)
    _rewrite_manifest(path, format_version=99)
    with pytest.raises(PackedFormatError, match="format_version 99"):
        PackedDataset(path)
    (path / "manifest.json").write_text(good)
    _rewrite_manifest(path, image_size=[5, 5])
    with pytest.raises(PackedFormatError, match="does not match the manifest"):
        PackedDataset(path)
    (path / "manifest.json").write_text(good)
    _rewrite_manifest(path, num_images=8)
    with pytest.raises(PackedFormatError, match="does not match the manifest"):
        PackedDataset(path)


def test_truncated_images_and_label_mismatch(tmp_path):
    images, labels = _data()
    path = write_packed(tmp_path / "ds", images, labels)
    data = (path / "images.npy").read_bytes()
    (path / "images.npy").write_bytes(data[:-10])
    with pytest.raises(PackedFormatError, match="truncated"):
        PackedDataset(path)
    (path / "images.npy").write_bytes(data[:20])  # not even a whole header
    with pytest.raises(PackedFormatError, match="not a valid .npy"):
        PackedDataset(path)
    (path / "images.npy").write_bytes(data)
    np.save(path / "labels.npy", labels[:5])
    with pytest.raises(PackedFormatError, match="5 labels for 7 images"):
        PackedDataset(path)
    np.save(path / "labels.npy", labels.astype(np.float32))
    with pytest.raises(PackedFormatError, match="int64"):
        PackedDataset(path)


def test_verify_detects_modification(tmp_path):
    images, labels = _data()
    path = write_packed(tmp_path / "ds", images, labels)
    ds = PackedDataset(path)
    labels2 = labels.copy()
    labels2[0] += 1
    np.save(path / "labels.npy", labels2)
    with pytest.raises(PackedFormatError, match="labels.npy: checksum mismatch"):
        PackedDataset(path).verify()
    assert ds.labels[0] == labels[0]  # the already-open dataset kept its labels


def test_read_does_not_load_the_whole_file(tmp_path):
    # ~20 MB of images; reading 4 rows must allocate about 4 rows, not 20 MB.
    n, h, w = 1700, 64, 64
    with PackedWriter(tmp_path / "big", n, h, w) as writer:
        for start in range(0, n, 100):
            rows = np.full((min(100, n - start), h, w, 3), 0, np.uint8)
            rows[:, 0, 0, 0] = (np.arange(start, start + rows.shape[0]) % 251)
            writer.write(start, rows)
    file_size = (tmp_path / "big" / "images.npy").stat().st_size
    assert file_size > 20_000_000
    tracemalloc.start()
    ds = PackedDataset(tmp_path / "big")
    got = ds.read([1500, 3, 999, 3])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert isinstance(ds.images, np.memmap)
    assert got[:, 0, 0, 0].tolist() == [1500 % 251, 3, 999 % 251, 3]
    assert peak < 1_000_000, f"peak {peak} bytes for a {file_size}-byte file"


def test_open_dataset(tmp_path):
    images, labels = _data()
    path = write_packed(tmp_path / "ds", images, labels)
    assert isinstance(open_dataset(path), PackedDataset)
    assert isinstance(open_dataset(str(path)), PackedDataset)
    ds = PackedDataset(path)
    assert open_dataset(ds) is ds
    with pytest.raises(TypeError, match="expected a path"):
        open_dataset(3)


def test_open_dataset_opens_synthetic_specs():
    ds = open_dataset("synthetic:n=10,size=16,classes=3,seed=5")
    assert isinstance(ds, SyntheticDataset)
    assert (len(ds), ds.image_size, ds.num_classes, ds.seed) == (10, (16, 16), 3, 5)
    np.testing.assert_array_equal(ds.read([2, 7]), SyntheticDataset(10, 16, 3, 5).read([2, 7]))
    with pytest.raises(ValueError, match="unknown key"):
        open_dataset("synthetic:n=10,colour=3")


def test_the_library_never_imports_data_tools():
    # a fresh interpreter: this test process has imported data_tools already
    code = ("import sys, refimpl.data, refimpl.data.datasets, refimpl.data.synthetic, "
            "refimpl.data.augment, refimpl.evaluate.knn\n"
            "refimpl.data.open_dataset('synthetic:n=4,size=8').read([0, 3])\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'data_tools')\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_open_rejects_out_of_range_labels(tmp_path):
    images, labels = _data(n=3)
    path = write_packed(tmp_path / "ds", images, np.array([0, 1, -1]), {"class_names": ["a", "b"]})
    np.save(path / "labels.npy", np.array([-7, 5, 1]))
    with pytest.raises(PackedFormatError, match=r"labels\.npy: label -7 at index 0 out of range"):
        PackedDataset(path)
    np.save(path / "labels.npy", np.array([1, 5, 0]))
    with pytest.raises(PackedFormatError,
                       match=r"labels.npy: label 5 at index 1 out of range \(expected -1 <= label < 2"):
        PackedDataset(path)
    np.save(path / "labels.npy", np.array([1, -1, 0]))  # in range: opens
    assert PackedDataset(path).labels.tolist() == [1, -1, 0]
    # without class names any label >= -1 is fine, only < -1 is an error
    path = write_packed(tmp_path / "plain", images, np.array([0, 1, -1]))
    np.save(path / "labels.npy", np.array([0, 99, -1]))
    assert PackedDataset(path).labels.tolist() == [0, 99, -1]
    np.save(path / "labels.npy", np.array([0, 99, -2]))
    with pytest.raises(PackedFormatError, match=r"label -2 at index 2"):
        PackedDataset(path)
