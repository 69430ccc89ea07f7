"""Files: checksums, durable writes, and publishing by rename.

    sha256_file(path)  the hex sha256 of a file, read in 4 MiB chunks (never
                       all at once: an N x D classifier file is gigabytes)
    fsync_path(path)   flush a file's or a directory's data to the disk (a
                       directory's fsync makes a rename inside it durable)
    fsync_tree(path)   fsync_path of every file and folder under path
    write_shard_rows(path, rows, lo, shape, dtype, comm)
                       every rank writes its rows of one (N, D) .npy file
                       through a memory map (checkpoints, traces)
    create_npy(path, shape, dtype)
                       a .npy file of that shape, its blocks allocated on the
                       disk (os.posix_fallocate) before anything maps it
    check_room(folder, need, what)
                       OSError naming both sizes unless the disk holding
                       folder has ``need`` bytes free

A full disk is an OSError with a message, never a crash: a file written
through a memory map is first allocated whole (``create_npy``), because a
write into a sparse file's hole on a full disk is a SIGBUS, which ends the
process without a word.

Publishing: the one way refimpl writes what a reader must see whole or not
at all (a packed dataset, a checkpoint, a trace's files). The data goes into
a temporary sibling of the target; when it is complete, every file and
folder of it is fsynced, it is renamed onto the target (a rename within one
folder is atomic), and the folder holding the target is fsynced (so the
rename itself survives a power cut). A crash at any moment leaves the old
target or the new one, never a mix.

    staging_dir(parent, name)       a new temporary folder for target parent/name
    publish([(src, dst), ...])      fsync, rename each staged src onto dst, fsync
    atomic_file(path)               ``with atomic_file(p) as f:`` one file, the same way
    remove_stale_temporaries(parent, name)
                                    what killed writers of parent/name left

Temporary names. A writer stages in ``.<name>.tmp-<host>-<pid>-<token>``
next to the target ``<name>`` (host: this machine's name, letters, digits,
"_" and "." only; pid: the writing process; token: 8 random hex digits).
Folders are made with ``os.mkdir``, so a published folder has the
permissions ``mkdir`` gives under the current umask (0755 under umask 022,
0700 under 077), never mkdtemp's 0700. ``remove_stale_temporaries`` deletes
only those named with this host and the pid of a process that no longer
exists (``os.kill(pid, 0)`` fails with ProcessLookupError): a running
writer's (its pid is alive), one from another host (a shared filesystem),
and one in any other naming are never touched. (A recycled pid only makes a
stale temporary live a while longer.)

Replacing. A folder cannot be renamed onto a non-empty folder, so ``publish``
first moves every existing target folder aside into one
``.<names>.old-<host>-<pid>-<token>/`` folder, then renames the new ones
in, then deletes the aside folder; if a rename fails, the ones before it
are undone. A crash between the renames leaves the old folders complete in
the ``.old-`` folder, which is never deleted automatically (it may hold the
only copy). A file is replaced by one rename (``os.replace``), which is
atomic by itself.
"""
import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

import numpy as np

from refimpl.backend import to_numpy

# This machine's name as it appears in temporary names (no "-", so the name
# parses unambiguously from the right).
HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"


def sha256_file(path, chunk=1 << 22):
    """Hex sha256 of the bytes of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path):
    """os.fsync of a file or a directory, opened read-only by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path):
    """fsync every file under ``path`` and every folder after its contents (a file: itself)."""
    if not os.path.isdir(path) or os.path.islink(path):
        fsync_path(path)
        return
    for root, _, files in os.walk(path, topdown=False):  # the deepest folders first
        for name in files:
            f = os.path.join(root, name)
            if not os.path.islink(f):
                fsync_path(f)
        fsync_path(root)


def format_bytes(n):
    """Bytes as GiB, 3 significant digits (``0.0115 GiB``)."""
    return f"{n / 2**30:.3g} GiB"


def check_room(folder, need, what):
    """OSError(ENOSPC) unless the filesystem holding ``folder`` has ``need`` bytes free.

    what: the subject of the message, e.g. "ds: 1000 images of 64x64x3".
    """
    free = shutil.disk_usage(folder).free
    if need > free:
        raise OSError(errno.ENOSPC, f"{what} need {format_bytes(need)} on disk, but the "
                                    f"filesystem holding {folder} has {format_bytes(free)} free")


def create_npy(path, shape, dtype):
    """Create a .npy file of ``shape`` and ``dtype``, every block of it allocated.

    The header is written, then the data's bytes are allocated on the disk
    (``os.posix_fallocate``; reading them gives zeros), so writing through a
    memory map later cannot hit a full disk. A full disk is an OSError naming
    the file here, where it can be handled, and the file is removed.
    """
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
              "shape": tuple(int(n) for n in shape)}
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    try:
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            offset = f.tell()
            f.flush()
            if nbytes:
                os.posix_fallocate(f.fileno(), offset, nbytes)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise OSError(e.errno, f"{path}: cannot allocate {format_bytes(nbytes)} on disk "
                               f"({e.strerror or e})") from None
    return path


