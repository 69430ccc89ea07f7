"""The packed dataset format: round trip, streaming writer, memory map, every error;
and open_dataset, which opens a packed folder, a synthetic spec or a dataset."""
import json
import os
import stat
import subprocess
import sys
import tracemalloc
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from refimpl.data.datasets import open_dataset
from refimpl import fileio
from refimpl.data import packed
from refimpl.data.packed import (FORMAT_VERSION, PackedDataset, PackedFormatError, PackedSplits,
                                 PackedWriter, write_packed)
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


# --------------------------------------------------------------------------
# reader: manifest types and file lengths


def test_open_rejects_wrong_manifest_types(tmp_path):
    images, labels = _data(n=1)  # one image: `num_images: true` would read as 1
    path = write_packed(tmp_path / "ds", images, np.array([0]), {"class_names": ["a", "b", "c"]})
    good = (path / "manifest.json").read_text()
    cases = [
        ({"checksums": "x"}, r"checksums must be \{\"images.npy\": sha256, \"labels.npy\": sha256\}"),
        ({"checksums": {"images.npy": "x", "labels.npy": "y"}}, "checksums must be"),
        ({"class_names": "abc"}, r"manifest\['class_names'\] must be a list of strings, got 'abc'"),
        ({"class_names": ["a", 1]}, "class_names'] must be a list of strings"),
        ({"num_images": True}, "num_images must be a positive int, got True"),
        ({"image_size": [True, 4]}, r"image_size must be \[H, W\] positive ints, got \[True, 4\]"),
        ({"format_version": True}, "format_version True, this refimpl reads version 1"),
        ({"files": "abc"}, r"manifest\['files'\] must be null or a list of 1 paths"),
        ({"skipped": ["x"]}, r"manifest\['skipped'\] must be a list of \{path, reason\} dicts"),
    ]
    for change, message in cases:
        (path / "manifest.json").write_text(good)
        _rewrite_manifest(path, **change)
        with pytest.raises(PackedFormatError, match=message) as e:
            PackedDataset(path)
        assert str(path / "manifest.json") in str(e.value)  # names the file
    (path / "manifest.json").write_text(good)
    assert PackedDataset(path).class_names == ["a", "b", "c"]


def test_open_rejects_trailing_bytes(tmp_path):
    images, labels = _data()
    path = write_packed(tmp_path / "ds", images, labels)
    data = (path / "images.npy").read_bytes()
    (path / "images.npy").write_bytes(data + b"\0" * 5)
    with pytest.raises(PackedFormatError,
                       match=r"images\.npy has 5 trailing bytes: .* for 7 images of 5x4x3"):
        PackedDataset(path)
    (path / "images.npy").write_bytes(data)
    with open(path / "labels.npy", "ab") as f:
        f.write(b"xyz")
    with pytest.raises(PackedFormatError, match=r"labels\.npy has 3 trailing bytes"):
        PackedDataset(path)
    np.save(path / "labels.npy", labels)
    assert len(PackedDataset(path)) == 7


# --------------------------------------------------------------------------
# writer: permissions, stale temporaries, disk space


