"""Checkpoints in one process (refimpl.checkpoint, fileio): what may be overwritten, what
verifies, and a full disk. The P-rank saves and resumes are tests/test_resume.py.

A checkpoint folder that does not verify is never written over or removed, and
``resume_point`` (--resume auto, or a run directory) never passes over it; a
meta.json must list every file the checkpoint has; a save checks the disk's room
first, and the classifier rows written through a memory map are allocated first,
so a full disk is an OSError with a message, never SIGBUS.
"""
import errno
import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple

import numpy as np
import pytest

from refimpl import checkpoint, fileio
from refimpl.checkpoint import CheckpointError
from refimpl.models.network import build_model
from refimpl.optim.sgd import SGD
from refimpl.parallel import CosineClassifier, SelfComm

from mpi_run import ENV, ROOT

CFG = {"arch": "resnet18", "stem": "cifar", "width": 1, "head_hidden": 8, "dim": 8,
       "dtype": "float64", "momentum": 0.9, "batch_size": 8}


@pytest.fixture
def parts():
    """(net, clf, net_opt, clf_opt, comm) of a tiny run: N = 20, D = 8, float64."""
    comm = SelfComm()
    net = build_model("resnet18", "cifar", 1, 8, 8, "float64", "cpu", 0)
    clf = CosineClassifier(20, 8, comm, dtype="float64")
    return (net, clf, SGD(net.store.data, net.store.grad, 0.1, 0.9),
            SGD(clf.weight.ravel(), clf.grad.ravel(), 0.1, 0.9), comm)


def save(run, step, parts, neighbours=None, keep=5, log=None):
    state = {"epoch": step // 4, "step_in_epoch": step % 4, "step": step}
    return checkpoint.save(run, state, CFG, *parts, neighbours, keep, log=log)


def edit_meta(ckpt, change):
    meta = json.loads((ckpt / "meta.json").read_text())
    change(meta)
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_meta_json_must_list_every_file(tmp_path, parts):
    """"files": {} made the checksum check pass for a weight file with a flipped bit."""
    ckpt = save(tmp_path, 4, parts, neighbours=np.zeros((20, 3), dtype=np.int64))
    checkpoint.verify(ckpt)
    weight = ckpt / "classifier.weight.npy"
    data = bytearray(weight.read_bytes())
    data[-1] ^= 1
    weight.write_bytes(bytes(data))
    edit_meta(ckpt, lambda m: m.update(files={}))
    with pytest.raises(CheckpointError) as e:
        checkpoint.verify(ckpt)
    assert str(e.value) == (f"{ckpt / 'meta.json'}: does not list replicated.npz, "
                            f"classifier.weight.npy, classifier.momentum.npy, neighbours.npy "
                            f"(its files: none), so they cannot be verified")
    edit_meta(ckpt, lambda m: m.update(files={"replicated.npz": "0" * 64}))
    with pytest.raises(CheckpointError, match="does not list classifier.weight.npy, "
                                              "classifier.momentum.npy, neighbours.npy"):
        checkpoint.verify(ckpt)
    edit_meta(ckpt, lambda m: m.pop("files"))
    with pytest.raises(CheckpointError, match=r"meta.json: files missing or malformed \(not a "
                                              r"meta.json this refimpl wrote"):
        checkpoint.verify(ckpt)
    with pytest.raises(CheckpointError, match="files missing or malformed"):
        checkpoint.load(ckpt, CFG, *parts)


def test_latest_that_names_no_checkpoint(tmp_path, parts):
    older, newer = save(tmp_path, 4, parts), save(tmp_path, 8, parts)
    assert checkpoint.resume_point(tmp_path) == newer
    (tmp_path / "latest").write_bytes(b"\xff\xfeckpt\n")
    with pytest.raises(CheckpointError) as e:
        checkpoint.resume_point(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'latest'}: cannot be read as a checkpoint's name "
                            f"(UnicodeDecodeError): resume from a checkpoint by name "
                            f"(--resume {tmp_path}/ckpt-<step>)")
    assert checkpoint.latest_checkpoint(tmp_path) == newer  # lenient, for messages
    (tmp_path / "latest").write_text("../elsewhere\n")
    with pytest.raises(CheckpointError, match=r"latest: names '../elsewhere', not a checkpoint"):
        checkpoint.resume_point(tmp_path)
    with pytest.raises(CheckpointError, match="latest: names"):  # refimpl-eval and -export too
        checkpoint.resolve(tmp_path)
    assert older.exists() and newer.exists()


