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


def test_two_runs_into_one_directory(tmp_path):
    """The second is refused naming the first (exit 2, nothing of it written); the first
    goes on, and its lock is gone when it ends, also by a signal; after kill -9 the next
    run takes the stale lock over."""
    run = tmp_path / "run"
    args = [*TINY, f"out={run}", "epochs=200", "eval_every=0", "save_every=0"]
    first = launch(args, None)
    wait_for_step(run, 2, first)
    second = train(*TINY, f"out={run}", "--resume", "auto")
    assert second.returncode == 2, second.stderr[-2000:]
    assert second.stderr.count(f"refimpl-train: error: {run} is in use by another run (host "
                               f"{rundir.HOST}, pid {first.pid}; lock file {run / 'lock'})") == 1
    third = train(*TINY, f"out={run}")
    assert third.returncode == 2 and "is in use by another run" in third.stderr
    steps = (run / "metrics.jsonl").read_text().count('"kind": "step"')
    time.sleep(1.0)
    assert first.poll() is None and (run / "metrics.jsonl").read_text().count(
        '"kind": "step"') > steps  # the first run trains on, alone
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 130 and not (run / "lock").exists(), err[-2000:]
    (run / "metrics.jsonl").unlink()  # to see the next run's own steps
    crashed = launch([*args, "--resume", "auto"], None)
    wait_for_step(run, 2, crashed)
    crashed.kill()
    crashed.wait()
    assert (run / "lock").exists()
    proc = train(*TINY, f"out={run}", "epochs=1", "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"took over {run / 'lock'}: its run (host {rundir.HOST}, pid {crashed.pid}) ended " \
           f"without releasing it" in proc.stdout


def test_out_that_cannot_be_a_run_directory_is_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, message in (("", 'out: no run directory given (out="" would write into the '
                              'current folder)'),
                         (afile, f"out: {afile} is a file, not a folder"),
                         (afile / "sub", f"out: {afile / 'sub'} lies under {afile}, which is a "
                                         f"file")):
        proc = train(*TINY, f"out={out}")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.startswith(f"refimpl-train: error: {message}")
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert afile.read_text() == "x"


def test_out_on_a_read_only_filesystem_is_one_line(tmp_path):
    """A real read-only tmpfs (needs root to mount; skipped elsewhere): formerly the
    traceback of rank 0's mkdir, printed twice."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        proc = train(*TINY, f"out={ro / 'run'}")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr == (f"refimpl-train: error: out: cannot write into {ro} (a read-only "
                               f"filesystem): give another out=\n")
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)
