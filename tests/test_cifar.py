"""data_tools.cifar on tiny fake batches in the official python layout (folder and .tar.gz)."""
import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from data_tools.cifar import convert_cifar, main
from refimpl.data.packed import PackedDataset

PER_BATCH = 5


def _batch(rng, n, cifar100=False, first=0):
    """A fake batch: the images (N, 32, 32, 3) and the pickled dict as the official files hold it."""
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    # Official row layout, built independently of the converter: 1024 R, 1024 G, 1024 B.
    rows = np.stack([np.concatenate([im[:, :, c].ravel() for c in range(3)]) for im in images])
    d = {b"batch_label": b"fake", b"data": rows,
         b"filenames": [f"img_{first + i:05d}.png".encode() for i in range(n)]}
    if cifar100:
        fine = rng.integers(0, 4, n)
        d[b"fine_labels"], d[b"coarse_labels"] = fine.tolist(), (fine // 2).tolist()  # 4 fine, 2 coarse
        labels = fine
    else:
        labels = rng.integers(0, 10, n)
        d[b"labels"] = labels.tolist()
    return images, labels, pickle.dumps(d, protocol=2)


def _fake_cifar(tmp_path, cifar100=False, tar=False):
    """Write a fake CIFAR; return (src path, {split: (images, labels)})."""
    rng = np.random.default_rng(0)
    folder = "cifar-100-python" if cifar100 else "cifar-10-batches-py"
    if cifar100:
        meta = ("meta", {b"fine_label_names": [b"apple", b"pear", b"bus", b"car"],
                         b"coarse_label_names": [b"fruit", b"vehicle"]})
        batches = {"train": ["train"], "test": ["test"]}
    else:
        meta = ("batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)],
                                 b"num_cases_per_batch": PER_BATCH})
        batches = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    files = {meta[0]: pickle.dumps(meta[1], protocol=2)}
    expect = {}
    for split, names in batches.items():
        ims, labs = [], []
        for k, name in enumerate(names):
            im, lab, files[name] = _batch(rng, PER_BATCH, cifar100, first=k * PER_BATCH)
            ims.append(im)
            labs.append(lab)
        expect[split] = (np.concatenate(ims), np.concatenate(labs))
    if not tar:
        (tmp_path / folder).mkdir()
        for name, data in files.items():
            (tmp_path / folder / name).write_bytes(data)
        return tmp_path / folder, expect
    path = tmp_path / f"{folder}.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        evil = tarfile.TarInfo("../evil")  # must never be extracted
        evil.size = 4
        t.addfile(evil, io.BytesIO(b"evil"))
    return path, expect


@pytest.mark.parametrize("tar", [False, True])
def test_cifar10(tmp_path, tar):
    src, expect = _fake_cifar(tmp_path, tar=tar)
    train, test = convert_cifar(src, tmp_path / "out")
    for path, split, n in ((train, "train", 25), (test, "test", 5)):
        ds = PackedDataset(path)
        images, labels = expect[split]
        assert len(ds) == n and ds.image_size == (32, 32)
        np.testing.assert_array_equal(ds.images, images)  # pixels exact, batch order kept
        np.testing.assert_array_equal(ds.labels, labels)
        assert ds.class_names == [f"class{i}" for i in range(10)]
        assert ds.manifest["split"] == split and ds.manifest["source"]["dataset"] == "cifar10"
    files = PackedDataset(train).manifest["files"]
    assert files[0] == "data_batch_1/img_00000.png" and files[5] == "data_batch_2/img_00005.png"
    assert not (tmp_path.parent / "evil").exists() and not (tmp_path / "evil").exists()