def test_resume_never_passes_over_a_checkpoint_that_does_not_verify(tmp_path, parts):
    """Only the latest meta.json gone: formerly resumed from the one before and later
    saved over the newer folder; every meta.json gone: formerly a fresh start."""
    older, newer = save(tmp_path, 4, parts), save(tmp_path, 8, parts)
    (newer / "meta.json").unlink()
    with pytest.raises(CheckpointError) as e:
        checkpoint.resume_point(tmp_path)
    assert str(e.value) == (
        f"{newer}: not a complete checkpoint (no meta.json; an interrupted save leaves only a "
        f".tmp-* directory); --resume will not pass over it: move ckpt-000000008 out of "
        f"{tmp_path} (--resume auto then continues from ckpt-000000004), or resume from "
        f"{older} into another run directory (--resume {older} out=NEW)")
    (older / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="move ckpt-000000008 out of .*, or give another "
                                              "out="):
        checkpoint.resume_point(tmp_path)
    (tmp_path / "latest").unlink()  # no pointer: the newest folder, which does not verify
    with pytest.raises(CheckpointError, match="ckpt-000000008: not a complete checkpoint"):
        checkpoint.resume_point(tmp_path)
    assert checkpoint.resume_point(tmp_path / "empty") is None
    with pytest.raises(CheckpointError, match="could save over it: move ckpt-000000008 out"):
        checkpoint.check_overwritable(tmp_path, 4)  # a run resumed from step 4 would reach it
    checkpoint.check_overwritable(tmp_path, 8)      # one from step 8 would not


def test_a_save_never_writes_over_or_removes_what_does_not_verify(tmp_path, parts):
    """A checkpoint folder replaced by a file, or one without meta.json, at the step being
    saved: refused, kept, and no .tmp-ckpt left; keep never removes one that does not
    verify (a log line says why it stays)."""
    save(tmp_path, 4, parts)
    blocker = tmp_path / "ckpt-000000008"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError) as e:
        save(tmp_path, 8, parts)
    assert str(e.value) == (f"{blocker}: not a checkpoint (a file, not a folder); not saving "
                            f"over it: move ckpt-000000008 out of {tmp_path}")
    assert blocker.read_text() == "not a folder" and not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(CheckpointError, match=r"not a checkpoint \(a file, not a folder\)"):
        (tmp_path / "latest").write_text("ckpt-000000008\n")
        checkpoint.resume_point(tmp_path)
    blocker.unlink()
    (tmp_path / "latest").write_text("ckpt-000000004\n")
    half = save(tmp_path, 8, parts)
    (half / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="no meta.json.*; not saving over it"):
        save(tmp_path, 8, parts)
    assert sorted(p.name for p in half.iterdir()) == [  # kept as it was
        "classifier.momentum.npy", "classifier.weight.npy", "replicated.npz"]
    # keep = 1: the oldest complete one does not verify (a flipped bit): it stays
    bad = save(tmp_path, 12, parts)
    weight = bad / "classifier.weight.npy"
    weight.write_bytes(weight.read_bytes()[:-1] + b"\x00")
    said = []
    save(tmp_path, 16, parts, keep=1, log=said.append)
    names = sorted(p.name for p in checkpoint.checkpoint_entries(tmp_path))
    assert names == ["ckpt-000000008", "ckpt-000000012", "ckpt-000000016"]  # 4 removed
    assert said == [f"kept ckpt-000000012 beyond keep = 1: it does not verify ({weight}: "
                    f"checksum mismatch: the file is truncated, corrupt or not this "
                    f"checkpoint's)"]


def test_a_save_checks_the_disks_room_first(tmp_path, parts, monkeypatch):
    first = save(tmp_path, 4, parts)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 5000, 5000))
    with pytest.raises(OSError) as e:
        save(tmp_path, 8, parts)
    assert e.value.errno == errno.ENOSPC
    assert str(e.value).startswith(f"[Errno 28] {tmp_path / 'ckpt-000000008'}: the checkpoint's "
                                   f"files need 0.00")
    assert str(e.value).endswith(f"GiB on disk, but the filesystem holding {tmp_path} has "
                                 f"4.66e-06 GiB free")
    assert [p.name for p in tmp_path.iterdir() if p.name != "latest"] == [first.name]
    assert checkpoint.resume_point(tmp_path) == first


