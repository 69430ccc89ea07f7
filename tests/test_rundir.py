"""The run directory (refimpl.rundir): checked before anything runs, owned by one run at a time.

Unit tests of ``check_run_dir`` and ``RunLock`` (held, released, stale after a
crash, the fallback where a filesystem has no flock), then refimpl-train: a
second run into a directory in use is refused naming the first, which goes on;
out= that is empty, a file or under a file is one line and exit 2.
"""
import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from refimpl import rundir
from refimpl.rundir import RunDirError, RunLock, check_run_dir
from test_resume import launch, wait_for_step
from test_train import TINY, train


def test_check_run_dir_names_what_is_wrong(tmp_path, monkeypatch):
    check_run_dir(tmp_path / "new" / "deeper")  # to be made: fine
    check_run_dir(tmp_path)                     # exists: fine
    afile = tmp_path / "afile"
    afile.write_text("x")
    for path, message in ((" ", 'out: no run directory given (out="" would write into the '
                                'current folder)'),
                          (afile, f"out: {afile} is a file, not a folder"),
                          (afile / "sub", f"out: {afile / 'sub'} lies under {afile}, which is a "
                                          f"file")):
        with pytest.raises(RunDirError) as e:
            check_run_dir(path)
        assert str(e.value).startswith(message) and "\n" not in str(e.value)
    # a read-only filesystem (root may write anywhere else): as the kernel would say
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: False)
    monkeypatch.setattr(rundir, "_read_only", lambda folder: True)
    with pytest.raises(RunDirError, match=r"out: cannot write into .* \(a read-only "
                                          r"filesystem\): give another out="):
        check_run_dir(tmp_path / "run")


def test_lock_is_refused_while_held_and_released_on_exit(tmp_path):
    with RunLock(tmp_path) as lock:
        assert (tmp_path / "lock").read_text() == f"{rundir.HOST} {os.getpid()}\n"
        with pytest.raises(RunDirError) as e:
            RunLock(tmp_path).acquire()
        assert str(e.value) == (f"{tmp_path} is in use by another run (host {rundir.HOST}, pid "
                                f"{os.getpid()}; lock file {tmp_path / 'lock'}): wait for it "
                                f"to end, or give another out=")
        assert lock.stale == ""
    assert not (tmp_path / "lock").exists()
    RunLock(tmp_path).acquire().release()  # free again
    with pytest.raises(ValueError):  # released on an exception too
        with RunLock(tmp_path):
            raise ValueError("the run failed")
    assert not (tmp_path / "lock").exists()


def test_a_crashed_holders_lock_is_stale(tmp_path):
    """kill -9 leaves the lock file (with the dead pid); the kernel dropped its flock."""
    code = ("import sys, time; from refimpl.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(RunDirError, match=f"pid {holder.pid};"):
        RunLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    assert (tmp_path / "lock").read_text().split()[1] == str(holder.pid)
    lock = RunLock(tmp_path).acquire()
    assert lock.stale == f"host {rundir.HOST}, pid {holder.pid}"
    lock.release()


def test_without_flock_the_file_is_the_lock(tmp_path, monkeypatch):
    """Where flock fails (ENOLCK: some NFS and FUSE mounts): created exclusively; taken
    over only from a dead pid of this host, never from another host."""
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(rundir.fcntl, "flock", no_flock)
    lock = RunLock(tmp_path).acquire()
    with pytest.raises(RunDirError, match=f"pid {os.getpid()};"):
        RunLock(tmp_path).acquire()
    lock.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "lock").write_text(f"{rundir.HOST} {dead}\n")
    lock = RunLock(tmp_path).acquire()
    assert lock.stale == f"host {rundir.HOST}, pid {dead}"
    lock.release()
    (tmp_path / "lock").write_text(f"elsewhere {dead}\n")
    with pytest.raises(RunDirError, match=f"host elsewhere, pid {dead};"):
        RunLock(tmp_path).acquire()