def test_tar_and_folder_give_identical_datasets(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    folder, _ = _fake_cifar(tmp_path / "a")
    tar, _ = _fake_cifar(tmp_path / "b", tar=True)
    a = convert_cifar(folder.parent, tmp_path / "from_folder")  # the folder holding it works too
    b = convert_cifar(tar, tmp_path / "from_tar")
    for pa, pb in zip(a, b):
        assert PackedDataset(pa).manifest["checksums"] == PackedDataset(pb).manifest["checksums"]


@pytest.mark.parametrize("tar", [False, True])
def test_cifar100(tmp_path, tar):
    src, expect = _fake_cifar(tmp_path, cifar100=True, tar=tar)
    assert main([str(src), str(tmp_path / "out"), "--dataset", "cifar100"]) == 0
    for split in ("train", "test"):
        ds = PackedDataset(tmp_path / "out" / split)
        images, fine = expect[split]
        np.testing.assert_array_equal(ds.images, images)
        np.testing.assert_array_equal(ds.labels, fine)
        assert ds.class_names == ["apple", "pear", "bus", "car"]
        m = ds.manifest
        assert m["coarse_class_names"] == ["fruit", "vehicle"]
        mapping = np.asarray(m["fine_to_coarse"])
        seen = np.unique(fine)
        np.testing.assert_array_equal(mapping[seen], seen // 2)
        assert (mapping[np.setdiff1d(np.arange(4), seen)] == -1).all()


def test_numpy1_pickles_load(tmp_path):
    # Files pickled by NumPy 1 name numpy.core.multiarray (renamed numpy._core in NumPy 2).
    src, expect = _fake_cifar(tmp_path)
    for name in os.listdir(src):
        data = (src / name).read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (src / name).write_bytes(data)
    train, _ = convert_cifar(src, tmp_path / "out")
    np.testing.assert_array_equal(PackedDataset(train).images, expect["train"][0])


def test_malicious_pickle_is_refused(tmp_path, capsys):
    src, _ = _fake_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    (src / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    assert main([str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "data_batch_3" in err and "refusing to load" in err and "system" in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_errors_name_the_problem(tmp_path):
    src, _ = _fake_cifar(tmp_path)
    (src / "data_batch_4").unlink()
    with pytest.raises(ValueError, match="missing .*data_batch_4"):
        convert_cifar(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="not a CIFAR python folder"):
        convert_cifar(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "t").mkdir()
    tar, _ = _fake_cifar(tmp_path / "t", tar=True)
    with pytest.raises(ValueError, match="no cifar-100-python/"):
        convert_cifar(tar, tmp_path / "out", dataset="cifar100")
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(ValueError, match="not a readable tar"):
        convert_cifar(tmp_path / "junk.tar.gz", tmp_path / "out")
    with pytest.raises(FileNotFoundError):
        convert_cifar(tmp_path / "missing", tmp_path / "out")


def test_bad_labels_and_shapes(tmp_path):
    src, _ = _fake_cifar(tmp_path)
    d = pickle.loads((src / "test_batch").read_bytes())
    d[b"labels"][0] = 10
    (src / "test_batch").write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(ValueError, match=r"test_batch: labels out of range \[0, 10\)"):
        convert_cifar(src, tmp_path / "out")
    d[b"labels"][0] = 1
    d[b"data"] = d[b"data"][:, :100]
    (src / "test_batch").write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(ValueError, match=r"expected data shaped \(N, 3072\)"):
        convert_cifar(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # train was fine but nothing was written


def test_existing_output(tmp_path):
    src, _ = _fake_cifar(tmp_path)
    convert_cifar(src, tmp_path / "out")
    with pytest.raises(FileExistsError, match="train already exists"):
        convert_cifar(src, tmp_path / "out")
    convert_cifar(src, tmp_path / "out", overwrite=True)


@pytest.mark.parametrize("compressed", [True, False])
def test_truncated_archive_is_one_clear_error(tmp_path, capsys, compressed):
    import gzip
    src, _ = _fake_cifar(tmp_path, tar=True)
    data = src.read_bytes() if compressed else gzip.decompress(src.read_bytes())
    cut = tmp_path / ("cut.tar.gz" if compressed else "cut.tar")
    for fraction in (0.05, 0.5, 0.95):  # in the first member, in the middle, in the last
        cut.write_bytes(data[:int(len(data) * fraction)])
        assert main([str(cut), str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"cifar: error: {cut}: truncated or corrupt archive (")
        assert err.count("\n") == 1 and "Traceback" not in err
        assert ("EOFError" if compressed else "ReadError: unexpected end of data") in err
        assert not (tmp_path / "out").exists()


def test_a_failing_test_split_leaves_no_lone_train(tmp_path, capsys, fail_test_split):
    src, _ = _fake_cifar(tmp_path)
    old = convert_cifar(src, tmp_path / "old")
    sums = [PackedDataset(p).manifest["checksums"] for p in old]
    fail_test_split()
    assert main([str(src), str(tmp_path / "out")]) == 1
    assert "No space left on device (simulated)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py", "old"]
    # replacing: both old splits stay as they were
    assert main([str(src), str(tmp_path / "old"), "--overwrite"]) == 1
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["test", "train"]
    assert [PackedDataset(p).manifest["checksums"] for p in old] == sums


def test_an_archive_cut_within_its_first_block_is_one_clear_error(tmp_path, capsys):
    """<= 100 bytes of the .tar.gz: tarfile.open itself meets the end (a raw EOFError)."""
    src, _ = _fake_cifar(tmp_path, tar=True)
    cut = tmp_path / "cut.tar.gz"
    for size in (10, 100):
        cut.write_bytes(src.read_bytes()[:size])
        assert main([str(cut), str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"cifar: error: {cut}: truncated or corrupt archive (EOFError")
        assert err.count("\n") == 1


@pytest.mark.parametrize("cifar100", [False, True])
def test_class_names_that_are_not_a_list_are_one_clear_error(tmp_path, capsys, cifar100):
    src, _ = _fake_cifar(tmp_path, cifar100=cifar100)
    meta_file = src / ("meta" if cifar100 else "batches.meta")
    meta = pickle.loads(meta_file.read_bytes())
    key = b"coarse_label_names" if cifar100 else b"label_names"
    meta[key] = 5
    meta_file.write_bytes(pickle.dumps(meta, protocol=2))
    assert main([str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"b{key.decode()!r} must be a list of class names, got int 5" in err
    assert err.count("\n") == 1 and "Traceback" not in err