def test_memory_mapped_rows_are_allocated_before_they_are_written(tmp_path, monkeypatch):
    """posix_fallocate failing (a full disk) is an OSError naming the file, and the file
    is removed: the rows are never written into a sparse file, where a full disk is a
    SIGBUS that ends the process without a word."""
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(fileio.os, "posix_fallocate", full)
    path = tmp_path / "w.npy"
    with pytest.raises(OSError) as e:
        fileio.write_shard_rows(path, np.ones((10, 4)), 0, (10, 4), np.float64, SelfComm())
    assert str(e.value) == (f"[Errno 28] {path}: cannot allocate 2.98e-07 GiB on disk (No space "
                            f"left on device)")
    assert not path.exists()
    monkeypatch.undo()
    fileio.write_shard_rows(path, np.ones((10, 4)), 0, (10, 4), np.float64, SelfComm())
    np.testing.assert_array_equal(np.load(path), np.ones((10, 4)))


def test_a_full_tmpfs_is_an_error_not_sigbus(tmp_path):
    """On a real 64 KiB tmpfs (needs root to mount; skipped elsewhere): 256 KiB of rows."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        code = ("import sys, numpy as np; from refimpl.fileio import write_shard_rows; "
                "from refimpl.parallel import SelfComm\n"
                "try:\n    write_shard_rows(sys.argv[1], np.ones((1000, 64), np.float32), 0, "
                "(1000, 64), np.float32, SelfComm())\n"
                "except OSError as e:\n    print(e)")
        proc = subprocess.run([sys.executable, "-c", code, str(mnt / "w.npy")],
                              capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)
        assert proc.returncode == 0, (proc.returncode, proc.stderr)  # -7 was SIGBUS
        assert proc.stdout.startswith(f"[Errno 28] {mnt / 'w.npy'}: cannot allocate")
        assert not os.path.exists(mnt / "w.npy")
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def train_on_a_small_disk(limit, args, ranks=None):
    """refimpl-train whose files cannot grow beyond ``limit`` bytes (tests/fsize_limited.py)."""
    from refimpl.parallel.launch import mpirun_command
    argv = [str(ROOT / "tests" / "fsize_limited.py"), str(limit), *map(str, args)]
    cmd = [sys.executable, *argv] if ranks is None else mpirun_command(ranks, *argv)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)


@pytest.mark.parametrize("limit,ranks,message", [
    # curves.png (about 60 KB) is the first file to outgrow 3 KB, at the end of epoch 1
    (3000, None, "cannot write into the run directory: [Errno 27] {run}/curves.png: File too "
                 "large; there is no checkpoint yet"),
    # curves.png fits, the checkpoint's replicated.npz (about 150 KB) does not
    (100_000, None, "cannot save the checkpoint of step 6: [Errno 27] writing "
                    "{run}/ckpt-000000006: File too large; there is no checkpoint yet"),
    pytest.param(100_000, 2, "cannot save the checkpoint of step 6: [Errno 27] writing "
                             "{run}/ckpt-000000006: File too large; there is no checkpoint yet",
                 marks=pytest.mark.mpi),
], ids=["log", "checkpoint", "checkpoint-2-ranks"])
def test_a_full_disk_stops_the_run_with_one_line(tmp_path, limit, ranks, message):
    """A write that fails for lack of room (EFBIG here, ENOSPC on a full disk) stops every
    rank with one line and exit 3, no traceback, no hang, no half-written checkpoint;
    formerly 3-6 tracebacks and exit 1."""
    from test_train import TINY
    run = tmp_path / "run"
    proc = train_on_a_small_disk(limit, [*TINY, f"out={run}", "epochs=3"], ranks)
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("refimpl-train:")]
    assert lines == [f"refimpl-train: stopped: {message.format(run=run)}"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not list(run.glob(".tmp-*")) and not list(run.glob("ckpt-*"))
    assert not (run / "lock").exists()