def _raise_if_any_failed(comm, error, path, what):
    """Collective: every rank raises if any rank's ``error`` is set (instead of a barrier)."""
    failed = to_numpy(comm.all_gather(np.array([error is not None], dtype=np.int64)))
    if failed.any():
        first = int(np.argmax(failed))
        if error is not None and comm.rank == first:
            raise error
        raise OSError(errno.EIO, f"{path}: rank {first} could not {what} (its message is "
                                 f"above)")


def write_shard_rows(path, rows, lo, shape, dtype, comm):
    """Every rank writes its rows [lo, lo + n) of an (N, D) .npy file; rank 0 creates it.

    Collective: rank 0 creates the file, allocated whole (``create_npy``);
    then every rank maps it and writes its rows. The file holds the whole W
    whatever the number of ranks, so any P' can read it. Each rank fsyncs
    its own writes. An OSError on any rank (a full disk) is raised on every
    rank, the failing one's naming the file.
    """
    error = None
    if comm.rank == 0:
        try:
            create_npy(path, shape, dtype)
        except OSError as e:
            error = e
    _raise_if_any_failed(comm, error, path, "create the file")
    try:
        mm = np.load(path, mmap_mode="r+")
        mm[lo:lo + rows.shape[0]] = to_numpy(rows)
        mm.flush()
        del mm
        fsync_path(path)
    except OSError as e:
        error = OSError(e.errno, f"{path}: cannot write rows [{lo}, {lo + rows.shape[0]}) "
                                 f"({e.strerror or e})")
    _raise_if_any_failed(comm, error, path, "write its rows")


# ---------------------------------------------------------------- publishing
def _temporary_name(name, kind):
    return f".{name}.{kind}-{HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def staging_dir(parent, name, kind="tmp"):
    """Create ``parent/.<name>.<kind>-<host>-<pid>-<token>`` and return its Path.

    ``os.mkdir`` applies the umask (mode 0o777 & ~umask), like ``mkdir``;
    ``tempfile.mkdtemp`` would always give 0700.
    """
    for _ in range(100):
        path = Path(parent) / _temporary_name(name, kind)
        try:
            os.mkdir(path)
            return path
        except FileExistsError:  # 32 random bits collided: draw again
            continue
    raise FileExistsError(f"could not create a temporary folder for {name} in {parent}")


def _process_gone(pid):
    """True only if no process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):  # another user's process; or not a pid
        return False
    return False


def remove_stale_temporaries(parent, name):
    """Delete ``parent/.<name>.tmp-<host>-<pid>-<token>`` folders and files left by killed
    writers.

    Only those named with this host and the pid of a process that no longer
    exists are removed (the module docstring); returns their Paths.
    """
    pattern = re.compile(re.escape(f".{name}.tmp-")
                         + r"(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]{8}")
    try:
        entries = list(os.scandir(parent))
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if not (m and m["host"] == HOST and int(m["pid"]) != os.getpid()
                and _process_gone(int(m["pid"]))):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        elif entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
        else:
            continue
        removed.append(Path(entry.path))
    return removed


def publish(pairs, replace=True):
    """Rename each complete staged ``src`` onto ``dst``, durably; every ``dst`` in one folder.

    Every src (a folder or a file) is fsynced first, whole; then existing
    dst folders are moved aside, the srcs renamed in and the folder fsynced,
    as the module docstring says. So no dst is new while another is old. If
    a folder's rename fails, the ones before it are undone and the error is
    raised. replace=False moves nothing aside: a dst folder that exists
    (and is not empty) makes its rename fail.
    """
    pairs = [(Path(src), Path(dst)) for src, dst in pairs]
    parent = pairs[0][1].parent
    for src, _ in pairs:
        fsync_tree(src)
    old = [dst for src, dst in pairs if replace and src.is_dir() and os.path.lexists(dst)]
    aside = staging_dir(parent, "+".join(dst.name for _, dst in pairs), "old") if old else None
    moved_aside, moved_in = [], []
    try:
        for dst in old:
            os.rename(dst, aside / dst.name)
            moved_aside.append(dst)
        for src, dst in pairs:
            if src.is_dir():
                os.rename(src, dst)
                moved_in.append((src, dst))
            else:
                os.replace(src, dst)  # atomic for a file, whatever dst was
    except BaseException as e:
        try:  # undo, newest first: the new folders back to staging, the old ones back in place
            for src, dst in reversed(moved_in):
                os.rename(dst, src)
            for dst in reversed(moved_aside):
                os.rename(aside / dst.name, dst)
        except OSError as undo:
            raise OSError(f"publishing {', '.join(str(d) for _, d in pairs)} failed ({e}) and "
                          f"could not be undone ({undo}); the previous data is in {aside}") from e
        if aside is not None:
            aside.rmdir()
        raise
    fsync_path(parent)  # the renames themselves, durable
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path):
    """``with atomic_file(path) as f:`` write one file whole or not at all.

    f: a binary file in path's folder, under a temporary name (module
    docstring). On a clean exit it is closed and published onto ``path``
    (fsync, ``os.replace``, fsync of the folder): a reader sees the old file
    or the new one, never half of one. On an exception it is removed and
    ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.parent / _temporary_name(path.name, "tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
        publish([(tmp, path)])
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
