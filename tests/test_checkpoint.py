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
