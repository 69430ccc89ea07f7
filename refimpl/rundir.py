"""A run directory: a writable folder, owned by one run at a time.

Contract.

    check_run_dir(path)   RunDirError (one line) unless ``path`` names a folder
                          this process can create or write into: not empty, not
                          a file, not under a file, not on a read-only
                          filesystem. Checked before anything runs.
    RunLock(path)         ``with RunLock(out):`` / ``lock = RunLock(out).acquire()``
                          ... ``lock.release()``: the lock of run directory
                          ``out``, taken for the whole run by one process
                          (rank 0 of a job).

The lock is the file ``out/lock`` holding ``<host> <pid>`` of its holder,
``flock``ed (exclusive, not waiting) while the run lasts. Taking a lock
that another process holds raises RunDirError naming the holder; the file
is removed on release. Every exit releases it: ``release`` on a normal end
or an exception, and the kernel drops the ``flock`` of a process that dies
(``kill -9``, MPI_Abort), so a lock file left by a crash is stale and the
next run simply takes it. Where the filesystem offers no ``flock``, the
file itself is the lock: created exclusively, and taken over only when it
names this host and a pid that no longer exists there (a holder on another
host is never second-guessed).
"""
import errno
import fcntl
import os
import socket
from pathlib import Path

LOCK = "lock"
HOST = socket.gethostname()
# errors of a filesystem that does not do flock (some NFS and FUSE mounts)
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)


class RunDirError(ValueError):
    """The run directory cannot be used (not writable, or held by another run)."""


def check_run_dir(path):
    """RunDirError unless ``path`` can be this run's directory (module docstring)."""
    text = str(path)
    if not text.strip():
        raise RunDirError("out: no run directory given (out=\"\" would write into the current "
                          "folder): give out=runs/<name>")
    path = Path(path)
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent  # the deepest part of the path that exists
    if probe == path and not path.is_dir():
        raise RunDirError(f"out: {path} is a file, not a folder: give another out=")
    if not probe.is_dir():
        raise RunDirError(f"out: {path} lies under {probe}, which is a file: give another out=")
    if not os.access(probe, os.W_OK | os.X_OK):
        why = ("a read-only filesystem" if _read_only(probe) else
               "no permission to write there")
        raise RunDirError(f"out: cannot write into {probe} ({why}): give another out=")


def _read_only(folder):
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _pid_gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    return False


class RunLock:
    """The lock of one run directory (module docstring)."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK
        self.fd = None
        self.stale = ""  # 'host H, pid P' of a crashed holder whose lock file was taken over

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def holder(self):
        """'host H, pid P' of the lock file's writer ('' when it names none)."""
        try:
            host, pid = self.path.read_text().split()[:2]
            return f"host {host}, pid {int(pid)}"
        except (OSError, ValueError, UnicodeDecodeError):
            return ""

    def _refuse(self):
        who = self.holder() or "a process that has not written its name yet"
        raise RunDirError(f"{self.path.parent} is in use by another run ({who}; lock file "
                          f"{self.path}): wait for it to end, or give another out=")

    def acquire(self):
        """Take the lock or raise RunDirError naming the holder; returns self."""
        while True:
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                fd, created = os.open(self.path, os.O_RDWR), False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse()
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    os.close(fd)
                    raise
                if created:  # made exclusively just now: without flock, that is the lock
                    return self._own(fd)
                os.close(fd)
                return self._acquire_without_flock()
            # the holder before us may have removed the file after we opened it:
            # then our lock is on a deleted file, and we start again
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.stale = self.holder()  # a lock file nobody holds: its writer ended without release
        return self._own(fd)

    def _own(self, fd):
        """Write this process's host and pid into the lock file open at ``fd``; keep it open."""
        os.ftruncate(fd, 0)
        os.write(fd, f"{HOST} {os.getpid()}\n".encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def _acquire_without_flock(self):
        """The lock file alone is the lock (no flock here): created exclusively."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                parts = self.path.read_text().split() if self.path.exists() else []
                stale = (len(parts) >= 2 and parts[0] == HOST and parts[1].isdigit()
                         and _pid_gone(int(parts[1])))
                if not stale:
                    self._refuse()
                self.stale = self.holder()
                self.path.unlink(missing_ok=True)  # a crashed run's lock, on this host
                continue
            return self._own(fd)
        self._refuse()

    def release(self):
        """Remove the lock file and drop the lock (a no-op when not held)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None