def _mode(path):
    return stat.S_IMODE(Path(path).stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_folders_get_the_permissions_of_mkdir_under_the_umask(tmp_path, umask):
    images, labels = _data()
    old = os.umask(umask)
    try:
        one = write_packed(tmp_path / "one", images, labels)
        with PackedSplits(tmp_path / "new", ("train", "test")) as s:  # a new folder: one rename
            for name in s.names:
                s.write(name, images, labels)
        (tmp_path / "existing").mkdir()
        with PackedSplits(tmp_path / "existing", ("train", "test")) as s:  # split by split
            for name in s.names:
                s.write(name, images, labels)
        (tmp_path / "reference").mkdir()  # what mkdir gives under this umask
    finally:
        os.umask(old)
    want = 0o777 & ~umask
    assert _mode(tmp_path / "reference") == want == {0o022: 0o755, 0o077: 0o700}[umask]
    for folder in (one, tmp_path / "new", tmp_path / "new" / "train", tmp_path / "new" / "test",
                   tmp_path / "existing" / "train", tmp_path / "existing" / "test"):
        assert _mode(folder) == want, folder
    for name in ("images.npy", "labels.npy", "manifest.json"):
        assert _mode(one / name) == 0o666 & ~umask


_WRITER_THEN_SLEEP = """
import sys, time
import numpy as np
from refimpl.data.packed import PackedWriter
with PackedWriter(sys.argv[1], 4, 2, 2) as w:
    w.write(0, np.zeros((1, 2, 2, 3), np.uint8))
    print("ready", flush=True)
    time.sleep(120)
"""


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "ds"
    child = subprocess.Popen([sys.executable, "-c", _WRITER_THEN_SLEEP, str(out)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    stale = [p.name for p in tmp_path.iterdir()]
    assert stale == [f".ds.tmp-{fileio.HOST}-{child.pid}-{stale[0][-8:]}"]
    # What must survive: a live process's folder, another host's (a shared
    # filesystem: that pid means nothing here), and a folder of another naming.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        keep = [f".ds.tmp-{fileio.HOST}-{sleeper.pid}-0123abcd",
                f".ds.tmp-{fileio.HOST}-{os.getpid()}-0123abcd",
                f".ds.tmp-some.other_host-{child.pid}-0123abcd",
                ".ds.tmp-x8q2mz1a", f".other.tmp-{fileio.HOST}-{child.pid}-0123abcd"]
        for name in keep:
            (tmp_path / name).mkdir()
        images, labels = _data()
        write_packed(out, images, labels)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["ds"])
    assert len(PackedDataset(out)) == 7


def test_disk_space_is_checked_before_the_image_file_is_made(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(packed.shutil, "disk_usage", lambda path: usage(10**6, 0, 10**6))
    with pytest.raises(OSError, match=r"ds: 1000 images of 64x64x3 need 0\.0115 GiB on disk, but "
                                      r"the filesystem holding .* has 0\.000931 GiB free"):
        with PackedWriter(tmp_path / "ds", 1000, 64, 64):
            pass
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------
# PackedSplits: several datasets, published together or not at all


def _notes(out):
    """{split: the manifest's "note", or None where the split is absent}."""
    return {name: (json.loads((out / name / "manifest.json").read_text())["note"]
                   if (out / name).exists() else None) for name in ("train", "test")}


def _write_splits(out, note, overwrite=False):
    images, labels = _data(n=3)
    with PackedSplits(out, ("train", "test"), overwrite=overwrite) as s:
        for name in s.names:
            s.write(name, images, labels, {"note": note})
    return s.paths


def test_splits_are_published_together(tmp_path):
    paths = _write_splits(tmp_path / "out", "one")
    assert paths == (tmp_path / "out" / "train", tmp_path / "out" / "test")
    assert _notes(tmp_path / "out") == {"train": "one", "test": "one"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test", "train"]
    with pytest.raises(FileExistsError, match="train already exists"):
        PackedSplits(tmp_path / "out", ("train", "test"))
    _write_splits(tmp_path / "out", "two", overwrite=True)
    assert _notes(tmp_path / "out") == {"train": "two", "test": "two"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test", "train"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # other files in OUT are left alone; a non-dataset split folder is never replaced
    (tmp_path / "out" / "README").write_text("mine")
    (tmp_path / "out" / "test" / "manifest.json").unlink()
    with pytest.raises(FileExistsError, match="test exists and is neither empty nor a packed"):
        PackedSplits(tmp_path / "out", ("train", "test"), overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="file exists and is not a folder"):
        PackedSplits(tmp_path / "file", ("train", "test"))
    with pytest.raises(ValueError, match="distinct plain folder names"):
        PackedSplits(tmp_path / "x", ("train", "train"))


@pytest.mark.parametrize("existing", [False, True])
def test_a_failing_split_publishes_neither(tmp_path, existing):
    out = tmp_path / "out"
    if existing:
        _write_splits(out, "old")
    images, labels = _data(n=3)
    with pytest.raises(RuntimeError, match="disk full"):
        with PackedSplits(out, ("train", "test"), overwrite=True) as s:
            s.write("train", images, labels, {"note": "new"})
            with s.writer("test", 3, 5, 4, {"note": "new"}) as w:
                w.write(0, images[:1])
                raise RuntimeError("disk full")
    if existing:
        assert _notes(out) == {"train": "old", "test": "old"}
        assert sorted(p.name for p in out.iterdir()) == ["test", "train"]
    else:
        assert list(tmp_path.iterdir()) == []
    # forgetting a split is an error too, and publishes nothing
    with pytest.raises(ValueError, match="split.s. test of .*out were never written; publishing none"):
        with PackedSplits(out, ("train", "test"), overwrite=True) as s:
            s.write("train", images, labels, {"note": "new"})
    assert _notes(out) == ({"train": "old", "test": "old"} if existing else
                           {"train": None, "test": None})


def test_a_failing_rename_is_undone(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _write_splits(out, "old")
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append((Path(src).parent.name, Path(dst).name))
        if len(calls) == 5:  # 2 staged splits, 2 old ones moved aside, then the first new one in
            raise OSError("rename failed (simulated)")
        real(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        _write_splits(out, "new", overwrite=True)
    # every old split was moved aside before the first new one moved in ...
    assert [dst for _, dst in calls[2:5]] == ["train", "test", "train"]
    assert calls[2][0] == calls[3][0] == "out" and calls[4][0].startswith(".train+test.tmp-")
    # ... and the undo put both old splits back
    assert _notes(out) == {"train": "old", "test": "old"}
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]


_PUBLISH_AND_DIE = """
import os, sys
import numpy as np
from refimpl.data.packed import PackedSplits
out, note, die_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
real, calls = os.rename, []
def rename(src, dst):
    real(src, dst)
    calls.append(dst)
    if len(calls) == die_after:
        os._exit(9)  # killed right after this rename: no cleanup, no undo
os.rename = rename
images = np.zeros((3, 5, 4, 3), np.uint8)
with PackedSplits(out, ("train", "test"), overwrite=True) as s:
    for name in s.names:
        s.write(name, images, np.zeros(3, np.int64), {"note": note})
"""


@pytest.mark.parametrize("existing", [False, True])
def test_a_crash_between_renames_never_mixes_old_and_new(tmp_path, existing):
    """Kill the writer after every single rename in turn; OUT never holds one new and one old
    split, no old split is lost (kept in the .old- folder), and the next run completes."""
    out = tmp_path / "out"
    for die_after in range(1, 20):
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        if existing:
            _write_splits(out, "old")
        r = subprocess.run([sys.executable, "-c", _PUBLISH_AND_DIE, str(out), "new", str(die_after)],
                           capture_output=True, text=True)
        if r.returncode == 0:
            break
        assert r.returncode == 9, r.stderr
        notes = _notes(out)
        assert set(notes.values()) - {None} in (set(), {"old"}, {"new"}), (die_after, notes)
        if existing:  # every old split is in OUT or in the .old- folder
            aside = [p for p in out.iterdir() if p.name.startswith(".train+test.old-")]
            for name, note in notes.items():
                if note != "old":
                    assert len(aside) == 1 and _notes(aside[0])[name] == "old", (die_after, name)
        else:
            assert notes in ({"train": None, "test": None}, {"train": "new", "test": "new"})
        # the next run (the child's pid is gone) removes its temporaries and finishes
        _write_splits(out, "next", overwrite=True)
        assert _notes(out) == {"train": "next", "test": "next"}
        leftovers = [p.name for p in list(out.iterdir()) + list(tmp_path.iterdir()) if ".tmp-" in p.name]
        assert leftovers == [], (die_after, leftovers)
    else:
        pytest.fail("the writer never finished")
    assert die_after == (6 if existing else 3) + 1  # renames: 2 staged + (2 aside + 2 in | 1 whole)
    assert _notes(out) == {"train": "new", "test": "new"}
